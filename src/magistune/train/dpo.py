"""`magistune train` with `rl:` in one process: preference tuning (DPO, IPO, ORPO, SimPO/CPO, KTO), start to end.

    preflight (paths, device)  →  seed  →  preference data  →  model (+ LoRA/QLoRA)  →  optimizer, schedule
      →  resume?  →  reference log-probs table (full fine-tune of DPO/IPO/KTO, or precompute_ref_log_probs)
      →  for each step: forward/backward over the micro-batches of pairs, clip, step, log, eval, save
      →  final eval, checkpoint, adapter/model + tekken.json + config.yaml + metrics + loss.png

sft.py's recipe with pairs for samples. A micro-batch is `micro_batch_size` pairs (KTO: examples), each pair one
row with its prompt encoded once (preference_step.py); a step is `gradient_accumulation_steps` micro-batches, and
each micro-batch backpropagates Σ its pairs' losses / pairs of the whole step, so the accumulated gradient is one
big batch's mean loss (preference_loss.py). The reference: the model with its adapters off (LoRA/QLoRA), or the
precomputed table (preference_ref.py). KTO's KL point z₀ is computed once per step, detached, from the step's
examples' mismatched rows (each example's prompt with the previous example's completion, in file order).

Metrics rows: step, epoch, loss, reward_chosen, reward_rejected, reward_margin, reward_accuracy, lr, grad_norm,
tokens_per_s, pairs, peak_mem_gb; eval rows: eval_loss and eval_reward_* on the eval split.
Exit codes as sft.py's: 0 done; 1 training failed; 2 config, data or path wrong; 130 interrupted.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from magistune.config import Config, ConfigError
from magistune.data.build import DataError, prepare_data, resolve_tokenizer_file
from magistune.data.cache import cache_key
from magistune.model import build_model, format_model_info, resolve_dtype, save_trained
from magistune.tokenizer import SpecialIds, TokenizerError, image_encoder_of
from magistune.hf_tokenizer import load_any_tokenizer
from magistune.train import checkpoint as ckpt
from magistune.train import checkpoint_load as ckpt_load
from magistune.train.batches import DataPosition, StepStream, every, steps_per_epoch, total_steps
from magistune.train.launch import single_process_notes
from magistune.train.memory_estimate import longest_row, preflight_memory
from magistune.train.metrics import MetricsLogger, Printer, peak_memory_gb, plot_losses
from magistune.train.optim import OptimizerError, build_optimizer, build_scheduler, warmup_steps
from magistune.train.preference_ref import model_key, reference_table, table_path
from magistune.train.preference_step import (PairLogps, PreferenceTotals, collate_kto, collate_pairs, disabled_adapters,
                                             example_loss, kto_kl_rows, kto_rows_kl, pair_logps, pair_loss,
                                             reference_pair_logps, sample_logps, shared_row_unsupported)
from magistune.train.preflight import (
    autocast_for, oom_advice, preflight, resolved_config, seed_everything, write_resolved_config,
)
from magistune.train.watchdog import LossWatchdog
from magistune.train.stopping import Interrupted, StopFlag, TrainingStopped, oom_summary

SETUP_ERRORS = (ConfigError, ckpt.CheckpointError, OptimizerError, DataError, TokenizerError)
PAIR_REFERENCE = ("dpo", "ipo")  # the pairwise losses that compare with a reference


def train(cfg: Config) -> int:
    say = Printer()
    recipe = DPO(cfg, say)
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


class PreferenceStream(StepStream):
    """StepStream over pairs (or KTO examples): each micro-batch is (sample indices, collated rows)."""

    def __init__(self, samples, kto: bool, *args, **kwargs):
        super().__init__(samples, *args, **kwargs)
        self.kto = kto

    def collate(self, idx: list[int]):
        collate = collate_kto if self.kto else collate_pairs
        return idx, collate([self.samples[i] for i in idx], self.pad_id, self.image_encoder)


class DPO:
    """Preference tuning in one process: setup() then train(), which returns the exit code."""

    def __init__(self, cfg: Config, say: Printer):
        self.cfg, self.say = cfg, say
        self.watchdog = LossWatchdog.from_config(cfg)  # loss_watchdog_threshold: stop on a loss that stays high
        self.kto = cfg.rl == "kto"
        self.unit = "examples" if self.kto else "pairs"

    # --- setup: everything before the first step; an error here means nothing was trained ---------------------
    def release(self) -> None:
        """Give output_dir's lock back (the OS does it as well when the process ends)."""
        if getattr(self, "pre", None) is not None:
            self.pre.release()

    def setup(self) -> None:
        self.setup_data()
        self.setup_model()
        self.setup_optimizer()
        self.load_checkpoint()
        self.setup_reference()

    def setup_data(self) -> None:
        cfg, say = self.cfg, self.say
        self.pre = preflight(cfg)
        for note in single_process_notes(cfg) + self.pre.notes:
            say(f"note: {note}")
        seed_everything(cfg.seed)
        self.data = data = prepare_data(cfg, progress=sys.stderr.isatty())
        # refuses what cannot fit on this GPU, for the longest row of the data (a pair's prompt once + both answers)
        say(preflight_memory(cfg, self.pre.model_dir, self.pre.device, row=longest_row(data.train)))
        self.tokenizer = load_any_tokenizer(data.tokenizer_file)  # tekken.json, or an HF tokenizer.json
        self.pad_id = SpecialIds.of(self.tokenizer).pad
        self.device, self.dtype = self.pre.device, resolve_dtype(cfg, self.pre.device)
        self.out = cfg.out_dir.resolve()
        write_resolved_config(cfg, self.pre.model_dir)
        self.run_config = ckpt.run_config(resolved_config(cfg, self.pre.model_dir))  # saved in every checkpoint
        say(f"data: {len(data.train)} train + {len(data.eval)} eval {self.unit} (rl: {cfg.rl}), "
            f"{sum(len(s) for s in data.train)} tokens ({sum(s.n_trained for s in data.train)} trained)")
        if self.kto:
            n_good = sum(s.label for s in data.train)
            say(f"kto: {n_good} desirable + {len(data.train) - n_good} undesirable train examples")
            self.kl_rows = {"train": kto_kl_rows(data.train), "eval": kto_kl_rows(data.eval) if data.eval else []}

    def setup_model(self) -> None:
        cfg, device = self.cfg, self.device
        if cfg.tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.pre.resume is not None:
            ckpt_load.check_not_sharded(self.pre.resume)
        source = ckpt_load.full_model_source(cfg, self.pre.resume)
        self.autocast, self.cce = autocast_for(device, self.dtype), cfg.use_cce
        self.model, info, _ = build_model(source, device, tokenizer=self.tokenizer)
        self.model.train()
        why = None if self.kto else shared_row_unsupported(self.model)
        if why:
            raise ConfigError(why)
        self.say(f"model: {format_model_info(info)}; {device.type}, {str(self.dtype).removeprefix('torch.')}")
        for note in info.notes:
            self.say(f"note: {note}")

    def setup_optimizer(self) -> None:
        cfg, say = self.cfg, self.say
        mbs, accum, n = cfg.micro_batch_size, cfg.gradient_accumulation_steps, len(self.data.train)
        self.spe = spe = steps_per_epoch(n, mbs, accum)
        self.total = total = total_steps(n, mbs, accum, cfg.num_epochs, cfg.max_steps)
        warmup = warmup_steps(cfg, total)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler, warmup, total)
        say(f"schedule: {total} steps ({total / spe:.2f} epochs of {spe}) × {accum} micro-batches × {mbs} "
            f"{self.unit}; {cfg.lr_scheduler} lr {cfg.learning_rate:g}, warmup {warmup}; rl: {cfg.rl}, "
            f"beta {cfg.rl_beta:g}")
        n_eval = len(self.data.eval)
        self.eval_every = every(cfg.evals_per_epoch, cfg.eval_steps, spe) if n_eval else None
        self.save_every = every(cfg.saves_per_epoch, cfg.save_steps, spe)
        if not n_eval and (cfg.eval_steps or cfg.evals_per_epoch):
            say("note: no eval split (val_set_size: 0): eval_steps/evals_per_epoch have nothing to evaluate")
        self.image_encoder = image_encoder_of(self.tokenizer)

    def load_checkpoint(self) -> None:
        state = {"step": 0, "position": DataPosition().to_dict(), "losses": [], "window": PreferenceTotals().to_dict()}
        resume, n_train = self.pre.resume, len(self.data.train)
        if resume is not None:
            state = ckpt_load.load_checkpoint(resume, self.model, self.optimizer, self.scheduler)  # RNG restored last
            if state.get("n_train_samples") != n_train or state.get("rl") != self.cfg.rl:
                raise ckpt.CheckpointError(
                    f"{resume} was trained with rl: {state.get('rl')} on {state.get('n_train_samples')} {self.unit}, "
                    f"the run now has rl: {self.cfg.rl} and {n_train}: the data position cannot be restored. Start a "
                    "new output_dir")
            for note in ckpt.check_same_run(resume, state, self.run_config, self.total,
                                            self.cfg.resume_ignore_config_changes):
                self.say(f"note: {note}")
            self.say(f"resumed at step {state['step']} of {self.total}")
        self.step, self.position, self.losses = state["step"], DataPosition.from_dict(state["position"]), state["losses"]
        self.window = PreferenceTotals(**state["window"])
        self.rng = ckpt.capture_rng()

    def setup_reference(self) -> None:
        """The precomputed reference table where the config asks for one (preference_ref.py), else None."""
        cfg, data = self.cfg, self.data
        self.table = None
        if not cfg.precompute_ref_log_probs:
            return
        data_key = cache_key(cfg, resolve_tokenizer_file(cfg))
        mkey = model_key(self.pre.model_dir, cfg, self.dtype)
        path = table_path(cfg.prepared_dir, data_key, mkey)
        self.table = reference_table(
            self.model, {"train": data.train, "eval": data.eval}, self.kto, path, {"data_key": data_key,
            "model_key": mkey}, self.pre.resume is not None, self.say, pad_id=self.pad_id,
            micro_batch_size=cfg.micro_batch_size, device=self.device, autocast=self.autocast,
            image_encoder=self.image_encoder, cce=self.cce)

    # --- the forward of a micro-batch -------------------------------------------------------------------------------
    def micro_loss(self, split: str, idx: list[int], batch, kl: torch.Tensor | None):
        """The per-pair (KTO: per-example) losses of one micro-batch, with the reference where the loss has one."""
        cfg, model, rows = self.cfg, self.model, torch.tensor(idx, dtype=torch.long)
        if self.kto:
            policy, _ = sample_logps(model, batch, self.cce)
            if self.table is not None:
                ref = self.table[f"{split}.logps"][rows].to(policy.device)
            else:
                with torch.no_grad(), disabled_adapters(model):
                    ref = sample_logps(model, batch, self.cce)[0]
            samples = self.data.train if split == "train" else self.data.eval
            desirable = torch.tensor([samples[i].label for i in idx], device=policy.device)
            return example_loss(cfg, policy, ref, desirable, kl)
        policy = pair_logps(model, batch, self.cce)
        ref = None
        if cfg.rl in PAIR_REFERENCE:
            if self.table is not None:
                device = policy.chosen.device
                ref = PairLogps(self.table[f"{split}.chosen"][rows].to(device),
                                self.table[f"{split}.rejected"][rows].to(device), None, None)
            else:
                ref = reference_pair_logps(model, batch, self.cce)
        return pair_loss(cfg, policy, ref)

    def step_kl(self, split: str, idx: list[int]) -> torch.Tensor | None:
        """KTO's z₀ over these examples' mismatched rows, once per step (or per eval), detached."""
        if not self.kto:
            return None
        rows = [self.kl_rows[split][i] for i in idx]
        ref = None if self.table is None else self.table[f"{split}.kl"][torch.tensor(idx, dtype=torch.long)]
        return kto_rows_kl(self.model, rows, self.pad_id, self.cfg.micro_batch_size, self.image_encoder, ref,
                           self.cce, self.autocast)

    def forward_backward(self, micro: list) -> PreferenceTotals:
        """Σ_micro-batches ∇(Σ losses / items of the step): one big batch's mean loss, accumulated."""
        totals = PreferenceTotals()
        n_items = sum(len(idx) for idx, _ in micro)  # counted first, over the whole step
        with self.autocast():
            kl = self.step_kl("train", [i for idx, _ in micro for i in idx])
        for idx, batch in micro:
            batch = batch.to(self.device)
            with self.autocast():
                out = self.micro_loss("train", idx, batch, kl)
            (out.losses.sum() / n_items).backward()
            totals.add(out, batch.n_tokens)
        return totals

    # --- the loop -------------------------------------------------------------------------------------------------
    def train(self) -> int:
        cfg, data = self.cfg, self.data
        self.log = MetricsLogger(self.out, self.step, self.total, show_progress=sys.stderr.isatty())
        stop = StopFlag(self.say)
        stop.install()
        stream = iter(PreferenceStream(data.train, self.kto, cfg.micro_batch_size, cfg.gradient_accumulation_steps,
                                       self.pad_id, cfg.seed, start=self.position, image_encoder=self.image_encoder))
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else math.inf
        self.longest, self.run_seconds, self.run_steps = 0, 0.0, 0
        try:
            while self.step < self.total:
                self.train_step(stream, params, clip)
                if self.eval_every and self.step % self.eval_every == 0 and self.step < self.total:
                    self.run_eval()
                if (self.save_every and self.step % self.save_every == 0) or self.step == self.total:
                    self.save(self.step)
                if stop.signum is not None:
                    raise Interrupted
            if data.eval:
                self.run_eval()
        except (Interrupted, KeyboardInterrupt, TrainingStopped, torch.OutOfMemoryError) as e:
            return self.stopped(e)
        finally:
            stop.restore()
            self.log.close()
        return self.finish()

    def train_step(self, stream, params: list[torch.nn.Parameter], clip: float) -> None:
        t0 = time.perf_counter()
        next_position, micro = next(stream)
        self.longest = max([self.longest] + [b.input_ids.shape[1] for _, b in micro])
        result = self.forward_backward(micro)
        if not math.isfinite(result.loss):
            raise TrainingStopped(f"loss is {result.loss} at step {self.step + 1}")
        self.watchdog.check(self.step + 1, result.loss)  # before the optimizer step
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if not math.isfinite(grad_norm):
            raise TrainingStopped(f"gradient norm is {grad_norm} at step {self.step + 1} (loss {result.loss:.4f})")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.step, self.position, self.rng = self.step + 1, next_position, ckpt.capture_rng()
        self.losses.append([self.step, result.loss])
        result.seconds = time.perf_counter() - t0
        self.window.merge(result)
        self.run_seconds, self.run_steps = self.run_seconds + result.seconds, self.run_steps + 1
        self.log.advance()
        if self.step % self.cfg.logging_steps == 0 or self.step == self.total:
            self.log_window(lr, grad_norm)

    def log_window(self, lr: float, grad_norm: float) -> None:
        step, w, stats = self.step, self.window, self.window.stats()
        row = self.log.log_train(
            step, epoch=round(self.position.epoch + self.position.step / self.spe, 4), **stats, lr=lr,
            grad_norm=grad_norm, tokens_per_s=round(w.n_tokens / max(w.seconds, 1e-9), 1), pairs=w.n_items,
            peak_mem_gb=round(peak_memory_gb(self.device), 3))
        if self.log.bar is None:
            eta = (self.total - step) * self.run_seconds / self.run_steps
            self.log.message(f"step {step}/{self.total}: loss {row['loss']:.4f}, reward accuracy "
                             f"{stats['reward_accuracy']:.2f}, margin {stats['reward_margin']:.3f}, lr {lr:.3g}, "
                             f"grad_norm {grad_norm:.3f}, {row['tokens_per_s']:.0f} tok/s, ETA {eta:.0f}s")
        self.window = PreferenceTotals()

    @torch.no_grad()
    def evaluate(self) -> PreferenceTotals:
        """The same losses and rewards on the eval split (model in eval mode: no dropout)."""
        data, mbs, totals = self.data.eval, self.cfg.micro_batch_size, PreferenceTotals()
        self.model.eval()
        try:
            with self.autocast():
                kl = self.step_kl("eval", list(range(len(data))))
            collate = collate_kto if self.kto else collate_pairs
            for i in range(0, len(data), mbs):
                idx = list(range(i, min(i + mbs, len(data))))
                batch = collate([data[j] for j in idx], self.pad_id, self.image_encoder).to(self.device)
                with self.autocast():
                    totals.add(self.micro_loss("eval", idx, batch, kl), batch.n_tokens)
        finally:
            self.model.train()
        return totals

    def run_eval(self) -> None:
        self.log.log_eval_values(self.step, **self.evaluate().stats())

    def save(self, at: int) -> None:
        cfg, tokenizer_file = self.cfg, self.data.tokenizer_file
        trainer_state = {"step": at, "total_steps": self.total, "position": self.position.to_dict(),
                         "losses": self.losses, "window": self.window.to_dict(), "n_train_samples": len(self.data.train),
                         "steps_per_epoch": self.spe, "rl": cfg.rl,
                 "run_config": self.run_config}
        path = ckpt.save_checkpoint(self.out, at, lambda d: save_trained(self.model, d, cfg, tokenizer_file),
                                    self.optimizer, self.scheduler, trainer_state, self.rng, cfg.save_total_limit)
        self.log.message(f"saved {path}")

    # --- the end ----------------------------------------------------------------------------------------------------
    def stopped(self, e: BaseException) -> int:
        """The exit code of a run that did not finish, after saying why (and saving, after a stop signal)."""
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
                             f"  The last good checkpoint is {last or '(none yet)'}. Lower learning_rate or rl_beta, "
                             "keep max_grad_norm set (1.0), or check the data of this step; resume_from_checkpoint: "
                             "auto continues from there.")
            return 1
        self.log.message(f"error: out of memory at step {step + 1} ({oom_summary(e)})\n"
                         f"{oom_advice(self.cfg, self.longest)}")
        return 1

    def finish(self) -> int:
        cfg, out = self.cfg, self.out
        save_trained(self.model, out, cfg, self.data.tokenizer_file)
        png = plot_losses(self.log.path, out / "loss.png")
        done = [loss for _, loss in self.losses if loss is not None]
        self.say(f"done: {self.step} steps, loss {done[0]:.4f} → {done[-1]:.4f}" if done else f"done: {self.step} steps")
        self.say(f"outputs in {out}: {'adapter' if cfg.adapter else 'model'}, {self.data.tokenizer_file.name}, "
                 f"config.yaml, metrics.jsonl{', loss.png' if png else ''}")
        return 0


__all__ = ["DPO", "train"]
