"""`magistune merge`: a LoRA adapter folded into its base weights, written as a plain bf16 Hugging Face model.

For each targeted module the merged weight is W' = W + s · B @ A, with s = lora_alpha / r (lora_alpha / √r
with rsLoRA), A the (r × in) and B the (out × r) matrix; for an embedding PEFT stores A as (r × vocab) and
B as (dim × r), so W' = W + s · (B @ A)ᵀ. The sum is computed in fp32 and rounded to bf16 once. A module trained
in full (PEFT modules_to_save: train_projector's projector, a grown vocabulary's embed_tokens and lm_head) replaces
the base tensor, with its own shape; a grown vocabulary's size goes into config.json.

Tensor by tensor. The base checkpoint is read one tensor at a time (safetensors.safe_open), merged, written
into output shards whose header was planned up front (model_files/shards.py), and freed. Anonymous memory therefore
peaks at about one tensor: the bf16 input, its fp32 copy, the fp32 B @ A product inside addmm and the bf16
result, 2 + 4 + 4 + 2 = 12 bytes per weight. For Magistral Small the largest tensor is embed_tokens or
lm_head, 131,072 × 5,120 = 671M weights = 8 GB if LoRA targets it (lm_head in lora_target_modules), else the
largest merged linear, gate/up/down at 5,120 × 32,768 = 168M weights = 2.0 GB (an untouched tensor is only
copied: 1.34 GB for the embedding). Plus the adapter's A and B (r = 16, all linears: 92M fp32 = 0.37 GB), read
on demand. Against 2 × 47 GB for "load the model, merge, save". The input file's pages that safe_open maps
also count in the process's RSS while its shard is open (≤ one 5 GB shard, clean page cache the kernel can
drop): `peak_rss_mib` in the report includes them, `peak_tensor_mib` does not.

QLoRA. A QLoRA run trained its adapter on a 4-bit copy of the base; the merge adds it to the original bf16
checkpoint (the 4-bit weights were derived from it, and dequantising them would bake the quantisation error
into the merged model). The merged model therefore equals "bf16 base + adapter", which differs from the
model as trained by the NF4 rounding of the base.
"""

from __future__ import annotations

import json
import math
import re
import resource
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from magistune.hf_tokenizer import copy_tokenizer_files, is_hf_tokenizer_file
from magistune.export.names import param_names
from magistune.model_files.shards import DEFAULT_SHARD_BYTES, TensorReader, TensorSpec, checkpoint_files, read_specs, write_sharded
from magistune.model_files.system_prompt import SYSTEM_PROMPT_FILE

PREFIX = "base_model.model."  # PEFT's prefix in front of the model's own module names
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SKIP_FILES = {"model.safetensors.index.json", "params.json", "adapter_config.json"}


class MergeError(ValueError):
    pass


