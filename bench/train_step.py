"""One training configuration on real Magistral Small shapes with random weights: tok/s and peak GPU memory.

    python bench/train_step.py --side magistune --seq 2048 --mbs 2 --accum 4 [--layers 40] [--steps 3]

Sides (same random NF4 model from magistune.model.random_init, same LoRA r/alpha/dropout/targets, same
8-bit AdamW, bf16 autocast, non-reentrant gradient checkpointing; every token trained):
    magistune      our loop: apply_lora, token-normalised forward_backward, chunked loss on trained positions
    reference      the stock stack Axolotl runs on: PEFT get_peft_model on bnb Linear4bit, HF loss
                   (model(input_ids, labels=...).loss / accum)
    reference-cce  the same with Cut Cross Entropy's linear_cross_entropy on the last hidden states
One JSON line per run goes to --out (appended). Run each configuration in its own process so that peak
memory is its own: bench/run_gpu.sh does that, then bench/report.py writes the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def config_for(args) -> "object":
    from magistune.config import parse_config

    raw = {
        "base_model": "bench", "datasets": [{"path": "bench.jsonl"}], "sequence_len": args.seq,
        "adapter": "qlora", "load_in_4bit": True, "lora_r": 32, "lora_alpha": 16, "lora_dropout": 0.05,
        "lora_target_linear": True, "micro_batch_size": args.mbs, "gradient_accumulation_steps": args.accum,
        "optimizer": "adamw_bnb_8bit", "learning_rate": 2e-4, "bf16": True, "gradient_checkpointing": True,
    }
    return parse_config(raw)[0]


def model_config(args):
    from magistune.model.tiny import magistral_small_config, magistral_small_vision_config, tiny_text_config, tiny_vision_config

    if args.vision:
        if args.tiny:
            return tiny_vision_config()
        config = magistral_small_vision_config()
        config.text_config.num_hidden_layers = args.layers
        return config
    if args.tiny:
        return tiny_text_config()
    config = magistral_small_config()
    config.num_hidden_layers = args.layers
    return config


def vision_batch(args):
    """One image conversation through the real data pipeline: a random args.image_px² image in the user turn,
    an assistant answer that fills the sequence; only the answer is trained (image and prompt masked)."""
    import io

    import numpy as np
    from PIL import Image

    from magistune.data.encode import ConversationEncoder
    from magistune.data.records import RecordOptions
    from magistune.data.sample import Sample
    from magistune.tokenizer import SpecialIds, load_tokenizer, tiny_tokenizer_path
    from magistune.train.batches import collate

    tok = load_tokenizer(tiny_tokenizer_path())  # v13 Tekken with 2509's image settings (patch 14, merge 2)
    buf = io.BytesIO()
    px = np.random.default_rng(0).integers(0, 255, (args.image_px, args.image_px, 3), dtype=np.uint8)
    Image.fromarray(px).save(buf, format="PNG")
    image = Path(tempfile.mkdtemp()) / "img.png"
    image.write_bytes(buf.getvalue())
    enc = ConversationEncoder(tok)
    answer = "word " * args.seq
    record = {"messages": [{"role": "user", "content": [{"type": "image", "path": str(image)},
                                                        {"type": "text", "text": "Describe the image."}]},
                           {"role": "assistant", "content": answer}]}
    from magistune.data.images import ImageOptions
    from magistune.data.records import parse_record

    ids, labels, images = enc.encode(parse_record(record, RecordOptions(supports_images=True, images=ImageOptions())))
    sample = Sample(ids[:args.seq], labels[:args.seq], "bench", images)
    return collate([sample] * args.mbs, SpecialIds.of(tok).pad, tok.instruct_tokenizer.image_encoder)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["magistune", "reference", "reference-cce"], required=True)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--tiny", action="store_true", help="the tiny model on CPU: a smoke test of this script")
    p.add_argument("--vision", action="store_true", help="Magistral Small 2509 (Mistral3) on image conversations")
    p.add_argument("--image-px", type=int, default=1024, help="--vision: the image's side in pixels")
    p.add_argument("--out", default="bench_train_step.jsonl")
    args = p.parse_args()

    from magistune.model.adapt import apply_lora, enable_checkpointing
    from magistune.model.random_init import random_model
    from magistune.train.batches import Batch
    from magistune.train.loss import forward_backward, token_loss_sum
    from magistune.train.optim import build_optimizer

    device = torch.device("cpu" if args.tiny else "cuda")
    cfg = config_for(args)
    if args.tiny:
        cfg.bf16 = False
    t0 = time.perf_counter()
    model, info = random_model(model_config(args), cfg, device)
    build_s = time.perf_counter() - t0
    vocab = model.config.get_text_config().vocab_size
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None

    if args.side == "magistune":
        model = apply_lora(model, cfg)
        enable_checkpointing(model)
    else:
        from peft import LoraConfig, get_peft_model

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    optimizer = build_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(0)

    fixed = vision_batch(args) if args.vision else None

    def micro_batch() -> Batch:
        if fixed is not None:
            return fixed
        ids = torch.randint(1000, vocab, (args.mbs, args.seq), generator=gen)
        return Batch(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids), sources=["random"] * args.mbs)

    def reference_step(micro: list[Batch]) -> None:
        for b in micro:
            b = b.to(device)
            with autocast() if autocast else torch.enable_grad():
                if args.side == "reference":
                    loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
                else:
                    from cut_cross_entropy import linear_cross_entropy

                    base = model.get_base_model()
                    hidden = base.model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
                    loss = linear_cross_entropy(hidden, base.lm_head.weight, b.labels, shift=1)
            (loss / args.accum).backward()

    def step() -> None:
        micro = [micro_batch() for _ in range(args.accum)]
        if args.side == "magistune":
            forward_backward(model, micro, token_loss_sum, autocast or __import__("contextlib").nullcontext, device)
        else:
            reference_step(micro)
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = args.steps * args.accum * (fixed.n_tokens if fixed is not None else args.mbs * args.seq)
    row = {
        "side": args.side + ("-vision" if args.vision else ""), "image_px": args.image_px if args.vision else None, "seq": args.seq, "mbs": args.mbs, "accum": args.accum, "layers": args.layers,
        "steps": args.steps, "tokens_per_s": round(tokens / seconds, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "weights_gib": round(info.weight_bytes / 2**30, 2), "build_s": round(build_s, 1),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__, "bitsandbytes": __import__("bitsandbytes").__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
