"""A QLoRA DPO step on real Magistral Small shapes with random weights: magistune beside TRL's DPOTrainer.

    python bench/dpo_step.py --side magistune|trl [--prompt 1024 --answer 1024] [--layers 40] [--steps 4]
        [--dropout 0.05] [--tiny | --tiny-nf4] [--out bench_dpo_step.jsonl]

One preference pair per micro-batch: a prompt of --prompt tokens, a chosen and a rejected answer of --answer
tokens each (the last one `</s>`), random ids (the same ones for both sides). A step trains on both sequences,
so tok/s counts 2 × (prompt + answer) tokens per pair for both sides, whatever each does inside.

Sides (same random NF4 model from bench/random_model.py, LoRA r=32 alpha=16 on all 7 projections, 8-bit AdamW,
bf16, non-reentrant gradient checkpointing, sigmoid DPO β=0.1 with the adapter-disabled model as reference,
LoRA dropout --dropout on both: TRL's disable_dropout, on by default, is turned off so that it runs there too):
    trl        TRL's DPOTrainer + PEFT (peft_config; precompute_ref_log_probs=False, the reference is the model
               with the adapter disabled, one extra no-grad forward of both sequences), on strings of a word-level
               tokenizer built here in which every id is one word, so its tokenisation gives exactly our ids
               (checked). TRL 1.16 has no max_prompt_length: max_length = prompt + answer truncates nothing.
    magistune  model.adapt_model (LoRA, checkpointing) + train.preference_step's shared-prompt row (the prompt
               encoded once for both answers; reference = reference_pair_logps, the same row with the adapter
               disabled, no grad) + build_optimizer's 8-bit AdamW, as train/dpo.py runs a step.
--tiny: the tiny model on CPU (LoRA without 4-bit, adamw_torch, fp32): a smoke test of this script, both sides;
--tiny-nf4 the same with the tiny model in NF4 (TRL then takes its quantised-model path: adapters cast to bf16).
Timing: --warmup steps (untimed), then --steps timed; peak = torch.cuda.max_memory_allocated after the warm-up.
One JSON line per run goes to --out (appended); run each side in its own process so that peak memory is its
own: bench/run_dpo_gpu.sh does that, then bench/report_dpo.py writes the table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time

import torch


def config_for(args):
    from magistune.config import parse_config

    raw = {
        "base_model": "bench", "datasets": [{"path": "bench.jsonl", "type": "chat_template"}], "rl": "dpo",
        "rl_beta": 0.1, "sequence_len": args.prompt + args.answer,
        "adapter": "qlora" if args.nf4 else "lora", "load_in_4bit": args.nf4,
        "lora_r": 32, "lora_alpha": 16, "lora_dropout": args.dropout, "lora_target_linear": True,
        "micro_batch_size": 1, "gradient_accumulation_steps": 1,
        "optimizer": "adamw_torch" if args.tiny else "adamw_bnb_8bit", "learning_rate": 2e-4,
        "bf16": not args.tiny, "gradient_checkpointing": True,
    }
    return parse_config(raw)[0]


def model_config(args):
    from magistune.model_files.tiny import tiny_text_config
    from random_model import magistral_small_config

    if args.tiny:
        return tiny_text_config()
    config = magistral_small_config()
    config.num_hidden_layers = args.layers
    return config


def random_pairs(args, vocab: int, eos: int) -> list[tuple[list[int], list[int], list[int]]]:
    """warmup + steps pairs of (prompt, chosen, rejected) ids; each answer ends in eos."""
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(1000, vocab, (n,), generator=gen).tolist()

    return [(ids(args.prompt), ids(args.answer - 1) + [eos], ids(args.answer - 1) + [eos])
            for _ in range(args.warmup + args.steps)]


def adapter_dtype(model) -> str:
    return str(next(q for q in model.parameters() if q.requires_grad).dtype).removeprefix("torch.")


def lora_dropout(model) -> float:
    """The LoRA dropout that actually runs (TRL's disable_dropout sets every nn.Dropout's p to 0)."""
    ps = [m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in name]
    return max(ps, default=0.0)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def word_tokenizer(vocab: int, special: dict[str, int]):
    """A Hugging Face fast tokenizer in which id i is the word "t{i}" (the special ids are their own tokens), words
    split on whitespace: a string of N words is exactly N tokens, no BOS or EOS added."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    for token, i in special.items():
        del words[f"t{i}"]
        words[token] = i
    tok = Tokenizer(WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    assert len(out) == vocab, (len(out), vocab)  # the special tokens were not appended past the embedding
    return out


def trl_side(args, model, pairs, device: torch.device) -> dict:
    """TRL's DPOTrainer on the pairs as text; returns seconds of the timed steps and what was checked."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    ids = model.config
    tok = word_tokenizer(model.config.get_text_config().vocab_size,
                         {"<unk>": 0, "<s>": ids.bos_token_id, "</s>": ids.eos_token_id, "<pad>": ids.pad_token_id})

    def text(seq: list[int]) -> str:  # an answer ends in "</s>", which TRL's add_eos then leaves alone
        body, end = (seq[:-1], "</s>") if seq[-1] == tok.eos_token_id else (seq, "")
        return " ".join(tok.convert_ids_to_tokens(body)) + end

    data = Dataset.from_dict({"prompt": [text(p) for p, _, _ in pairs],
                              "chosen": [" " + text(c) for _, c, _ in pairs],
                              "rejected": [" " + text(r) for _, _, r in pairs]})
    timing: dict = {}

    class StepTimer(TrainerCallback):  # global_step counts finished steps: begin sees k, end sees k + 1
        def on_step_begin(self, _args, state, control, **kw):
            if state.global_step == args.warmup:
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                timing["t0"] = time.perf_counter()

        def on_step_end(self, _args, state, control, **kw):
            if state.global_step == args.warmup + args.steps:
                sync(device)
                timing["t1"] = time.perf_counter()
                timing["peak"] = peak_gib(device)  # of the timed steps, before anything train() does after them

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="dpo_step_trl_"), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=1, gradient_accumulation_steps=1, learning_rate=2e-4,
        max_length=args.prompt + args.answer, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False,
        optim="adamw_torch" if args.tiny else "adamw_bnb_8bit", bf16=not args.tiny, use_cpu=args.tiny,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        disable_dropout=False,  # TRL zeroes every dropout by default; both sides run the same LoRA dropout
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_config = LoraConfig(r=32, lora_alpha=16, lora_dropout=args.dropout, task_type="CAUSAL_LM", bias="none",
                             target_modules=projections)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=peft_config,
                         callbacks=[StepTimer()])
    for row, (p, c, r) in zip(trainer.train_dataset, pairs, strict=True):  # TRL's tokenisation gave our ids
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (p, c, r), "TRL's ids differ from ours"
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config  # reference: adapter disabled
    batch = trainer.data_collator([trainer.train_dataset[0]])
    width = args.prompt + args.answer
    assert tuple(batch["input_ids"].shape) == (2, width), batch["input_ids"].shape  # [chosen; rejected], untruncated
    assert batch["completion_mask"].sum(dim=1).tolist() == [args.answer] * 2
    dropout, dtype = lora_dropout(trainer.model), adapter_dtype(trainer.model)  # TRL casts QLoRA adapters to bf16
    mean_loss = trainer.train().training_loss
    return {"seconds": timing["t1"] - timing["t0"], "peak_gib": timing["peak"], "lora_dropout_run": dropout,
            "adapter_dtype": dtype,
            "mean_loss": round(mean_loss, 5),
            "checked": f"TRL's prompt/chosen/rejected ids equal ours; a batch is 2 × {width} tokens, "
                       f"{args.answer} completion tokens a row; no ref_model (adapter disabled)"}


def magistune_side(args, model, cfg, pairs, device: torch.device) -> dict:
    """magistune's preference step (train/dpo.py's forward_backward and train_step, one pair a micro-batch) on
    the pairs as PreferenceSamples; returns seconds of the timed steps and what was checked."""
    from magistune.data.sample import IGNORE_INDEX, PreferenceSample
    from magistune.model import adapt_model, resolve_dtype
    from magistune.train.optim import build_optimizer
    from magistune.train.preference_step import (collate_pairs, pair_logps, pair_loss, reference_pair_logps,
                                                 shared_row_unsupported)
    from magistune.train.preflight import autocast_for

    model, notes = adapt_model(model, cfg, device)  # fused parts (none here), LoRA, checkpointing: the recipe's order
    for note in notes:
        print("note:", note)
    model.train()
    why = shared_row_unsupported(model)
    if why:
        raise SystemExit(why)
    optimizer = build_optimizer(model, cfg, device)
    params = [q for q in model.parameters() if q.requires_grad]
    autocast = autocast_for(device, resolve_dtype(cfg, device))
    pad = model.config.get_text_config().pad_token_id
    skip = [IGNORE_INDEX] * args.prompt
    batches = [collate_pairs([PreferenceSample(p + c, skip + c, p + r, skip + r, f"random:{i}")], pad)
               for i, (p, c, r) in enumerate(pairs)]
    width = args.prompt + 2 * args.answer
    for b in batches:  # one shared-prompt row: P + C + R tokens, C and R of them scored
        assert tuple(b.input_ids.shape) == (1, width) and b.n_tokens == width, b.input_ids.shape
        assert [int((b.chosen_labels != IGNORE_INDEX).sum()), int((b.rejected_labels != IGNORE_INDEX).sum())] \
            == [args.answer] * 2
    losses: list[float] = []

    def step(batch) -> None:
        batch = batch.to(device)
        with autocast():
            out = pair_loss(cfg, pair_logps(model, batch, cfg.use_cce), reference_pair_logps(model, batch, cfg.use_cce))
        (out.losses.sum() / batch.n_pairs).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.losses.detach())

    for batch in batches[:args.warmup]:
        step(batch)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for batch in batches[args.warmup:]:
        step(batch)
    sync(device)
    seconds, peak = time.perf_counter() - t0, peak_gib(device)
    first = float(losses[0])  # step 1: adapter B = 0, so policy = reference and the DPO loss is ln 2
    if args.tiny:  # fp32 on the CPU: exactly; bf16 on the GPU: recorded only
        assert abs(first - math.log(2)) < 1e-5, first
    return {"seconds": seconds, "peak_gib": peak, "lora_dropout_run": lora_dropout(model),
            "adapter_dtype": adapter_dtype(model),
            "first_loss": round(first, 5),
            "mean_loss": round(float(torch.stack(losses).mean()), 5),
            "checked": f"a pair is one row of {width} tokens ({args.prompt} prompt + 2 × {args.answer}), "
                       f"{args.answer} scored tokens an answer"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["magistune", "trl"], required=True)
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    p.add_argument("--answer", type=int, default=1024, help="tokens of each answer, </s> included")
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--dropout", type=float, default=0.05, help="lora_dropout (both sides)")
    p.add_argument("--tiny", action="store_true", help="the tiny model on CPU: a smoke test of this script")
    p.add_argument("--tiny-nf4", action="store_true", help="--tiny with the NF4 model (bitsandbytes' CPU kernels)")
    p.add_argument("--out", default="bench_dpo_step.jsonl")
    args = p.parse_args()
    args.tiny = args.tiny or args.tiny_nf4
    args.nf4 = args.tiny_nf4 or not args.tiny
    if args.prompt < 1 or args.answer < 2 or args.steps < 1 or args.warmup < 1:
        p.error("--prompt >= 1, --answer >= 2 (it ends in </s>), --steps >= 1 and --warmup >= 1")

    from random_model import random_model

    device = torch.device("cpu" if args.tiny else "cuda")
    cfg = config_for(args)
    t0 = time.perf_counter()
    model, info = random_model(model_config(args), cfg, device)
    build_s = time.perf_counter() - t0
    text_config = model.config.get_text_config()
    pairs = random_pairs(args, text_config.vocab_size, text_config.eos_token_id)
    if args.side == "trl":
        result = trl_side(args, model, pairs, device)
    else:
        result = magistune_side(args, model, cfg, pairs, device)
    tokens = args.steps * 2 * (args.prompt + args.answer)  # both sequences of each pair, as TRL feeds them
    row = {
        "side": args.side, "prompt": args.prompt, "answer": args.answer, "pairs_per_step": 1,
        "layers": text_config.num_hidden_layers, "tiny": args.tiny, "nf4": args.nf4, "steps": args.steps,
        "warmup": args.warmup, "tokens_per_step": 2 * (args.prompt + args.answer),
        "tokens_per_s": round(tokens / result["seconds"], 1), "s_per_step": round(result["seconds"] / args.steps, 3),
        "peak_gib": result["peak_gib"],
        "weights_gib": round(info.weight_bytes / 2**30, 2), "build_s": round(build_s, 1),
        "lora_dropout_run": result["lora_dropout_run"], "adapter_dtype": result["adapter_dtype"],
        "first_loss": result.get("first_loss"), "mean_loss": result["mean_loss"],
        "attn": text_config._attn_implementation,
        "checked": result["checked"],
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__, "bitsandbytes": __import__("bitsandbytes").__version__,
        "trl": _version("trl"), "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