@dataclass
class LoraAdapter:
    """What a PEFT LoRA adapter folder holds, read from its config and the names in its safetensors file."""

    path: Path
    scale: float
    modules: dict[str, tuple[str, str, str]]  # module name → (A key, B key, "linear" | "embedding")
    # parameter name → key of a weight the adapter holds whole (loaded over the base): a base layer PEFT saved, or a
    # modules_to_save module's trained copy (a grown vocabulary's embed_tokens / lm_head, with more rows)
    base_layers: dict[str, str]
    reader: TensorReader

    @classmethod
    def read(cls, adapter_dir: Path) -> "LoraAdapter":
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        _check_supported(cfg, adapter_dir)
        r, alpha = cfg["r"], cfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.is_file():
            raise MergeError(f"{adapter_dir}: no adapter_model.safetensors")
        keys = [spec.name for _, spec in read_specs([weights])]
        parts: dict[str, dict[str, str]] = {}
        base_layers: dict[str, str] = {}
        trained: dict[str, str] = {}  # parameter name → key of a modules_to_save tensor (replaces the base's)
        saved_modules = cfg.get("modules_to_save") or []
        for key in keys:
            if not key.startswith(PREFIX):
                raise MergeError(f"{weights}: unexpected tensor {key} (not under {PREFIX})")
            name = key[len(PREFIX):]
            for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                                 (".lora_embedding_A", "eA"), (".lora_embedding_B", "eB")):
                if name.endswith(suffix):
                    parts.setdefault(name[:-len(suffix)], {})[slot] = key
                    break
            else:
                if name.endswith(".base_layer.weight"):
                    base_layers[name[:-len(".base_layer.weight")] + ".weight"] = key
                elif ".original_module." in name:
                    continue  # the frozen copy PEFT keeps beside a modules_to_save module: not used
                elif ".modules_to_save." in name:  # a module trained in full, spelled with its wrapper's names
                    module, _, param = name.partition(".modules_to_save.")
                    trained[f"{module}.{param.removeprefix('default.')}"] = key
                elif any(re.search(rf"(?:^|\.){re.escape(m)}\.", name) for m in saved_modules):
                    trained.setdefault(name, key)  # a modules_to_save parameter, as PEFT names it in the model
                else:
                    raise MergeError(f"{weights}: tensor {key} is not a LoRA matrix; this adapter type cannot be merged")
        modules = {}
        for module, p in parts.items():
            if set(p) == {"A", "B"}:
                modules[module] = (p["A"], p["B"], "linear")
            elif set(p) == {"eA", "eB"}:
                modules[module] = (p["eA"], p["eB"], "embedding")
            else:
                raise MergeError(f"{weights}: module {module} has LoRA parts {sorted(p)}; expected A and B")
        base_layers.update(trained)  # the trained copy wins over a saved base layer of the same parameter
        return cls(adapter_dir, scale, modules, base_layers, TensorReader({k: weights for k in keys}))

    def delta_into(self, module: str, w32: torch.Tensor) -> None:
        """w32 += scale · B @ A (transposed for an embedding), in place, in fp32."""
        a_key, b_key, kind = self.modules[module]
        a, b = self.reader.get(a_key).float(), self.reader.get(b_key).float()
        if kind == "linear":
            w32.addmm_(b, a, alpha=self.scale)  # (out × r) @ (r × in)
        else:
            w32.addmm_(a.T, b.T, alpha=self.scale)  # (B @ A)ᵀ = Aᵀ @ Bᵀ: (vocab × r) @ (r × dim)


def _check_supported(cfg: dict, where: Path) -> None:
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')} (only LORA)")
    for key, why in (("use_dora", "DoRA rescales each row by a learned magnitude"),
                     ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas"),
                     ("fan_in_fan_out", "transposed (Conv1D) weights"),
                     ("lora_bias", "LoRA biases"), ("layer_replication", "replicated layers"),
                     ("trainable_token_indices", "trained token rows"), ("target_parameters", "parameter targets")):
        if cfg.get(key):
            problems.append(f"{key} ({why})")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias: {cfg['bias']} (trained biases)")
    if problems:
        raise MergeError(f"{where}: this adapter uses {', '.join(problems)}, which magistune's streaming merge "
                         "does not implement; use PEFT's merge_and_unload on the loaded model instead")


