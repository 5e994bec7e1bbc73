"""The generation loop lives in magistune.model.generation (training's GRPO rollouts sample with it too, and
train/ may not import infer/); these are its public names, unchanged for chat, generate and their tests."""

from magistune.model.generation import (
    SamplingOptions, cache_name, generate_ids, make_generator, max_positions, sample_next,
)

__all__ = ["SamplingOptions", "cache_name", "generate_ids", "make_generator", "max_positions", "sample_next"]
