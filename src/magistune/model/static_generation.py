"""Sampling with a static KV cache and, on CUDA, the decode step captured once as a CUDA graph.

The same loop as generation.generate_ids (left padding, positions, temperature + top-p, a stop on `</s>`), with
the decoder run layer by layer here instead of through the model's forward, so that every tensor of a decode
step has a fixed address and shape:

    cache  k, v: layers × (B, kv_heads, L, head_dim), L = longest prompt + max new tokens; column c holds the
           token at column c of the left-padded rows, so decode step k writes column W + k for every row
    mask   (B, 1, 1, L) bool: key c is visible when it is a real token (not left padding) and already written
    step   embed → per layer: norm, q/k/v (the LoRA-wrapped 4-bit linears, called as they are), RoPE, cache
           write (index_copy_ at a (1,) column tensor), SDPA (grouped-query), o_proj, norm, MLP → norm → lm_head

On CUDA the decode step is captured once per call (after the prefill) and replayed for each token: one launch
instead of thousands (40 layers × 7 LoRA linears × dequantise + matmul + 2 LoRA matmuls + the rest). The
sampling (sample_next with the caller's generator) stays outside the graph, so the random stream is the plain
loop's. On the CPU the same step runs eagerly: tests/model compares it with generate_ids token for token.

Memory: the cache is 2 × 40 layers × 8 kv heads × 128 × 2 B = 160 KiB per token per row (Magistral Small, bf16):
8 rows × (256 + 512) tokens = 0.94 GiB, allocated once per call.

Supported: MistralConfig text decoders (Magistral Small 2506/2507, and 2509's language model) without a sliding
window; attention runs through torch's SDPA whatever attn_implementation the model trains with (the same softmax
attention). `static_unsupported(model)` says why another model is not; the caller then uses the
plain loop.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import MistralConfig
from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

from magistune.model.generation import SamplingOptions, make_generator, max_positions, sample_next


def text_decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the text decoder: embed_tokens, layers, norm, rotary_emb; lm_head), through a PEFT wrapper if any."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, inner.base_model_prefix, None)
    decoder = getattr(body, "language_model", body)  # Mistral3Model keeps the text decoder there
    return decoder, inner.get_output_embeddings()


def static_unsupported(model: nn.Module) -> str | None:
    """None when the static path can run this model, else why not."""
    decoder, head = text_decoder_and_head(model)
    config = getattr(decoder, "config", None)
    if not isinstance(config, MistralConfig):
        return f"the static-cache sampler supports Mistral text decoders, not {type(config).__name__}"
    if config.sliding_window is not None:
        return "the static-cache sampler has no sliding window"
    if head is None or not all(hasattr(decoder, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the static-cache sampler did not find the decoder's embed_tokens, layers, norm and rotary_emb"
    return None


class StaticDecoder:
    """The decoder's forward over a static KV cache of `length` columns for `rows` rows."""

    def __init__(self, model: nn.Module, rows: int, length: int, dtype: torch.dtype, device: torch.device):
        self.decoder, self.head = text_decoder_and_head(model)
        config = self.decoder.config
        self.kv_heads, self.head_dim = config.num_key_value_heads, getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        shape = (rows, self.kv_heads, length, self.head_dim)
        n = len(self.decoder.layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]

    def attention(self, i: int, layer: nn.Module, h: torch.Tensor, cos_sin, columns: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        b, q_len, _ = h.shape
        q = attn.q_proj(h).view(b, q_len, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, q_len, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, q_len, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        self.keys[i].index_copy_(2, columns, k.to(self.keys[i].dtype))
        self.values[i].index_copy_(2, columns, v.to(self.values[i].dtype))
        keys, values = self.keys[i], self.values[i]
        out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                             scale=attn.scaling, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """(B, Q) ids at (B, Q) positions written to cache `columns` (Q,), `mask` (B, 1, Q, L) → (B, V) logits of
        the last column."""
        h = self.decoder.embed_tokens(ids)
        cos_sin = self.decoder.rotary_emb(h, positions)
        for i, layer in enumerate(self.decoder.layers):
            h = h + self.attention(i, layer, layer.input_layernorm(h), cos_sin, columns, mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.head(self.decoder.norm(h[:, -1:]))[:, -1]


def prefill_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B, W) left-padding mask → (B, 1, W, L) bool: query i sees key j ≤ i when j is a real token. A padding
    query (which sees nothing) sees itself, so that SDPA gives finite values nobody reads (as HF does)."""
    b, w = mask.shape
    keys = torch.zeros((b, length), dtype=torch.bool, device=mask.device)
    keys[:, :w] = mask.bool()
    causal = torch.ones((w, length), dtype=torch.bool, device=mask.device).tril()
    out = causal[None] & keys[:, None, :]
    out |= torch.eye(w, length, dtype=torch.bool, device=mask.device)[None] & ~out.any(-1, keepdim=True)
    return out[:, None]


class DecodeStep:
    """One decode step on fixed buffers: eager, or replayed from a CUDA graph captured at the first call."""

    def __init__(self, decoder: StaticDecoder, rows: int, length: int, device: torch.device, graph: bool,
                 autocast_dtype: torch.dtype | None):
        self.decoder, self.graph_wanted, self.autocast_dtype = decoder, graph, autocast_dtype
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.column = torch.zeros((1,), dtype=torch.long, device=device)
        self.mask = torch.zeros((rows, 1, 1, length), dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _eager(self) -> torch.Tensor:
        ctx = (torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False) if self.autocast_dtype
               else contextlib.nullcontext())  # the autocast cache must not hold tensors across a capture
        with ctx:
            return self.decoder.forward(self.ids, self.positions, self.column, self.mask)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs asks
            for _ in range(2):
                self._eager()  # writing the same column twice: idempotent
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._eager()
        self.graph = graph

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, column: int, mask: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.column.fill_(column)
        self.mask.copy_(mask)
        if not self.graph_wanted:
            return self._eager()
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as e:  # an op that cannot be captured: the same step, eagerly, from now on
                warnings.warn(f"the decode step could not be captured as a CUDA graph ({e}); it runs eagerly")
                self.graph_wanted = False
                torch.cuda.synchronize()
                return self._eager()
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate_ids_static(model: nn.Module, prompts: list[list[int]], eos: int, pad: int, opts: SamplingOptions,
                        generator: torch.Generator | None = None, graph: bool | None = None) -> list[list[int]]:
    """generation.generate_ids's result (each row's new ids, `eos` last when it stopped) through the static cache;
    `graph` (default: on CUDA) replays the decode step from a CUDA graph. Check static_unsupported(model) first."""
    device = next(model.parameters()).device
    graph = device.type == "cuda" if graph is None else graph
    limit = max_positions(model)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= limit:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context is {limit}")
    budget = [min(opts.max_tokens, limit - len(p)) for p in prompts]
    rows, width = len(prompts), max(len(p) for p in prompts)
    length = width + max(budget)
    ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros((rows, length), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):width] = True
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask[:, :width].long().cumsum(-1) - 1).masked_fill(~mask[:, :width], 1)
    generator = generator if generator is not None else make_generator(opts, device)
    autocast_dtype = torch.get_autocast_dtype("cuda") if device.type == "cuda" and torch.is_autocast_enabled("cuda") \
        else None
    dtype = autocast_dtype or next(p for p in model.parameters() if p.is_floating_point()).dtype
    decoder = StaticDecoder(model, rows, length, dtype, device)
    logits = decoder.forward(ids, positions, torch.arange(width, device=device), prefill_mask(mask[:, :width], length))
    step_fn = DecodeStep(decoder, rows, length, device, graph, autocast_dtype)

    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * rows
    positions = positions[:, -1:]
    for column in range(width, length):
        next_ids = sample_next(logits, opts, generator).tolist()
        step: list[int | None] = []
        for i, t in enumerate(next_ids):
            if done[i]:
                step.append(None)
                continue
            out[i].append(t)
            step.append(t)
            done[i] = t == eos or len(out[i]) >= budget[i]
        if all(done) or column == length - 1:
            return out
        feed = torch.tensor([[pad if s is None else s] for s in step], dtype=torch.long, device=device)
        mask[:, column] = True
        positions = positions + 1
        logits = step_fn(feed, positions, column, mask[:, None, None, :])
    return out
