"""A QLoRA GRPO step on real Magistral Small shapes with random weights: magistune beside TRL's GRPOTrainer.

    python bench/grpo_step.py --side magistune|trl [--rollout fast|plain] [--prompt 256 --new 512 --generations 8]
        [--layers 40]
        [--warmup 1] [--tiny | --tiny-nf4] [--out bench_grpo_step.jsonl]

One step = one prompt of --prompt random ids (the same on both sides), G = --generations completions of exactly
--new tokens each (no early stop: ours samples with an eos id no token equals, TRL's generate gets
min_new_tokens = --new, which masks eos' logit; both checked), a trivial reward (the share of even ids in a
completion: it varies within a group, so Magistral's loss keeps the group), advantages, the loss, backward,
8-bit AdamW. Counted: rollout tok/s = G × new / rollout seconds (prefill included); training tok/s = G × (prompt
+ new) / the seconds of forward, backward and optimizer step.

Sides (same random NF4 model from bench/random_model.py, LoRA r=32 alpha=16 on all 7 projections, dropout
--dropout on both, bf16, non-reentrant gradient checkpointing, 8-bit AdamW, temperature 0.7, top-p 0.95):
    magistune  model.adapt_model + train.rollout.generate_rollouts (--rollout fast: model/static_generation.py's
               static KV cache with the decode step replayed from a CUDA graph, what the recipe runs on CUDA;
               plain: the DynamicCache loop of model/generation.py, what it runs elsewhere) +
               grpo_loss.advantages / sequence_weights + the recipe's own GRPO.forward_backward (loss_type
               magistral, micro-batch = G), as train/grpo.py runs a step. Warm-up: one untimed step with
               --warmup-new new tokens; then the timed step; then a prefill probe (max_new_tokens 1) so that
               ms per decode step = (rollout − prefill) / (new − 1).
    trl        TRL's GRPOTrainer + PEFT (peft_config), per_device_train_batch_size = num_generations = G, so one
               step = one prompt × G completions (generation_batch_size G, steps_per_generation 1), loss_type
               dapo (TRL's default; same cost), HF generate with its DynamicCache, on strings of bench/dpo_step.py's
               word-level tokenizer (id i is the word "t{i}": TRL's prompt ids equal ours, checked). --warmup full
               steps untimed (each ~ a timed one), then one timed step; the generate call and the whole
               rollout (_generate_and_score_completions: generate + rewards + advantages) are timed by a subclass.
--tiny: the tiny model on CPU (LoRA without 4-bit, adamw_torch, fp32): a smoke test of this script, both sides;
--tiny-nf4 the same with the tiny model in NF4. Peak = torch.cuda.max_memory_allocated over the timed step (reset
after the warm-up); rollout peak = the same read when the rollout ends. One JSON line per run to --out (appended):
run each side in its own process (bench/run_grpo_gpu.sh), then bench/report_grpo.py writes the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from types import SimpleNamespace

import torch

from dpo_step import _version, adapter_dtype, lora_dropout, model_config, peak_gib, sync, word_tokenizer

TEMPERATURE, TOP_P = 0.7, 0.95
NO_EOS = -1  # an eos id no sampled token equals: every completion runs to max_new_tokens


def config_for(args):
    from magistune.config import parse_config

    raw = {
        "base_model": "bench", "datasets": [{"path": "bench.jsonl"}], "rl": "grpo",
        "sequence_len": args.prompt + args.new,
        "adapter": "qlora" if args.nf4 else "lora", "load_in_4bit": args.nf4,
        "lora_r": 32, "lora_alpha": 16, "lora_dropout": args.dropout, "lora_target_linear": True,
        "micro_batch_size": args.generations, "gradient_accumulation_steps": 1,
        "optimizer": "adamw_torch" if args.tiny else "adamw_bnb_8bit", "learning_rate": 1e-5,
        "bf16": not args.tiny, "gradient_checkpointing": True,
        "trl": {"num_generations": args.generations, "max_completion_length": args.new, "temperature": TEMPERATURE,
                "top_p": TOP_P, "loss_type": "magistral"},
    }
    return parse_config(raw)[0]


def random_prompts(args, vocab: int) -> list[list[int]]:
    """warmup + 1 prompts of --prompt random ids (the last is the timed step's)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(1000, vocab, (args.prompt,), generator=gen).tolist() for _ in range(args.warmup + 1)]


def even_share(completions: list[list[int]]) -> list[float]:
    """The trivial reward: the share of even ids in each completion."""
    return [sum(t % 2 == 0 for t in c) / max(len(c), 1) for c in completions]


def magistune_side(args, model, cfg, prompts, device: torch.device) -> dict:
    """One GRPO step through train/grpo.py's components: rollouts, rewards, advantages, the recipe's
    forward_backward, clip, 8-bit AdamW; timed part by part."""
    from magistune.model import adapt_model, resolve_dtype
    from magistune.model.static_generation import static_unsupported
    from magistune.train.grpo import GRPO
    from magistune.train.grpo_loss import advantages, sequence_weights
    from magistune.train.metrics import Printer
    from magistune.train.optim import build_optimizer
    from magistune.train.preflight import autocast_for
    from magistune.train.rollout import Rollouts, generate_rollouts

    model, notes = adapt_model(model, cfg, device)
    for note in notes:
        print("note:", note)
    model.train()
    why = static_unsupported(model) if args.rollout == "fast" else None
    if why:  # generate_rollouts would quietly take the plain loop: measure nothing under the wrong name
        raise SystemExit(f"--rollout fast: {why}")
    optimizer = build_optimizer(model, cfg, device)
    params = [q for q in model.parameters() if q.requires_grad]
    autocast = autocast_for(device, resolve_dtype(cfg, device))
    trl, G, pad = cfg.trl, args.generations, model.config.get_text_config().pad_token_id
    recipe = GRPO(cfg, Printer())  # only its forward_backward runs: it reads model, special.pad, device, autocast
    recipe.model, recipe.special, recipe.device, recipe.autocast = model, SimpleNamespace(pad=pad), device, autocast

    def rollout(prompt: list[int], new: int, seed: int) -> list[list[int]]:
        generator = torch.Generator(device=device).manual_seed(seed)
        return generate_rollouts(model, [prompt] * G, NO_EOS, pad, new, TEMPERATURE, TOP_P, generator, autocast,
                                 fast=args.rollout == "fast")

    def step(prompt: list[int], new: int, seed: int) -> dict:
        t = {}
        sync(device)
        t0 = time.perf_counter()
        completions = rollout(prompt, new, seed)
        sync(device)
        t["rollout_s"], t["peak_rollout_gib"] = time.perf_counter() - t0, peak_gib(device)
        assert [len(c) for c in completions] == [new] * G, [len(c) for c in completions]
        t1 = time.perf_counter()
        rewards = even_share(completions)
        ro = Rollouts([0] * G, [prompt] * G, completions, [False] * G, rewards, {"even_share": rewards},
                      [[] for _ in completions])
        adv, kept = advantages(torch.tensor(rewards, dtype=torch.float64), G, trl.reward_scaling)
        lengths = torch.tensor([sum(m) for m in ro.train_masks()], dtype=torch.float64)
        weights = sequence_weights(lengths, G, trl.loss_type, kept, trl.max_completion_length)
        assert float(weights.sum()) > 0, f"every reward of the group is equal ({rewards}): nothing would train"
        t2 = time.perf_counter()
        loss, _, _ = recipe.forward_backward(ro, adv, weights)
        sync(device)
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t4 = time.perf_counter()
        t |= {"score_s": t2 - t1, "forward_backward_s": t3 - t2, "optimizer_s": t4 - t3, "train_s": t4 - t2,
              "step_s": t4 - t0, "loss": loss, "reward": sum(rewards) / G}
        return t

    for i, prompt in enumerate(prompts[:-1]):  # warm-up: kernels, allocator, the optimizer's state
        step(prompt, args.warmup_new, seed=i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed = step(prompts[-1], args.new, seed=1000)
    timed["peak_gib"] = peak_gib(device)
    sync(device)
    t0 = time.perf_counter()
    rollout(prompts[-1], 1, seed=1001)  # the prefill (+ one sample): what the rollout spends before decoding
    sync(device)
    prefill = time.perf_counter() - t0
    return timed | {
        "generate_s": timed["rollout_s"], "prefill_s": prefill,
        "decode_ms": 1000 * (timed["rollout_s"] - prefill) / max(args.new - 1, 1),
        "lora_dropout_run": lora_dropout(model), "adapter_dtype": adapter_dtype(model),
        "checked": f"{G} completions of exactly {args.new} tokens; a trained group (rewards differ)",
    }


def trl_side(args, model, prompts, device: torch.device) -> dict:
    """TRL's GRPOTrainer, one prompt × G completions a step; the timed step's generate and rollout by a subclass."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ids = model.config.get_text_config()
    tok = word_tokenizer(ids.vocab_size, {"<unk>": 0, "<s>": ids.bos_token_id, "</s>": ids.eos_token_id,
                                          "<pad>": ids.pad_token_id})
    timing: dict = {"generate": [], "rollout": []}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, *a, **kw):
            sync(device)
            t0 = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *a, **kw)
            sync(device)
            timing["generate"].append({"s": time.perf_counter() - t0, "prompt_ids": [list(p) for p in prompt_ids],
                                       "lengths": [len(c) for c in completion_ids], "peak": peak_gib(device)})
            return completion_ids, logprobs

        def _generate_and_score_completions(self, inputs):
            sync(device)
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            sync(device)
            timing["rollout"].append(time.perf_counter() - t0)
            return out

    class StepTimer(TrainerCallback):  # global_step counts finished steps: begin sees k, end sees k + 1
        def on_step_begin(self, _args, state, control, **kw):
            if state.global_step == args.warmup:
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                timing["t0"] = time.perf_counter()

        def on_step_end(self, _args, state, control, **kw):
            if state.global_step == args.warmup + 1:
                sync(device)
                timing["t1"], timing["peak"] = time.perf_counter(), peak_gib(device)

    def reward_even_share(completion_ids, **kw) -> list[float]:
        return even_share(completion_ids)

    G = args.generations
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo_step_trl_"), max_steps=args.warmup + 1,
        per_device_train_batch_size=G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=args.new, temperature=TEMPERATURE, top_p=TOP_P,
        generation_kwargs={"min_new_tokens": args.new},  # eos' logit masked: every completion is --new tokens
        beta=0.0, epsilon_high=0.28, learning_rate=1e-5, shuffle_dataset=False,
        optim="adamw_torch" if args.tiny else "adamw_bnb_8bit", bf16=not args.tiny, use_cpu=args.tiny,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        disable_dropout=False, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        seed=0,
    )
    assert (config.generation_batch_size, config.steps_per_generation) == (G, 1), "one step must be 1 prompt × G"
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_config = LoraConfig(r=32, lora_alpha=16, lora_dropout=args.dropout, task_type="CAUSAL_LM", bias="none",
                             target_modules=projections)
    data = Dataset.from_dict({"prompt": [" ".join(tok.convert_ids_to_tokens(p)) for p in prompts]})
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[reward_even_share], args=config, train_dataset=data,
                               processing_class=tok, peft_config=peft_config, callbacks=[StepTimer()])
    dropout, dtype = lora_dropout(trainer.model), adapter_dtype(trainer.model)
    mean_loss = trainer.train().training_loss
    gen, step_s = timing["generate"][-1], timing["t1"] - timing["t0"]
    assert gen["prompt_ids"] == [prompts[-1]] * G, "TRL's prompt ids differ from ours (or it sampled another prompt)"
    assert gen["lengths"] == [args.new] * G, f"TRL's completions are not all {args.new} tokens: {gen['lengths']}"
    rollout_s = timing["rollout"][-1]
    return {"step_s": step_s, "generate_s": gen["s"], "rollout_s": rollout_s, "train_s": step_s - rollout_s,
            "decode_ms": 1000 * gen["s"] / args.new, "peak_gib": timing["peak"], "peak_rollout_gib": gen["peak"],
            "loss": mean_loss,
            "lora_dropout_run": dropout, "adapter_dtype": dtype,
            "checked": f"TRL's prompt ids equal ours; {G} completions of exactly {args.new} tokens (min_new_tokens)"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["magistune", "trl"], required=True)
    p.add_argument("--rollout", choices=["plain", "fast"], default="fast",
                   help="magistune's rollout path: plain = model/generation.py's loop; fast = model/static_generation.py "
                        "(static KV cache, the decode step as a CUDA graph on CUDA, eagerly on the CPU)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--new", type=int, default=512, help="new tokens of each completion")
    p.add_argument("--generations", type=int, default=8, help="G completions of the one prompt")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--warmup-new", type=int, default=16, help="new tokens of magistune's warm-up rollouts")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (both sides)")
    p.add_argument("--tiny", action="store_true", help="the tiny model on CPU: a smoke test of this script")
    p.add_argument("--tiny-nf4", action="store_true", help="--tiny with the NF4 model (bitsandbytes' CPU kernels)")
    p.add_argument("--out", default="bench_grpo_step.jsonl")
    args = p.parse_args()
    args.tiny = args.tiny or args.tiny_nf4
    args.nf4 = args.tiny_nf4 or not args.tiny
    if args.prompt < 1 or args.new < 2 or args.generations < 2 or args.warmup < 1 or args.warmup_new < 1:
        p.error("--prompt >= 1, --new >= 2, --generations >= 2, --warmup >= 1, --warmup-new >= 1")

    from random_model import random_model

    device = torch.device("cpu" if args.tiny else "cuda")
    cfg = config_for(args)
    t0 = time.perf_counter()
    model, info = random_model(model_config(args), cfg, device)
    build_s = time.perf_counter() - t0
    text_config = model.config.get_text_config()
    prompts = random_prompts(args, text_config.vocab_size)
    with warnings.catch_warnings(record=True) as caught:  # e.g. a decode step that could not be captured
        warnings.simplefilter("always")
        if args.side == "trl":
            r = trl_side(args, model, prompts, device)
        else:
            r = magistune_side(args, model, cfg, prompts, device)
    notes = sorted({str(w.message)[:300] for w in caught if "static_generation" in w.filename})
    G = args.generations
    row = {
        "side": args.side, "prompt": args.prompt, "new": args.new, "generations": G,
        "layers": text_config.num_hidden_layers, "tiny": args.tiny, "nf4": args.nf4, "warmup": args.warmup,
        "rollout_tokens_per_s": round(G * args.new / r["rollout_s"], 1),
        "generate_tokens_per_s": round(G * args.new / r["generate_s"], 1),
        "train_tokens_per_s": round(G * (args.prompt + args.new) / r["train_s"], 1),
        "decode_ms": round(r["decode_ms"], 2),
        **{k: round(v, 3) for k, v in r.items() if k.endswith("_s")},
        "peak_gib": r["peak_gib"], "peak_rollout_gib": r["peak_rollout_gib"],
        "weights_gib": round(info.weight_bytes / 2**30, 2), "build_s": round(build_s, 1),
        "loss": round(float(r["loss"]), 5), "reward": r.get("reward"),
        "rollout": args.rollout if args.side == "magistune" else "HF generate",
        "lora_dropout_run": r["lora_dropout_run"], "adapter_dtype": r["adapter_dtype"],
        "attn": text_config._attn_implementation, "checked": r["checked"], "notes": notes,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__, "bitsandbytes": _version("bitsandbytes"), "trl": _version("trl"),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
