"""`magistune train` in one process (one GPU, or the CPU): supervised fine-tuning, start to end.

    preflight (paths, device)  →  seed  →  data (+ packing)  →  model (+ LoRA/QLoRA)  →  optimizer, schedule
      →  resume?  →  for each step: forward/backward over the micro-batches, clip, step, log, eval, save
      →  final eval, checkpoint, adapter/model + tekken.json + config.yaml + metrics + loss.png

sft_distributed.py is this recipe on torchrun's N processes (FSDP2 / DDP), its loop repeated with the collectives
in it. Other training modes (DPO, GRPO) are to be sibling recipes (dpo.py, grpo.py) built from the same
components: batches, packing, loss, optim, checkpoint, metrics, stopping, preflight.

Exit codes: 0 done; 1 training failed (non-finite loss, out of memory); 2 the config, data or a path is
wrong (nothing was trained); 130 interrupted (Ctrl-C / SIGTERM: a checkpoint of the last finished step is saved).
"""

from __future__ import annotations

import math
import shutil
import sys
import time

import torch

from magistune.config import Config, ConfigError
from magistune.data.build import DataError, prepare_data
from magistune.model import build_model, format_model_info, resolve_dtype, save_trained
from magistune.tokenizer import SpecialIds, TokenizerError, image_encoder_of
from magistune.hf_tokenizer import load_any_tokenizer
from magistune.train import checkpoint as ckpt
from magistune.train import checkpoint_load as ckpt_load
from magistune.train.batches import DataPosition, StepStream, eval_batches, every, steps_per_epoch, total_steps
from magistune.train.launch import single_process_notes
from magistune.train.memory_estimate import preflight_memory
from magistune.train.loss import evaluate, forward_backward, loss_fn_for
from magistune.train.metrics import MetricsLogger, Printer, Window, peak_memory_gb, plot_losses
from magistune.train.optim import OptimizerError, build_optimizer, build_scheduler, warmup_steps
from magistune.train.packing import packings_for
from magistune.train.preflight import (
    autocast_for, oom_advice, preflight, resolved_config, seed_everything, write_resolved_config,
)
from magistune.train.watchdog import LossWatchdog
from magistune.train.stopping import Interrupted, StopFlag, TrainingStopped, oom_summary

SETUP_ERRORS = (ConfigError, ckpt.CheckpointError, OptimizerError, DataError, TokenizerError)


def train(cfg: Config) -> int:
    say = Printer()
    recipe = SFT(cfg, say)
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
        recipe.release()  # output_dir's lock


