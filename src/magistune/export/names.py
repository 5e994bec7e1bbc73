"""Checkpoint tensor names → the parameter names of the loaded model.

They differ. transformers 5 loads Mistral3 checkpoints written as `language_model.model.layers.0…` into
`model.language_model.layers.0…` (and saves them back in the old form), while a PEFT adapter names modules
as the loaded model does. The merge reads the checkpoint and the adapter side by side, so it must know which
checkpoint tensor each adapter module belongs to. transformers owns that mapping (its checkpoint conversion
renamings, looked up by config class and model type): we ask it, on a weightless meta-device copy of the
model, instead of guessing from name suffixes. Every renamed key must be a parameter of that copy, or the
mapping is refused with the names that did not resolve.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from magistune.model.parts import model_class


class NameMappingError(ValueError):
    pass


def param_names(config: PretrainedConfig, checkpoint_keys: list[str]) -> dict[str, str]:
    """{checkpoint key: parameter name of the loaded model} for every key."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    cls = model_class(config)
    if cls is None:
        raise NameMappingError(f"{type(config).__name__}: not a supported architecture")
    with torch.device("meta"):
        skeleton = cls(config)
    expected = skeleton.state_dict()
    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    out: dict[str, str] = {}
    unresolved = []
    for key in checkpoint_keys:
        name, converter = rename_source_key(key, renamings, converters, skeleton.base_model_prefix, expected)
        if converter is not None:  # a tensor transformers splits or fuses on load: not a one-to-one rename
            raise NameMappingError(f"{key}: transformers converts this tensor on load ({converter}); "
                                   "exporting it is not supported")
        if name not in expected:
            unresolved.append(f"{key} -> {name}")
        out[key] = name
    if unresolved:
        raise NameMappingError(f"{len(unresolved)} checkpoint tensor(s) match no parameter of {cls.__name__}: {unresolved[:5]}")
    return out
