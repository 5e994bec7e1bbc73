"""`magistune train` with `rl:` under torchrun: preference tuning (DPO, IPO, ORPO, SimPO, KTO) on N processes,
one per GPU, FSDP2 or DDP (`magistune train config.yaml --nproc 2`).

dpo.py's recipe, step for step, with what sft_distributed.py adds for N processes (rank 0 prepares the data first,
the ranks agree on config and data, the model sharded or replicated, each rank's share of every epoch, sharded
checkpoints, the final output gathered on rank 0). What is particular to pairs:

- Every forward goes through the FSDP / DDP root, sharding.LossModule around preference_ranks.preference_forward
  (an adapter run's reference: the adapters off inside that forward). preference_ranks.RankForwards computes a
  micro-batch's losses, KTO's z₀ over every rank's examples, and the precomputed reference table (every rank runs
  the same forwards, rank 0 writes the file); eval_groups deals the eval micro-batches.
- The loss: Σ per-pair losses / P, P = the pairs of the step on ALL ranks (all-reduced before any backward). Each
  rank backpropagates Σ its losses × N / P and FSDP2 / DDP average the gradients over the N ranks (÷ N):
  Σ_r ∇ Σ losses_r / P, the one-process gradient of the same global batch. Metrics: sums over the ranks.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from magistune.config import Config, ConfigError
from magistune.data.build import prepare_data
from magistune.model import format_model_info, resolve_dtype
from magistune.tokenizer import SpecialIds, image_encoder_of
from magistune.hf_tokenizer import load_any_tokenizer
from magistune.train import checkpoint as ckpt
from magistune.train.batches import DataPosition, check_share, every, items_per_rank, steps_per_epoch, total_steps
from magistune.train.dist_checkpoint import check_resumable, load_sharded, save_consolidated, save_sharded
from magistune.train.distributed import (DistributedError, Ranks, agree, clip_grad_norm_, join, mode_notes,
                                         run_main_first)
from magistune.train.dpo import SETUP_ERRORS, PreferenceStream
from magistune.train.memory_estimate import longest_row, preflight_memory
from magistune.train.metrics import MetricsLogger, Printer, QuietLogger, peak_memory_gb, plot_losses
from magistune.train.optim import build_optimizer, build_scheduler, warmup_steps
from magistune.train.preference_ranks import RankForwards, eval_groups, preference_forward, summed
from magistune.train.preference_step import PreferenceTotals, collate_kto, collate_pairs, shared_row_unsupported
from magistune.train.preflight import (autocast_for, oom_advice, preflight, resolved_config, seed_everything,
                                       write_resolved_config)
from magistune.train.sharding import build_parallel_model, grad_sync
from magistune.train.stopping import Interrupted, StopFlag, TrainingStopped, oom_summary
from magistune.train.watchdog import LossWatchdog


def train(cfg: Config, env: dict, mode: str) -> int:
    """One rank's run: `env` is launch.torchrun_env(), `mode` "fsdp" or "ddp" (launch.distributed_mode)."""
    say = Printer(env["rank"])
    try:
        ranks = join(cfg, env)
    except DistributedError as e:
        say(f"error: {e}")
        return 2
    recipe = DPODistributed(cfg, ranks, mode, say)
    try:
        try:
            recipe.setup()
        except SETUP_ERRORS as e:
            say(f"error: {e}")
            return 2
        except torch.OutOfMemoryError as e:
            say(f"error: out of memory while loading or preparing the model ({oom_summary(e)})\n"
                f"{oom_advice(cfg, None)}")
            return 1
        return recipe.train()
    finally:
        recipe.release()
        ranks.close()


