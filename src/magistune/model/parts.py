"""Which module is what: the language model, and everything around it.

Both supported architectures are a Mistral decoder (`MistralModel`) plus parts around it:

    MistralForCausalLM                  Mistral3ForConditionalGeneration
      model        <- MistralModel        model.vision_tower           (Pixtral)
      lm_head                             model.multi_modal_projector
                                          model.language_model         <- MistralModel
                                          lm_head

Quantisation and LoRA touch only the decoder's linears (q, k, v, o, gate, up, down). Everything here finds
modules by class, never by name, so it follows whatever attribute names transformers uses.
"""

from __future__ import annotations

import torch.nn as nn
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, MistralForCausalLM
from transformers import MistralModel, PretrainedConfig

# config class -> model class; the only place that decides which architectures magistune trains.
ARCHITECTURES: dict[type[PretrainedConfig], type[nn.Module]] = {
    MistralConfig: MistralForCausalLM,
    Mistral3Config: Mistral3ForConditionalGeneration,
}


def model_class(config: PretrainedConfig) -> type[nn.Module] | None:
    for config_cls, cls in ARCHITECTURES.items():
        if isinstance(config, config_cls):
            return cls
    return None


def model_kind(config: PretrainedConfig) -> str:
    return "vision" if isinstance(config, Mistral3Config) else "text"


def decoder_prefix(model: nn.Module) -> str:
    """The qualified name of the one `MistralModel` inside `model` ("model" or "model.language_model").

    A PEFT-wrapped model gives the name inside the wrapper ("base_model.model.model...").
    """
    found = [name for name, m in model.named_modules() if isinstance(m, MistralModel)]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__}: expected one MistralModel decoder, found {len(found)}: {found}")
    return found[0]


def outside_decoder(model: nn.Module) -> list[str]:
    """The largest modules that hold weights and do not belong to the decoder.

    Walks down from the root: a module that contains the decoder is opened up, any other module with
    parameters is returned whole. ["lm_head"] for the text model; for the vision model
    ["model.vision_tower", "model.multi_modal_projector", "lm_head"].
    """
    prefix = decoder_prefix(model)
    out: list[str] = []

    def visit(module: nn.Module, name: str) -> None:
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full == prefix:
                continue
            if prefix.startswith(full + "."):
                visit(child, full)
            elif any(True for _ in child.parameters()):
                out.append(full)

    visit(model, "")
    return out


def in_decoder(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def vision_parts(model: nn.Module) -> dict[str, str]:
    """{"vision_tower": name, "projector": name} of a Mistral3 model (found by class); {} for a text model."""
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector
    from transformers.models.pixtral.modeling_pixtral import PixtralVisionModel

    found = {}
    for name, m in model.named_modules():
        if isinstance(m, PixtralVisionModel):
            found.setdefault("vision_tower", name)
        elif isinstance(m, Mistral3MultiModalProjector):
            found.setdefault("projector", name)
    return found
