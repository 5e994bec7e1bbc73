"""`magistune train` with `rl: grpo`, in one process: reinforcement learning with verifiable rewards (GRPO, with
Magistral's recipe by default), start to end.

    preflight  →  seed  →  prompts (mistral-common test-mode ids)  →  model (+ LoRA/QLoRA)  →  optimizer, schedule
      →  resume?  →  for each step: [rollouts: sample G completions per prompt, score them, advantages]
                                      forward/backward over the micro-batches, clip, step, log (+ samples.jsonl), save
      →  adapter/model + tekken.json + config.yaml + metrics.jsonl + samples.jsonl

Sizes (TRL's): a step trains micro_batch_size × gradient_accumulation_steps completions, micro_batch_size per
forward pass; that many / num_generations prompts are sampled per rollout (8 × 4 = 32 completions = 4 prompts of
G = 8). A rollout batch serves num_iterations (μ) consecutive optimizer steps. An epoch is every prompt once.

Exact resume. Prompt order is a permutation seeded with (seed, epoch); rollout r samples from a generator seeded
with (seed, r): neither is state to save. The global RNG (dropout) is saved at each step boundary as in SFT, and
with μ > 1 the rollouts still to be reused travel in trainer_state.json. A killed and resumed run samples the
same completions and computes the same losses (tests/e2e/test_train_grpo.py).

Exit codes as sft.py: 0 done; 1 training failed (non-finite loss, out of memory, a reward function failed);
2 the config, data or a path is wrong; 130 interrupted (Ctrl-C / SIGTERM: the last finished step is saved).
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

from magistune.config import Config, ConfigError
from magistune.data.build import DataError, resolve_tokenizer_file
from magistune.data.prompts import check_prompt_data, load_prompt_tokenizer, load_prompts
from magistune.model import build_model, format_model_info, resolve_dtype, save_trained
from magistune.tokenizer import SpecialIds, TokenizerError
from magistune.train import checkpoint as ckpt
from magistune.train import checkpoint_load as ckpt_load
from magistune.train.grpo_loss import advantages, clipped_token_loss, kl_penalty, sequence_weights, weighted_loss
from magistune.train.launch import single_process_notes
from magistune.train.memory_estimate import preflight_memory
from magistune.train.metrics import MetricsLogger, Printer, read_metrics
from magistune.train.optim import OptimizerError, build_optimizer, build_scheduler, warmup_steps
from magistune.train.preflight import (
    autocast_for, oom_advice, preflight, resolved_config, seed_everything, write_resolved_config,
)
from magistune.train.rewards import RewardError, load_reward_funcs, score
from magistune.train.rollout import (
    RolloutBatch, Rollouts, completion_logps, completion_message, generate_rollouts, rollout_logps,
)
from magistune.train.stopping import Interrupted, StopFlag, TrainingStopped, oom_summary

SETUP_ERRORS = (ConfigError, ckpt.CheckpointError, OptimizerError, DataError, TokenizerError)
SAMPLES_FILE = "samples.jsonl"
SAMPLES_PER_LOG = 4  # completions of the step's first prompt written to samples.jsonl at each logging step


def train(cfg: Config) -> int:
    say = Printer()
    recipe = GRPO(cfg, say)
    try:
        try:
            recipe.setup()
        except SETUP_ERRORS as e:
            say(f"error: {e}")
            return 2
        except torch.OutOfMemoryError as e:
            say(f"error: out of memory while loading or preparing the model ({oom_summary(e)})\n{oom_advice(cfg, None)}")
            return 1
        return recipe.train()
    finally:
        recipe.release()  # output_dir's lock


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


class GRPO:
    """GRPO in one process: setup() then train(), which returns the exit code."""

    def __init__(self, cfg: Config, say: Printer):
        self.cfg, self.trl, self.say = cfg, cfg.trl, say

    # --- setup ------------------------------------------------------------------------------------------------
    def release(self) -> None:
        """Give output_dir's lock back (the OS does it as well when the process ends)."""
        if getattr(self, "pre", None) is not None:
            self.pre.release()

    def setup(self) -> None:
        self.setup_data()
        self.setup_model()
        self.setup_optimizer()
        self.load_checkpoint()

    def setup_data(self) -> None:
        cfg, trl, say = self.cfg, self.trl, self.say
        completions = cfg.micro_batch_size * cfg.gradient_accumulation_steps
        if completions % trl.num_generations:
            raise ConfigError(f"micro_batch_size × gradient_accumulation_steps = {completions} completions per step "
                              f"must be a multiple of trl.num_generations ({trl.num_generations}): each prompt's G "
                              "completions are trained in the same step (TRL's rule)")
        self.prompts_per_step = completions // trl.num_generations
        self.pre = preflight(cfg)
        for note in single_process_notes(cfg) + self.pre.notes:
            say(f"note: {note}")
        unused = [k for k in ("val_set_size", "eval_steps", "evals_per_epoch") if getattr(cfg, k)]
        if unused:
            say(f"note: {', '.join(unused)}: not used with rl: grpo (no held-out loss; the rewards are in metrics.jsonl)")
        seed_everything(cfg.seed)
        self.tokenizer_file = resolve_tokenizer_file(cfg)
        if self.tokenizer_file.name == "tokenizer.json":
            raise ConfigError("rl: grpo with a Hugging Face tokenizer (tokenizer.json) is not implemented: its prompts "
                              "and rewards use mistral-common's encoding; use the model's tekken.json")
        self.tokenizer = load_prompt_tokenizer(self.tokenizer_file)
        self.special = SpecialIds.of(self.tokenizer)
        self.data = load_prompts(cfg, self.tokenizer)
        check_prompt_data(cfg, self.data, say)
        longest = max((len(p.ids) for p in self.data.prompts), default=None)  # the rollout's prefill and cache width
        say(preflight_memory(cfg, self.pre.model_dir, self.pre.device, prompt=longest))  # refuses what cannot fit
        self.reward_funcs = load_reward_funcs(cfg, self.special)
        missing = [p.source for p in self.data.prompts if p.columns.get("answer") is None]
        if "boxed_math" in trl.reward_funcs and missing:
            raise DataError(f"trl.reward_funcs: boxed_math compares with the records' `answer` column, which "
                            f"{len(missing)} record(s) lack: {', '.join(missing[:5])}")
        self.device, self.dtype = self.pre.device, resolve_dtype(cfg, self.pre.device)
        self.out = cfg.out_dir.resolve()
        write_resolved_config(cfg, self.pre.model_dir)
        self.run_config = ckpt.run_config(resolved_config(cfg, self.pre.model_dir))  # saved in every checkpoint
        n = len(self.data.prompts)
        say(f"data: {n} prompts ({self.data.records} records), rewards: {', '.join(n for n, _ in self.reward_funcs)}")

    def setup_model(self) -> None:
        cfg, device = self.cfg, self.device
        if cfg.tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.pre.resume is not None:
            ckpt_load.check_not_sharded(self.pre.resume)
        source = ckpt_load.full_model_source(cfg, self.pre.resume)
        self.autocast = autocast_for(device, self.dtype)
        self.model, info, _ = build_model(source, device, tokenizer=self.tokenizer)
        self.model.train()
        self.say(f"model: {format_model_info(info)}; {device.type}, {str(self.dtype).removeprefix('torch.')}")
        for note in info.notes:
            self.say(f"note: {note}")

    def setup_optimizer(self) -> None:
        cfg, trl = self.cfg, self.trl
        self.batches_per_epoch = math.ceil(len(self.data.prompts) / self.prompts_per_step)
        self.spe = spe = self.batches_per_epoch * trl.num_iterations
        self.total = total = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * spe))
        warmup = warmup_steps(cfg, total)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler, warmup, total)
        self.say(f"schedule: {total} steps ({total / spe:.2f} epochs of {spe}); each rollout: {self.prompts_per_step} "
                 f"prompts × {trl.num_generations} completions of ≤ {trl.max_completion_length} tokens, trained "
                 f"{trl.num_iterations}× in {cfg.gradient_accumulation_steps} micro-batches of {cfg.micro_batch_size}; "
                 f"loss {trl.loss_type}, {cfg.lr_scheduler} lr {cfg.learning_rate:g}, warmup {warmup}")
        self.save_every = cfg.save_steps or (max(1, spe // cfg.saves_per_epoch) if cfg.saves_per_epoch else None)

    def load_checkpoint(self) -> None:
        state = {"step": 0, "window": [], "rollouts": None}
        resume, n = self.pre.resume, len(self.data.prompts)
        if resume is not None:
            state = ckpt_load.load_checkpoint(resume, self.model, self.optimizer, self.scheduler)
            if state.get("n_prompts") != n:
                raise ckpt.CheckpointError(f"{resume} was trained on {state.get('n_prompts')} prompts, the data now "
                                           f"has {n}: the data position cannot be restored. Start a new output_dir")
            for note in ckpt.check_same_run(resume, state, self.run_config, self.total,
                                            self.cfg.resume_ignore_config_changes):
                self.say(f"note: {note}")
            self.say(f"resumed at step {state['step']} of {self.total}")
        self.step, self.window = state["step"], state["window"]
        self.rollouts = Rollouts.from_dict(state["rollouts"]) if state.get("rollouts") else None
        self.rng = ckpt.capture_rng()

    # --- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> int:
        self.log = MetricsLogger(self.out, self.step, self.total, show_progress=sys.stderr.isatty())
        self.samples_path = self.out / SAMPLES_FILE
        keep = [r for r in read_metrics(self.samples_path) if r.get("step", 0) <= self.step] if self.step else []
        self.samples_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
        stop = StopFlag(self.say)
        stop.install()
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.cfg.max_grad_norm or math.inf
        self.run_seconds, self.run_steps = 0.0, 0
        try:
            while self.step < self.total:
                self.train_step(params, clip)
                if (self.save_every and self.step % self.save_every == 0) or self.step == self.total:
                    self.save(self.step)
                if stop.signum is not None:
                    raise Interrupted
        except (Interrupted, KeyboardInterrupt, TrainingStopped, torch.OutOfMemoryError) as e:
            return self.stopped(e)
        except RewardError as e:
            self.log.message(f"error: {e}\n  nothing of step {self.step + 1} was applied; the last checkpoint is "
                             f"{ckpt.latest_checkpoint(self.out) or '(none)'}")
            return 1
        finally:
            stop.restore()
            self.log.close()
        return self.finish()

    def prompt_indices(self, r: int) -> list[int]:
        """The prompts of rollout batch r: the next slice of its epoch's permutation (the last may be shorter)."""
        epoch, b = divmod(r, self.batches_per_epoch)
        order = epoch_order(len(self.data.prompts), self.cfg.seed, epoch)
        return order[b * self.prompts_per_step:(b + 1) * self.prompts_per_step]

    def new_rollouts(self, r: int) -> Rollouts:
        """Rollout batch r: G completions per prompt, sampled from a generator seeded with (seed, r), and scored."""
        trl, G, special = self.trl, self.trl.num_generations, self.special
        index = [i for i in self.prompt_indices(r) for _ in range(G)]
        prompts = [self.data.prompts[i] for i in index]
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 1_000_003 + r)
        completions = generate_rollouts(self.model, [p.ids for p in prompts], special.eos, special.pad,
                                        trl.max_completion_length, trl.temperature, trl.top_p, generator, self.autocast)
        texts = [completion_message(self.tokenizer, c, special) for c in completions]
        names = sorted({k for p in prompts for k in p.columns})
        columns = {k: [p.columns.get(k) for p in prompts] for k in names}
        scores = score(self.reward_funcs, trl.reward_weights, [p.prompt for p in prompts], texts, columns,
                       completions, [p.source for p in prompts], G)
        ro = Rollouts(index, [p.ids for p in prompts], completions, [c[-1:] == [special.eos] for c in completions],
                      scores.total, scores.per_func, texts, trl.mask_truncated_completions)
        logps = (lambda: rollout_logps(self.model, ro.prompt_ids, completions, special.pad, self.cfg.micro_batch_size,
                                       trl.temperature, self.device, self.autocast))
        if trl.num_iterations > 1:
            ro.old_logps = logps()
        if trl.beta > 0:
            with self.model.disable_adapter():  # the reference: the base model, adapters off
                ro.ref_logps = logps()
        return ro

    def train_step(self, params: list[torch.nn.Parameter], clip: float) -> None:
        """One optimizer step on the current rollouts (sampled first when the step starts a rollout batch)."""
        t0, trl = time.perf_counter(), self.trl
        if self.step % trl.num_iterations == 0 or self.rollouts is None:
            self.rollouts = self.new_rollouts(self.step // trl.num_iterations)
        ro = self.rollouts
        adv, kept = advantages(torch.tensor(ro.rewards, dtype=torch.float64), trl.num_generations, trl.reward_scaling)
        lengths = torch.tensor([sum(m) for m in ro.train_masks()], dtype=torch.float64)
        weights = sequence_weights(lengths, trl.num_generations, trl.loss_type, kept, trl.max_completion_length)
        loss, clipped, kl = 0.0, 0, 0.0
        if float(weights.sum()) == 0:
            self.log.message(f"note: step {self.step + 1}: every group scored the same reward (or no token is "
                             "trained): nothing to learn, the optimizer step is skipped")
        else:
            loss, clipped, kl = self.forward_backward(ro, adv, weights)
            if not math.isfinite(loss):
                raise TrainingStopped(f"loss is {loss} at step {self.step + 1}")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if float(weights.sum()) and not math.isfinite(grad_norm):
            raise TrainingStopped(f"gradient norm is {grad_norm} at step {self.step + 1} (loss {loss:.4f})")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step, self.rng = self.step + 1, ckpt.capture_rng()
        if self.step % trl.num_iterations == 0:
            self.rollouts = None  # used up: not saved
        seconds = time.perf_counter() - t0
        self.window.append(ro.metrics(loss, clipped, kl, int(lengths.sum()), trl.num_generations,
                                      trl.reward_scaling == "minibatch") | {"lr": lr, "grad_norm": grad_norm,
                                                                            "seconds": seconds})
        self.run_seconds, self.run_steps = self.run_seconds + seconds, self.run_steps + 1
        self.log.advance()
        if self.step % self.cfg.logging_steps == 0 or self.step == self.total:
            self.log_window(ro)

    def forward_backward(self, ro: Rollouts, adv: torch.Tensor, weights: torch.Tensor) -> tuple[float, int, float]:
        """Σ over micro-batches of ∇ Σ_i w_i Σ_t loss_i,t: the whole batch's loss (grpo_loss.py). Returns the loss,
        the clipped tokens and the mean KL (β > 0)."""
        trl, mbs, total, clipped, kl_sum = self.trl, self.cfg.micro_batch_size, 0.0, 0, 0.0
        masks = ro.train_masks()
        for start in range(0, len(ro.completions), mbs):
            idx = list(range(start, min(start + mbs, len(ro.completions))))
            batch = RolloutBatch.collate([ro.prompt_ids[i] for i in idx], [ro.completions[i] for i in idx],
                                         self.special.pad).to(self.device)
            mask = torch.zeros_like(batch.completion_mask)
            for row, i in enumerate(idx):
                mask[row, :len(masks[i])] = torch.tensor(masks[i], dtype=mask.dtype)
            with self.autocast():
                logp = completion_logps(self.model, batch, trl.temperature, self.cfg.use_cce)
            old = ro.padded("old_logps", idx, logp) if ro.old_logps is not None else logp.detach()
            token_loss, active = clipped_token_loss(logp, old, adv[idx].to(self.device), trl.epsilon,
                                                    trl.epsilon_high if trl.epsilon_high is not None else trl.epsilon)
            if trl.beta > 0:
                kl = kl_penalty(logp, ro.padded("ref_logps", idx, logp))
                token_loss = token_loss + trl.beta * kl
                kl_sum += float((kl.detach() * mask).sum())
            part = weighted_loss(token_loss, mask, weights[idx].to(self.device))
            part.backward()
            total += float(part.detach())
            clipped += int((active & (mask > 0)).sum())
        n_tokens = max(sum(sum(m) for m in masks), 1)
        return total, clipped, kl_sum / n_tokens

    def log_window(self, ro: Rollouts) -> None:
        rows, step = self.window, self.step
        keys = [k for k in rows[-1] if k not in ("lr", "grad_norm", "seconds", "clipped", "tokens")]
        values = {k: sum(r[k] for r in rows) / len(rows) for k in keys if all(r.get(k) is not None for r in rows)}
        values["clip_ratio"] = sum(r["clipped"] for r in rows) / max(sum(r["tokens"] for r in rows), 1)
        values["filtered_groups"] = sum(r["filtered_groups"] for r in rows)
        row = self.log.log_train(step, loss=values.pop("loss"), **values, lr=rows[-1]["lr"],
                                 grad_norm=rows[-1]["grad_norm"], seconds_per_step=round(sum(r["seconds"] for r in rows) /
                                                                                         len(rows), 3))
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for sample in ro.samples(SAMPLES_PER_LOG, self.data.prompts):
                f.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
        if self.log.bar is None:
            eta = (self.total - step) * self.run_seconds / self.run_steps
            self.log.message(f"step {step}/{self.total}: loss {row['loss']:.4f}, reward {row['reward']:.3f} "
                             f"(± {row['reward_std']:.3f}), length {row['completion_length']:.0f}, clipped "
                             f"{row['clip_ratio']:.3f}, filtered {row['filtered_groups']}, ETA {eta:.0f}s")
        self.window = []

    def save(self, at: int) -> None:
        cfg = self.cfg
        state = {"step": at, "total_steps": self.total, "window": self.window, "n_prompts": len(self.data.prompts),
                 "steps_per_epoch": self.spe, "rollouts": self.rollouts.to_dict() if self.rollouts else None,
                 "run_config": self.run_config}
        path = ckpt.save_checkpoint(self.out, at, lambda d: save_trained(self.model, d, cfg, self.tokenizer_file),
                                    self.optimizer, self.scheduler, state, self.rng, cfg.save_total_limit)
        self.log.message(f"saved {path}")

    # --- the end ------------------------------------------------------------------------------------------------
    def stopped(self, e: BaseException) -> int:
        step, last = self.step, ckpt.latest_checkpoint(self.out)
        if isinstance(e, Interrupted):
            if step > 0 and not ckpt.is_complete(self.out / f"{ckpt.PREFIX}{step}"):
                self.save(step)
            self.log.message(f"interrupted after step {step}; resume with resume_from_checkpoint: auto")
            return 130
        if isinstance(e, KeyboardInterrupt):
            self.log.message(f"interrupted during step {step + 1}: nothing saved; the last checkpoint is "
                             f"{last or '(none)'}")
            return 130
        if isinstance(e, TrainingStopped):
            self.log.message(f"error: {e}: stopping before the optimizer step, so no weight is corrupted.\n"
                             f"  The last good checkpoint is {last or '(none yet)'}. Lower learning_rate or keep "
                             "max_grad_norm set (1.0); resume_from_checkpoint: auto continues from there.")
            return 1
        self.log.message(f"error: out of memory at step {step + 1} ({oom_summary(e)})\n"
                         f"{oom_advice(self.cfg, self.trl.max_completion_length)}")
        return 1

    def finish(self) -> int:
        save_trained(self.model, self.out, self.cfg, self.tokenizer_file)
        rewards = [r["reward"] for r in read_metrics(self.log.path) if r.get("reward") is not None]
        self.say(f"done: {self.step} steps, reward {rewards[0]:.3f} → {rewards[-1]:.3f}" if rewards
                 else f"done: {self.step} steps")
        self.say(f"outputs in {self.out}: {'adapter' if self.cfg.adapter else 'model'}, {self.tokenizer_file.name}, "
                 f"config.yaml, metrics.jsonl, {SAMPLES_FILE}")
        return 0


__all__ = ["GRPO", "train"]