class DPODistributed:
    """Preference tuning as one of torchrun's N processes: setup() then train(), which returns the exit code."""

    def __init__(self, cfg: Config, ranks: Ranks, mode: str, say: Printer):
        self.cfg, self.ranks, self.mode, self.say = cfg, ranks, mode, say
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
        cfg, say, ranks = self.cfg, self.say, self.ranks
        error = None
        try:  # rank 0 alone locks output_dir, checks it for an earlier run and verifies the checkpoint
            self.pre = preflight(cfg, main=ranks.is_main)
        except SETUP_ERRORS as e:
            error = e
        if ranks.any(error is not None):  # every rank stops (none waits in a collective for rank 0)
            raise error or ConfigError("stopped: rank 0 refused the run (its message says why)")
        self.pre.resume = ranks.broadcast_object(self.pre.resume)  # rank 0's choice: it skipped damaged ones
        for note in mode_notes(cfg, self.mode, ranks.world) + self.pre.notes:
            say(f"note: {note}")
        seed_everything(cfg.seed)
        self.data = data = run_main_first(ranks, lambda: prepare_data(cfg, progress=sys.stderr.isatty() and ranks.is_main))
        self.tokenizer = load_any_tokenizer(data.tokenizer_file)  # tekken.json, or an HF tokenizer.json
        resolved = resolved_config(cfg, self.pre.model_dir)
        agree(ranks, resolved, data)  # every rank has the same config and samples
        self.check_memory(data)
        self.run_config = ckpt.run_config(resolved)  # saved in every checkpoint
        self.pad_id = SpecialIds.of(self.tokenizer).pad
        self.device, self.dtype = self.pre.device, resolve_dtype(cfg, self.pre.device)
        self.out = cfg.out_dir.resolve()
        if ranks.is_main:
            write_resolved_config(cfg, self.pre.model_dir)
        say(f"data: {len(data.train)} train + {len(data.eval)} eval {self.unit} (rl: {cfg.rl}), "
            f"{sum(len(s) for s in data.train)} tokens ({sum(s.n_trained for s in data.train)} trained)")
        check_share(len(data.train), ranks.world, "example" if self.kto else "pair", "processes",  # before the model
                    f"Add training {self.unit}, lower val_set_size, or run fewer processes (--nproc)")

    def check_memory(self, data) -> None:
        """The memory line; every rank stops when one's GPU is too small (none waits in a collective)."""
        cfg, ranks, error, line = self.cfg, self.ranks, None, None
        try:
            line = preflight_memory(cfg, self.pre.model_dir, self.pre.device, world=ranks.world,
                                    fsdp=self.mode == "fsdp", row=longest_row(data.train))
        except ConfigError as e:
            error = e
        if ranks.any(error is not None):
            raise error or ConfigError("stopped: another rank's GPU is too small (its message says why)")
        self.say(line)

    def setup_model(self) -> None:
        cfg, device = self.cfg, self.device
        if cfg.tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.pre.resume is not None:
            check_resumable(self.pre.resume, self.ranks.world, self.mode)
        self.autocast = autocast_for(device, self.dtype)
        self.model, self.root, info = build_parallel_model(self.ranks, self.mode, cfg, self.tokenizer,
                                                           preference_forward)
        self.model.train()
        why = None if self.kto else shared_row_unsupported(self.model)
        if why:
            raise DistributedError(why)
        self.say(f"model: {format_model_info(info)}; {device.type}, {str(self.dtype).removeprefix('torch.')}; "
                 f"{self.mode} over {self.ranks.world} processes")
        for note in info.notes:
            self.say(f"note: {note}")

    def setup_optimizer(self) -> None:
        cfg, say, world = self.cfg, self.say, self.ranks.world
        mbs, accum = cfg.micro_batch_size, cfg.gradient_accumulation_steps
        n_share = items_per_rank(len(self.data.train), world)  # each rank's equal share of an epoch
        self.spe = spe = steps_per_epoch(n_share, mbs, accum)
        self.total = total = total_steps(n_share, mbs, accum, cfg.num_epochs, cfg.max_steps)
        warmup = warmup_steps(cfg, total)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler, warmup, total)
        say(f"schedule: {total} steps ({total / spe:.2f} epochs of {spe}) × {accum} micro-batches × {mbs} "
            f"{self.unit}; {cfg.lr_scheduler} lr {cfg.learning_rate:g}, warmup {warmup}; rl: {cfg.rl}, "
            f"beta {cfg.rl_beta:g}")
        say(f"{self.mode}: {world} processes, each with the above: {world * mbs * accum} {self.unit} per step in all")
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
            state = load_sharded(self.ranks, self.mode, resume, self.model, self.optimizer, self.scheduler)
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
        """The forwards of the steps and evals, with the reference table where the config asks for one."""
        self.forwards = RankForwards(self.cfg, self.ranks, self.model, self.root, self.data, self.pad_id,
                                     self.image_encoder, self.device, self.autocast)
        self.forwards.load_reference(self.pre.model_dir, self.dtype, self.pre.resume is not None, self.say)

    # --- the forward and backward of a step -------------------------------------------------------------------------
    def forward_backward(self, micro: list) -> PreferenceTotals:
        """Σ_micro-batches ∇(Σ losses × N / pairs of the step on all ranks); the step's totals over all ranks."""
        totals = PreferenceTotals()
        n_all = self.ranks.sum([float(sum(len(idx) for idx, _ in micro))])[0]  # counted first, on every rank
        scale = self.ranks.world / n_all
        kl = self.forwards.step_kl("train", [(idx, True) for idx, _ in micro])
        for i, (idx, batch) in enumerate(micro):
            batch = batch.to(self.device)
            with self.grad_sync(i == len(micro) - 1):
                with self.autocast():
                    out = self.forwards.micro_loss("train", idx, batch, kl)
                (out.losses.sum() * scale).backward()
            totals.add(out, batch.n_tokens)
        return summed(self.ranks, totals)

    # --- the loop -------------------------------------------------------------------------------------------------
    def train(self) -> int:
        cfg, data, ranks = self.cfg, self.data, self.ranks
        self.log = (MetricsLogger(self.out, self.step, self.total, show_progress=sys.stderr.isatty())
                    if ranks.is_main else QuietLogger(self.say))
        stop = StopFlag(self.say)
        stop.install()
        stream = iter(PreferenceStream(data.train, self.kto, cfg.micro_batch_size, cfg.gradient_accumulation_steps,
                                       self.pad_id, cfg.seed, start=self.position, image_encoder=self.image_encoder,
                                       shard=(ranks.rank, ranks.world)))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.grad_sync = grad_sync(self.root, self.mode, cfg)
        clip = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else math.inf
        self.longest, self.run_seconds, self.run_steps = 0, 0.0, 0
        try:
            while self.step < self.total:
                self.train_step(stream, params, clip)
                if self.eval_every and self.step % self.eval_every == 0 and self.step < self.total:
                    self.run_eval()
                if (self.save_every and self.step % self.save_every == 0) or self.step == self.total:
                    self.save(self.step)
                if ranks.any(stop.signum is not None):  # every rank stops at the same step
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
        self.watchdog.check(self.step + 1, result.loss)  # the loss over all ranks: every rank stops together
        grad_norm = clip_grad_norm_(params, clip)  # over every rank's shards
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
        """The losses and rewards on the eval split, each rank its share (eval_groups), summed over the ranks."""
        data, totals = self.data.eval, PreferenceTotals()
        groups = eval_groups(len(data), self.cfg.micro_batch_size, self.ranks)
        collate = collate_kto if self.kto else collate_pairs
        self.model.eval()
        try:
            kl = self.forwards.step_kl("eval", groups)
            for idx, counted in groups:
                batch = collate([data[j] for j in idx], self.pad_id, self.image_encoder).to(self.device)
                with self.autocast():
                    out = self.forwards.micro_loss("eval", idx, batch, kl)
                if counted:
                    totals.add(out, batch.n_tokens)
        finally:
            self.model.train()
        return summed(self.ranks, totals)

    def run_eval(self) -> None:
        self.log.log_eval_values(self.step, **self.evaluate().stats())

    def save(self, at: int) -> None:
        cfg = self.cfg
        trainer_state = {"step": at, "total_steps": self.total, "position": self.position.to_dict(),
                         "losses": self.losses, "window": self.window.to_dict(), "n_train_samples": len(self.data.train),
                         "steps_per_epoch": self.spe, "rl": cfg.rl,
                         "run_config": self.run_config}
        path = save_sharded(self.ranks, self.mode, self.dtype, self.out, at, self.model, self.optimizer,
                            self.scheduler, trainer_state, self.rng, cfg, self.data.tokenizer_file)
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
        save_consolidated(self.ranks, self.model, out, cfg, self.data.tokenizer_file)  # gathered on rank 0
        png = plot_losses(self.log.path, out / "loss.png") if self.ranks.is_main else None
        done = [loss for _, loss in self.losses if loss is not None]
        self.say(f"done: {self.step} steps, loss {done[0]:.4f} → {done[-1]:.4f}" if done else f"done: {self.step} steps")
        self.say(f"outputs in {out}: {'adapter' if cfg.adapter else 'model'}, {self.data.tokenizer_file.name}, "
                 f"config.yaml, metrics.jsonl{', loss.png' if png else ''}")
        return 0


__all__ = ["DPODistributed", "train"]