class SFT:
    """Supervised fine-tuning in one process: setup() then train(), which returns the exit code."""

    def __init__(self, cfg: Config, say: Printer):
        self.cfg, self.say = cfg, say
        self.watchdog = LossWatchdog.from_config(cfg)  # loss_watchdog_threshold: stop on a loss that stays high
        self.pre = None

    def release(self) -> None:
        """Give output_dir's lock back (the OS does it as well when the process ends)."""
        if self.pre is not None:
            self.pre.release()

    # --- setup: everything before the first step; an error here means nothing was trained ---------------------
    def setup(self) -> None:
        self.setup_data()
        self.setup_model()
        self.setup_optimizer()
        self.load_checkpoint()

    def setup_data(self) -> None:
        cfg, say = self.cfg, self.say
        self.pre = preflight(cfg)
        if cfg.sequence_parallel_degree > 1:
            raise ConfigError(f"sequence_parallel_degree: {cfg.sequence_parallel_degree} splits each row over that many "
                              "processes, and this is one; use `magistune train CONFIG --nproc N` (N a multiple of it)")
        for note in single_process_notes(cfg) + self.pre.notes:
            say(f"note: {note}")
        say(preflight_memory(cfg, self.pre.model_dir, self.pre.device))  # refuses what cannot fit on this GPU
        seed_everything(cfg.seed)
        self.data = data = prepare_data(cfg, progress=sys.stderr.isatty())
        self.tokenizer = load_any_tokenizer(data.tokenizer_file)  # tekken.json, or an HF tokenizer.json
        self.pad_id = SpecialIds.of(self.tokenizer).pad
        self.device, self.dtype = self.pre.device, resolve_dtype(cfg, self.pre.device)
        self.out = cfg.out_dir.resolve()  # "examples/../outputs/x" → "outputs/x" in messages
        write_resolved_config(cfg, self.pre.model_dir)
        self.run_config = ckpt.run_config(resolved_config(cfg, self.pre.model_dir))  # saved in every checkpoint
        say(f"data: {len(data.train)} train + {len(data.eval)} eval samples, {sum(len(s) for s in data.train)} "
            f"train tokens ({sum(s.n_trained for s in data.train)} trained)")
        try:
            self.packed, self.eval_packed = packings_for(cfg, data.train, data.eval)  # None, None without packing
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.packed:
            say(f"packing: {self.packed.describe()}")
        self.n_items = len(self.packed.packs) if self.packed else len(data.train)  # what an epoch shuffles

    def setup_model(self) -> None:
        cfg, device = self.cfg, self.device
        if cfg.tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.pre.resume is not None:
            ckpt_load.check_not_sharded(self.pre.resume)  # written by several processes: says how to use it
        source = ckpt_load.full_model_source(cfg, self.pre.resume)  # a full fine-tune resumes from its checkpoint's weights
        self.loss_fn, self.autocast = loss_fn_for(cfg), autocast_for(device, self.dtype)
        self.model, info, _ = build_model(source, device, tokenizer=self.tokenizer)  # load (4-bit?), LoRA or full
        self.model.train()  # from_pretrained returns eval mode: dropout off
        self.say(f"model: {format_model_info(info)}; {device.type}, {str(self.dtype).removeprefix('torch.')}")
        for note in info.notes:
            self.say(f"note: {note}")

    def setup_optimizer(self) -> None:
        cfg, say = self.cfg, self.say
        mbs, accum = cfg.micro_batch_size, cfg.gradient_accumulation_steps
        self.spe = spe = steps_per_epoch(self.n_items, mbs, accum)
        self.total = total = total_steps(self.n_items, mbs, accum, cfg.num_epochs, cfg.max_steps)
        warmup = warmup_steps(cfg, total)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler, warmup, total)
        unit = "packed rows" if self.packed else "samples"
        say(f"schedule: {total} steps ({total / spe:.2f} epochs of {spe}) × {accum} micro-batches × {mbs} {unit} "
            f"(≤ {mbs} × {cfg.sequence_len} × {accum} = {mbs * cfg.sequence_len * accum:,} tokens/step); "
            f"{cfg.lr_scheduler} lr {cfg.learning_rate:g}, warmup {warmup}")
        n_eval = len(self.data.eval)
        self.eval_every = every(cfg.evals_per_epoch, cfg.eval_steps, spe) if n_eval else None
        self.save_every = every(cfg.saves_per_epoch, cfg.save_steps, spe)
        if not n_eval and (cfg.eval_steps or cfg.evals_per_epoch):
            say("note: no eval split (val_set_size: 0): eval_steps/evals_per_epoch have nothing to evaluate")
        self.image_encoder = image_encoder_of(self.tokenizer)  # None without an image config
        self.pad_to = cfg.sequence_len if cfg.pad_to_sequence_len else 0  # fixed shapes: batches sequence_len wide

    def load_checkpoint(self) -> None:
        """The state of the step to start from: step 0, or a checkpoint's (model, optimizer, scheduler, RNG)."""
        state = {"step": 0, "position": DataPosition().to_dict(), "losses": [], "window": Window().to_dict()}
        resume, n_train = self.pre.resume, len(self.data.train)
        if resume is not None:
            state = ckpt_load.load_checkpoint(resume, self.model, self.optimizer, self.scheduler)  # RNG restored last
            if state.get("n_train_samples") != n_train:
                raise ckpt.CheckpointError(
                    f"{resume} was trained on {state.get('n_train_samples')} samples, the data now has {n_train}: "
                    "the data position cannot be restored. Start a new output_dir (lora_model_dir continues from "
                    "an adapter with fresh data)")
            for note in ckpt.check_same_run(resume, state, self.run_config, self.total,
                                            self.cfg.resume_ignore_config_changes):
                self.say(f"note: {note}")
            self.say(f"resumed at step {state['step']} of {self.total}")
        self.step, self.position, self.losses = state["step"], DataPosition.from_dict(state["position"]), state["losses"]
        self.window = Window(**state["window"])
        self.rng = ckpt.capture_rng()  # the RNG at the last step boundary: what a checkpoint saves

    # --- the loop -------------------------------------------------------------------------------------------------
    def train(self) -> int:
        cfg, data = self.cfg, self.data
        self.log = MetricsLogger(self.out, self.step, self.total, show_progress=sys.stderr.isatty())
        stop = StopFlag(self.say)
        stop.install()
        stream = iter(StepStream(data.train, cfg.micro_batch_size, cfg.gradient_accumulation_steps, self.pad_id,
                                 cfg.seed, start=self.position, image_encoder=self.image_encoder,
                                 packs=self.packed.packs if self.packed else None, pad_to=self.pad_to))
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else math.inf  # inf: measure only
        self.longest, self.run_seconds, self.run_steps = 0, 0.0, 0  # this process's steps, for the ETA
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
        except (Interrupted, KeyboardInterrupt, TrainingStopped, torch.OutOfMemoryError, ckpt.NoSpace) as e:
            return self.stopped(e)
        finally:
            stop.restore()
            self.log.close()
        return self.finish()

    def train_step(self, stream, params: list[torch.nn.Parameter], clip: float) -> None:
        """One optimizer step: forward/backward over its micro-batches, clip, step; then its metrics row."""
        t0 = time.perf_counter()
        next_position, micro = next(stream)
        self.longest = max([self.longest] + [b.input_ids.shape[1] for b in micro])
        result = forward_backward(self.model, micro, self.loss_fn, self.autocast, self.device)
        if result.n_trained == 0:
            self.log.message(f"note: step {self.step + 1} has no trained token; its samples are skipped")
        elif not math.isfinite(result.loss):
            raise TrainingStopped(f"loss is {result.loss} at step {self.step + 1}")
        self.watchdog.check(self.step + 1, result.loss if result.n_trained else None)  # before the optimizer step
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if result.n_trained and not math.isfinite(grad_norm):
            raise TrainingStopped(f"gradient norm is {grad_norm} at step {self.step + 1} (loss {result.loss:.4f})")
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.step, self.position, self.rng = self.step + 1, next_position, ckpt.capture_rng()
        self.losses.append([self.step, result.loss if result.n_trained else None])
        w = self.window
        w.loss_sum += result.loss_sum
        w.n_trained += result.n_trained
        w.n_tokens += result.n_tokens
        w.seconds += time.perf_counter() - t0
        self.run_seconds, self.run_steps = self.run_seconds + time.perf_counter() - t0, self.run_steps + 1
        self.log.advance()
        if self.step % self.cfg.logging_steps == 0 or self.step == self.total:
            self.log_window(lr, grad_norm)

    def log_window(self, lr: float, grad_norm: float) -> None:
        step, w = self.step, self.window
        row = self.log.log_train(
            step, epoch=round(self.position.epoch + self.position.step / self.spe, 4),
            loss=w.loss_sum / max(w.n_trained, 1), lr=lr, grad_norm=grad_norm,
            tokens_per_s=round(w.n_tokens / max(w.seconds, 1e-9), 1),
            trained_tokens=w.n_trained, peak_mem_gb=round(peak_memory_gb(self.device), 3))
        if self.log.bar is None:
            eta = (self.total - step) * self.run_seconds / self.run_steps
            self.log.message(f"step {step}/{self.total}: loss {row['loss']:.4f}, lr {lr:.3g}, grad_norm "
                             f"{grad_norm:.3f}, {row['tokens_per_s']:.0f} tok/s, ETA {eta:.0f}s")
        self.window = Window()

    def run_eval(self) -> None:
        mbs, packs = self.cfg.micro_batch_size, self.eval_packed.packs if self.eval_packed else None
        batches = eval_batches(self.data.eval, mbs, self.pad_id, self.image_encoder, packs, self.pad_to)
        result = evaluate(self.model, batches, self.loss_fn, self.autocast, self.device)
        self.log.log_eval(self.step, result.loss, result.n_trained)

    def save(self, at: int) -> None:
        cfg, tokenizer_file = self.cfg, self.data.tokenizer_file
        warning = ckpt.space_warning(self.out)  # less free space than the last checkpoint took
        if warning:
            self.log.message(warning)
        trainer_state = {"step": at, "total_steps": self.total, "position": self.position.to_dict(),
                         "losses": self.losses, "window": self.window.to_dict(), "n_train_samples": len(self.data.train),
                         "steps_per_epoch": self.spe, "run_config": self.run_config}
        path = ckpt.save_checkpoint(self.out, at, lambda d: save_trained(self.model, d, cfg, tokenizer_file),
                                    self.optimizer, self.scheduler, trainer_state, self.rng, cfg.save_total_limit)
        self.log.message(f"saved {path}")

    # --- the end ----------------------------------------------------------------------------------------------------
    def stopped(self, e: BaseException) -> int:
        """The exit code of a run that did not finish, after saying why (and saving, after a stop signal)."""
        step, last = self.step, ckpt.latest_checkpoint(self.out)
        if isinstance(e, ckpt.NoSpace):
            self.log.message(f"error: {e}")
            return 1
        if isinstance(e, Interrupted):
            if step > 0 and not ckpt.is_complete(self.out / f"{ckpt.PREFIX}{step}"):
                try:
                    self.save(step)
                except ckpt.NoSpace as err:
                    self.log.message(f"error: {err}")
                    return 1
            self.log.message(f"interrupted after step {step}; resume with resume_from_checkpoint: auto")
            return 130
        if isinstance(e, KeyboardInterrupt):
            self.log.message(f"interrupted during step {step + 1}: nothing saved; the last checkpoint is "
                             f"{last or '(none)'}")
            return 130
        if isinstance(e, TrainingStopped):
            self.log.message(f"error: {e}: stopping before the optimizer step, so no weight is corrupted.\n"
                             f"  The last good checkpoint is {last or '(none yet)'}. Lower learning_rate, keep "
                             "max_grad_norm set (1.0), or check the data of this step; resume_from_checkpoint: auto "
                             "continues from there.")
            return 1
        self.log.message(f"error: out of memory at step {step + 1} ({oom_summary(e)})\n"
                         f"{oom_advice(self.cfg, self.longest)}")
        return 1

    def finish(self) -> int:
        cfg, out = self.cfg, self.out
        try:
            save_trained(self.model, out, cfg, self.data.tokenizer_file)
        except OSError as e:
            if not ckpt.is_no_space(e):
                raise
            self.say(f"error: no space left on {out} for the final {'adapter' if cfg.adapter else 'model'} "
                     f"({shutil.disk_usage(out).free / 1e9:.1f} GB free); the trained weights are in "
                     f"{ckpt.latest_checkpoint(out)}")
            return 1
        png = plot_losses(self.log.path, out / "loss.png")
        done = [loss for _, loss in self.losses if loss is not None]
        self.say(f"done: {self.step} steps, loss {done[0]:.4f} → {done[-1]:.4f}" if done else f"done: {self.step} steps")
        self.say(f"outputs in {out}: {'adapter' if cfg.adapter else 'model'}, {self.data.tokenizer_file.name}, "
                 f"config.yaml, metrics.jsonl{', loss.png' if png else ''}")
        return 0


__all__ = ["SFT", "train"]