@dataclass
class MergeReport:
    out_dir: Path
    files: list[Path]
    tensors: int
    merged: list[str] = field(default_factory=list)  # checkpoint tensors that received a LoRA update
    bytes_written: int = 0
    peak_tensor_mib: float = 0.0  # the largest live set of tensors this merge held at once
    peak_rss_mib: float = 0.0  # the process's peak resident set (ru_maxrss), imports and mapped pages included


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, tokenizer_file: Path | None = None,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, trust_remote_code: bool = False) -> MergeReport:
    """Merge `adapter_dir` into the checkpoint in `base_dir`; write a bf16 Hugging Face model to `out_dir`."""
    from magistune.model.load import check_model_dir

    if out_dir.exists() and any(out_dir.iterdir()):  # stale shards of an earlier merge would mix with ours
        raise MergeError(f"--output: {out_dir} is not empty; choose a new folder")
    config = check_model_dir(base_dir, trust_remote_code=trust_remote_code)
    adapter = LoraAdapter.read(adapter_dir)
    located = read_specs(checkpoint_files(base_dir))
    to_param = param_names(config, [s.name for _, s in located])
    by_param = {p: k for k, p in to_param.items()}
    missing = [m for m in adapter.modules if f"{m}.weight" not in by_param]
    missing += [p for p in adapter.base_layers if p not in by_param]
    if missing:
        raise MergeError(f"{adapter_dir}: {len(missing)} adapter module(s) are not in the base checkpoint {base_dir} "
                         f"(was it trained on another model?): {missing[:5]}")
    lora_of = {by_param[f"{m}.weight"]: m for m in adapter.modules}  # checkpoint key → adapter module
    saved_base = {by_param[p]: k for p, k in adapter.base_layers.items()}  # checkpoint key → adapter key

    out_dir.mkdir(parents=True, exist_ok=True)
    reader = TensorReader({s.name: path for path, s in located})
    saved_shape = {s.name: s.shape for _, s in read_specs([adapter_dir / "adapter_model.safetensors"])}
    specs = [TensorSpec(s.name, torch.bfloat16 if s.dtype.is_floating_point else s.dtype,
                        saved_shape[saved_base[s.name]] if s.name in saved_base else s.shape) for _, s in located]
    grown = {spec.shape[0] for spec, (_, s) in zip(specs, located) if spec.shape[0] != s.shape[0]}
    report = MergeReport(out_dir, [], len(specs))

    def produce(spec: TensorSpec) -> torch.Tensor:
        w = adapter.reader.get(saved_base[spec.name]) if spec.name in saved_base else reader.get(spec.name)
        live = w.nbytes
        if spec.name in lora_of:
            w32 = w.float()
            live += w32.nbytes * 2  # + addmm's B @ A product
            adapter.delta_into(lora_of[spec.name], w32)
            w = w32.to(torch.bfloat16)
            live += w.nbytes
            report.merged.append(spec.name)
            del w32
        elif w.is_floating_point() and w.dtype != torch.bfloat16:
            w = w.to(torch.bfloat16)
            live += w.nbytes
        report.peak_tensor_mib = max(report.peak_tensor_mib, live / 2**20)
        return w

    try:
        report.files = write_sharded(out_dir, specs, produce, max_shard_bytes)
    finally:
        reader.close()
        adapter.reader.close()
    report.bytes_written = sum(s.nbytes for s in specs)
    copy_side_files(base_dir, out_dir, tokenizer_file, vocab_size=max(grown) if grown else None)
    if (adapter_dir / SYSTEM_PROMPT_FILE).is_file():  # the prompt training used wins over the base model's
        shutil.copyfile(adapter_dir / SYSTEM_PROMPT_FILE, out_dir / SYSTEM_PROMPT_FILE)
    report.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return report


def copy_side_files(src: Path, out_dir: Path, tokenizer_file: Path | None = None, vocab_size: int | None = None) -> None:
    """config.json (dtype bf16), generation config, tokenizer and processor files: everything but weights.
    `vocab_size`: the grown vocabulary's rows (model/vocab.py), written into the (text) config."""
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and f.name not in SKIP_FILES and f.name != "config.json":
            shutil.copyfile(f, out_dir / f.name)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    for holder in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in holder:
                holder[key] = "bfloat16"
    config.setdefault("dtype", "bfloat16")
    if vocab_size is not None:
        (config.get("text_config") or config)["vocab_size"] = vocab_size
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer_file is not None and Path(tokenizer_file).is_file():
        copy_tokenizer_files(tokenizer_file, out_dir)  # tekken.json, or tokenizer.json and its siblings
        if is_hf_tokenizer_file(tokenizer_file):  # trained with the HF tokenizer: it is the folder's only one
            for f in [out_dir / "tekken.json", *out_dir.glob("tokenizer.model.v*")]:
                f.unlink(missing_ok=True)
