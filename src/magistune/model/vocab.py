"""The model grows to its tokenizer's vocabulary size.

A tokenizer with more tokens than the model has embedding rows (`tokens:` on a SentencePiece file without free
reserved slots, or a Hugging Face tokenizer with added tokens) makes embed_tokens and lm_head grow to that size:
each new row starts at the mean of the existing rows of its matrix (so a new token starts as an "average" token,
neither favoured nor ruled out by the softmax: its logit is the mean logit), and both matrices train. With LoRA they
train in full and are saved with the adapter (PEFT modules_to_save), which `chat`, `evaluate` and `merge` load over
the grown base. Keyed on the tokenizer's size only: a tokenizer with fewer tokens than rows is an error (load.py).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

GROWN_ATTR = "magistune_vocab_growth"  # on the model: (rows before, rows after) when it grew


def grow_vocab(model: nn.Module, n_tokens: int) -> tuple[int, int] | None:
    """Resize the input and output embeddings to `n_tokens` rows, new rows mean-initialised. Returns (old, new)
    rows, or None when the model is already that size."""
    emb = model.get_input_embeddings()
    old = emb.num_embeddings
    if n_tokens <= old:
        return None
    head = model.get_output_embeddings()
    with torch.no_grad():
        mean_in = emb.weight.float().mean(0)
        mean_out = head.weight.float().mean(0) if head is not None else None
        model.resize_token_embeddings(n_tokens, mean_resizing=False)
        emb = model.get_input_embeddings()
        emb.weight[old:] = mean_in.to(emb.weight.dtype)
        head = model.get_output_embeddings()
        if head is not None and mean_out is not None and head.weight is not emb.weight:
            head.weight[old:] = mean_out.to(head.weight.dtype)
    setattr(model, GROWN_ATTR, (old, n_tokens))
    print(f"note: the tokenizer has {n_tokens} tokens, the model {old} embedding rows: embed_tokens and lm_head grow "
          f"by {n_tokens - old} rows (each new row starts as the mean of the existing rows)", file=sys.stderr)
    return old, n_tokens


def vocab_growth(model: nn.Module) -> tuple[int, int] | None:
    base = getattr(model, "get_base_model", lambda: model)()
    return getattr(base, GROWN_ATTR, None)


def embedding_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the input embedding and lm_head (PEFT's modules_to_save matches them as suffixes)."""
    targets = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return [name for name, m in model.named_modules() if any(m is t for t in targets)]


def unfreeze_embeddings(model: nn.Module) -> None:
    """Full fine-tuning of a grown model: the embeddings and lm_head train, whatever unfrozen_parameters froze."""
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        if m is not None:
            for p in m.parameters():
                p.requires_grad = True
