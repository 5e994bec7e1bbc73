"""The Unsloth side of bench/train_step.py: the same random-weight Magistral Small, LoRA, optimiser and batches.

    python bench/unsloth_step.py --seq 2048 --mbs 2 --accum 4 [--layers 40] [--steps 3] [--dropout 0.05]
        [--folder bench/scratch/magistral-small-L40-bnb-4bit] [--out bench_train_step.jsonl]
    python bench/unsloth_step.py --tiny --save-only --folder DIR   (CPU: writes the tiny model's folder only)

Unsloth loads models from folders, so the model train_step.py builds in memory (random_model(), seed 0, NF4 +
double quantisation, bf16 compute, lm_head and embeddings unquantised) is saved once as a bnb-4bit folder
(config.json with its quantization_config, model.safetensors with the packed weights and quant states; 14 GB for
40 layers) plus an HF tokenizer converted from the Tekken file magistune's tiny models use (131,072 ids, the real
control-token ranks). A later run with the same --layers reuses the folder. Then, as Unsloth's users train:
FastLanguageModel.from_pretrained(folder, load_in_4bit=True), get_peft_model(r=32, alpha=16, --dropout, all 7
projections, use_gradient_checkpointing="unsloth"), and the model's own loss on every token (labels = ids). The
step itself is train_step.py's reference step: bf16 autocast, loss / accum, clip 1.0, magistune's 8-bit AdamW
(build_optimizer). Unsloth 2026.10.9 fuses LoRA dropout into its LoRA kernels (UNSLOTH_FUSED_LORA_DROPOUT, on
unless set to 0), so dropout 0.05 runs its fast path too; the row records the dropout and that setting.
One JSON line (side "unsloth", train_step.py's keys plus the Unsloth versions) goes to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--dropout", type=float, default=0.05, help="lora_dropout (as train_step.py)")
    p.add_argument("--folder", default=None, help="the bnb-4bit model folder (default bench/scratch/unsloth-L<layers>)")
    p.add_argument("--tiny", action="store_true", help="the tiny model (2 layers, 64 wide) instead of Magistral Small")
    p.add_argument("--save-only", action="store_true", help="write the folder and stop (--tiny runs on the CPU)")
    p.add_argument("--out", default="bench_train_step.jsonl")
    args = p.parse_args(argv)
    if min(args.seq, args.mbs, args.accum, args.steps, args.layers) < 1 or args.warmup < 0:
        p.error("--seq, --mbs, --accum, --steps and --layers must be at least 1, --warmup at least 0")
    if not 0 <= args.dropout < 1:
        p.error("--dropout must be in [0, 1)")
    if args.tiny and not args.save_only:
        p.error("--tiny only writes the folder (--save-only): Unsloth trains on a GPU")
    if args.folder is None:
        name = "tiny-bnb-4bit" if args.tiny else f"magistral-small-L{args.layers}-bnb-4bit"
        args.folder = str(Path(__file__).parent / "scratch" / name)
    return args


def bench_cfg():
    from magistune.config import parse_config

    return parse_config({"base_model": "bench", "datasets": [{"path": "bench.jsonl"}], "adapter": "qlora",
                         "load_in_4bit": True, "lora_r": 32, "lora_alpha": 16, "lora_target_linear": True,
                         "optimizer": "adamw_bnb_8bit", "learning_rate": 2e-4, "bf16": True,
                         "gradient_checkpointing": True})[0]


def write_tokenizer(folder: Path) -> None:
    """An HF fast tokenizer converted from the Tekken file (transformers' own converter), <pad> as pad token."""
    from transformers.integrations.mistral import convert_tekken_tokenizer

    from magistune.tokenizer import tiny_tokenizer_path

    tok = convert_tekken_tokenizer(str(tiny_tokenizer_path()))
    tok.pad_token = "<pad>"  # id 11 in Tekken: the config's pad_token_id, so tokenizer and model agree
    tok.save_pretrained(str(folder))


def save_bnb4_folder(folder: Path, layers: int, tiny: bool, device: torch.device) -> float:
    """Build train_step.py's model (random_model, seed 0) and save it as a bnb-4bit folder; the seconds it took.
    Written under a temporary name and renamed at the end, so a folder that exists is complete."""
    from transformers import BitsAndBytesConfig

    from magistune.model.parts import outside_decoder
    from magistune.model_files.tiny import tiny_text_config
    from random_model import magistral_small_config, random_model

    t0 = time.perf_counter()
    config = tiny_text_config() if tiny else magistral_small_config()
    if not tiny:
        config.num_hidden_layers = layers
    cfg = bench_cfg()
    model, _ = random_model(config, cfg, device)  # seed 0, as train_step.py's sides
    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=outside_decoder(model))
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial), safe_serialization=True, max_shard_size="5GB")
    write_tokenizer(partial)
    partial.rename(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def load_unsloth(folder: Path, args) -> tuple[torch.nn.Module, int, int]:
    """Unsloth's model with its LoRA, the bytes of the loaded base weights (model_info, as random_model) and the
    number of trainable (LoRA) parameters."""
    from unsloth import FastLanguageModel

    from magistune.model.load import model_info

    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=args.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True, local_files_only=True)
    weight_bytes = model_info(model).weight_bytes
    model = FastLanguageModel.get_peft_model(model, r=32, lora_alpha=16, lora_dropout=args.dropout,
                                             target_modules=TARGETS, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=0)
    FastLanguageModel.for_training(model)
    return model, weight_bytes, model_info(model).trainable_params


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "trl", "datasets"):
        try:
            out[name] = torch.__version__ if name == "torch" else version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def row_for(args, tokens_per_s: float, peak_gib: float | None, weights_gib: float, build_s: float, gpu: str,
            attn: str | None = None, trainable: int | None = None) -> dict:
    """train_step.py's row (the same keys, so bench/report.py tables it), side "unsloth"."""
    from train_step import magistune_version

    return {
        "side": "unsloth", "image_px": None, "seq": args.seq, "mbs": args.mbs, "accum": args.accum,
        "layers": args.layers, "attn": attn, "packing": False, "random_lengths": False,
        "packing_efficiency": None, "padding_share": None, "cce": False, "offload": False, "dropout": args.dropout,
        "liger": False, "compile": False, "tiled_mlp": 0, "kernels": False, "keep_weights": False, "fp8": None,
        "no_ckpt": 0, "profiled": False, "steps": args.steps,
        "tokens_per_s": round(tokens_per_s, 1), "peak_gib": peak_gib, "weights_gib": weights_gib,
        "trainable_params": trainable,
        "unsloth_fused_lora_dropout": os.environ.get("UNSLOTH_FUSED_LORA_DROPOUT", "1") != "0",
        "build_s": round(build_s, 1), "gpu": gpu, **versions(), "magistune": magistune_version(),  # the bench's code
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.save_only:
        import unsloth  # noqa: F401  first: it patches transformers and peft when imported before them
    folder = Path(args.folder)
    device = torch.device("cpu" if args.tiny else "cuda")
    build_s = 0.0
    if folder.is_dir():
        print(f"note: reusing the model folder {folder}", flush=True)
    else:
        build_s = save_bnb4_folder(folder, args.layers, args.tiny, device)
        gc.collect()
        print(f"note: saved the bnb-4bit folder {folder} in {build_s:.0f} s", flush=True)
    if args.save_only:
        return

    from magistune.train.optim import build_optimizer

    t0 = time.perf_counter()
    model, weight_bytes, trainable = load_unsloth(folder, args)
    print(f"note: {trainable:,} trainable parameters", flush=True)
    build_s += time.perf_counter() - t0
    optimizer = build_optimizer(model, bench_cfg(), device)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)  # train_step.py's token stream

    def step() -> None:
        for _ in range(args.accum):
            ids = torch.randint(1000, vocab, (args.mbs, args.seq), generator=gen).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone()).loss
            (loss / args.accum).backward()
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = args.steps * args.accum * args.mbs * args.seq
    row = row_for(args, tokens / seconds, round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  round(weight_bytes / 2**30, 2), build_s, torch.cuda.get_device_name(),
                  model.config.get_text_config()._attn_implementation, trainable)
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub: the folder is local
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # Unsloth otherwise downloads a README to count runs
    main()
