"""`magistune train` under torchrun: supervised fine-tuning on N processes, one per GPU, FSDP2 or DDP.

    torchrun --standalone --nproc-per-node 2 -m magistune train config.yaml    (or: magistune train config.yaml --nproc 2)

The recipe of sft.py, step for step, with what N processes add:
    join the process group  →  rank 0 prepares the data first  →  the ranks check that they agree (config, data)
    →  the model sharded (FSDP2) or replicated (DDP): sharding.py  →  each rank takes its share of every epoch
    →  the step's loss normalised over all ranks' tokens (distributed.py has the arithmetic), the gradient norm
       over all shards  →  sharded checkpoints (dist_checkpoint.py)  →  the final output gathered on rank 0
Rank 0 prints and writes the metrics; the other ranks print only their errors.
With sequence_parallel_degree P > 1 (sequence_parallel.py) the N ranks form N / P groups of P: the P ranks of a
group train the same rows, each a slice of them, and the data is shared among the groups instead of the ranks.

Exit codes as in sft.py: 0 done; 1 training failed; 2 the config, data or a path is wrong; 130 interrupted.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from magistune.config import Config, ConfigError
from magistune.data.build import DataError, prepare_data
from magistune.model import format_model_info, resolve_dtype
from magistune.hf_tokenizer import load_any_tokenizer
from magistune.model.load import check_model_dir
from magistune.tokenizer import SpecialIds, TokenizerError, image_encoder_of
from magistune.train import checkpoint as ckpt
from magistune.train.batches import (
    DataPosition, StepStream, check_share, eval_batches, every, items_per_rank, steps_per_epoch, total_steps,
)
from magistune.train.dist_checkpoint import check_resumable, load_sharded, save_consolidated, save_sharded
from magistune.train.distributed import (
    DistributedError, Ranks, agree, clip_grad_norm_, eval_share, join, mode_notes, run_main_first, step_total,
    token_normaliser,
)
from magistune.train.memory_estimate import preflight_memory
from magistune.train.loss import evaluate, forward_backward, loss_fn_for
from magistune.train.metrics import MetricsLogger, Printer, QuietLogger, Window, peak_memory_gb, plot_losses
from magistune.train.optim import OptimizerError, build_optimizer, build_scheduler, warmup_steps
from magistune.train.packing import packings_for
from magistune.train.preflight import (
    autocast_for, oom_advice, preflight, resolved_config, seed_everything, write_resolved_config,
)
from magistune.train.sequence_parallel import (
    check_degree, new_groups, slice_loss_fn, sp_normaliser, use_ulysses,
)
from magistune.train.sharding import build_parallel_model, grad_sync
from magistune.train.watchdog import LossWatchdog
from magistune.train.stopping import Interrupted, StopFlag, TrainingStopped, oom_summary

SETUP_ERRORS = (ConfigError, ckpt.CheckpointError, OptimizerError, DataError, TokenizerError)


def train(cfg: Config, env: dict, mode: str) -> int:
    """One rank's run: `env` is launch.torchrun_env(), `mode` "fsdp" or "ddp" (launch.distributed_mode)."""
    say = Printer(env["rank"])
    try:
        ranks = join(cfg, env)
    except DistributedError as e:
        say(f"error: {e}")
        return 2
    recipe = SFTDistributed(cfg, ranks, mode, say)
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


class SFTDistributed:
    """Supervised fine-tuning as one of torchrun's N processes: setup() then train(), which returns the exit code."""

    def __init__(self, cfg: Config, ranks: Ranks, mode: str, say: Printer):
        self.cfg, self.ranks, self.mode, self.say = cfg, ranks, mode, say
        self.watchdog = LossWatchdog.from_config(cfg)  # loss_watchdog_threshold: stop on a loss that stays high
        self.pre = None
        self.sp = None  # this rank's sequence-parallel group (sequence_parallel_degree > 1)
        self.dp_rank, self.dp_world, self.copies = ranks.rank, ranks.world, 1  # who shares the data, and how

    def release(self) -> None:
        """Rank 0 gives output_dir's lock back (the OS does it as well when the process ends)."""
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
        ranks = self.ranks
        error = None
        try:  # rank 0 alone locks output_dir, checks it for an earlier run and verifies the checkpoint
            self.pre = preflight(cfg, main=ranks.is_main)
            memory = preflight_memory(cfg, self.pre.model_dir, self.pre.device, world=ranks.world,
                                      sp_degree=cfg.sequence_parallel_degree, fsdp=self.mode == "fsdp")
        except SETUP_ERRORS as e:
            error = e
        if ranks.any(error is not None):  # every rank stops (none waits in a collective for rank 0)
            raise error or ConfigError("stopped: rank 0 refused the run (its message says why)")
        self.pre.resume = ranks.broadcast_object(self.pre.resume)  # rank 0's choice: it skipped damaged ones
        for note in mode_notes(cfg, self.mode, ranks.world) + self.pre.notes:
            say(f"note: {note}")
        say(memory)
        self.setup_sequence_parallel()
        seed_everything(cfg.seed)
        self.data = data = run_main_first(ranks, lambda: prepare_data(cfg, progress=sys.stderr.isatty() and ranks.is_main))
        self.tokenizer = load_any_tokenizer(data.tokenizer_file)  # tekken.json, or an HF tokenizer.json
        resolved = resolved_config(cfg, self.pre.model_dir)
        agree(ranks, resolved, data)  # every rank has the same config and samples
        self.run_config = ckpt.run_config(resolved)  # saved in every checkpoint
        self.pad_id = SpecialIds.of(self.tokenizer).pad
        self.device, self.dtype = self.pre.device, resolve_dtype(cfg, self.pre.device)
        self.out = cfg.out_dir.resolve()  # "examples/../outputs/x" → "outputs/x" in messages
        if ranks.is_main:
            write_resolved_config(cfg, self.pre.model_dir)
        say(f"data: {len(data.train)} train + {len(data.eval)} eval samples, {sum(len(s) for s in data.train)} "
            f"train tokens ({sum(s.n_trained for s in data.train)} trained)")
        try:
            self.packed, self.eval_packed = packings_for(cfg, data.train, data.eval)  # None, None without packing
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.packed:
            say(f"packing: {self.packed.describe()}")
        self.n_items = len(self.packed.packs) if self.packed else len(data.train)  # what an epoch shuffles
        self.check_share()

    def check_share(self) -> None:
        """Every rank (or sequence-parallel group) needs one row of each epoch: a ConfigError before the model loads."""
        who = (f"data-parallel groups ({self.ranks.world} processes / sequence_parallel_degree {self.copies})"
               if self.sp else "processes")
        if self.packed:
            check_share(self.n_items, self.dp_world, "row", who,
                        "Add training data, run fewer processes (--nproc), or set sample_packing: false or a shorter "
                        "sequence_len (fewer samples per packed row)", tail=" after sample packing")
        else:
            check_share(self.n_items, self.dp_world, "sample", who,
                        "Add training data, lower val_set_size, or run fewer processes (--nproc)")

    def setup_sequence_parallel(self) -> None:
        degree, world = self.cfg.sequence_parallel_degree, self.ranks.world
        if degree == 1:
            return
        if world % degree:
            raise ConfigError(f"sequence_parallel_degree: {degree} does not divide the {world} processes "
                              "(--nproc / --nproc-per-node × nodes must be a multiple of it)")
        self.sp = new_groups(self.ranks.rank, world, degree)
        self.dp_rank, self.dp_world, self.copies = self.sp.dp_rank, self.sp.dp_world, degree
        self.say(f"sequence parallel: {degree} ranks per row (Ulysses all-to-all attention), each holding 1/{degree} "
                 f"of its tokens; {self.dp_world} data-parallel group{'s' if self.dp_world > 1 else ''}")

    def setup_model(self) -> None:
        cfg, device = self.cfg, self.device
        if cfg.tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.pre.resume is not None:  # every rank builds from the base model; the checkpoint then overwrites it
            check_resumable(self.pre.resume, self.ranks.world, self.mode)
        self.loss_fn, self.autocast = loss_fn_for(cfg), autocast_for(device, self.dtype)
        if self.sp is not None:  # before the model loads: the heads must split evenly
            text_config = check_model_dir(self.pre.model_dir, trust_remote_code=cfg.trust_remote_code).get_text_config()
            check_degree(self.sp.size, self.ranks.world, text_config)
            self.loss_fn = slice_loss_fn(cfg, self.sp, self.pad_id)
        # the loss runs inside the FSDP / DDP root (root(batch)), so that the engines' hooks run
        self.model, self.root, info = build_parallel_model(self.ranks, self.mode, cfg, self.tokenizer, self.loss_fn)
        self.loss = lambda model, batch: self.root(batch)  # noqa: E731 (forward_backward's loss signature)
        self.model.train()  # from_pretrained returns eval mode: dropout off
        if self.sp is not None:
            use_ulysses(self.model)
        self.say(f"model: {format_model_info(info)}; {device.type}, {str(self.dtype).removeprefix('torch.')}; "
                 f"{self.mode} over {self.ranks.world} processes")
        for note in info.notes:
            self.say(f"note: {note}")

    def setup_optimizer(self) -> None:
        cfg, say = self.cfg, self.say
        mbs, accum, world = cfg.micro_batch_size, cfg.gradient_accumulation_steps, self.dp_world
        n_share = items_per_rank(self.n_items, world)  # each rank's equal share of an epoch
        self.spe = spe = steps_per_epoch(n_share, mbs, accum)
        self.total = total = total_steps(n_share, mbs, accum, cfg.num_epochs, cfg.max_steps)
        warmup = warmup_steps(cfg, total)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler, warmup, total)
        unit = "packed rows" if self.packed else "samples"
        say(f"schedule: {total} steps ({total / spe:.2f} epochs of {spe}) × {accum} micro-batches × {mbs} {unit} "
            f"(≤ {mbs} × {cfg.sequence_len} × {accum} = {mbs * cfg.sequence_len * accum:,} tokens/step); "
            f"{cfg.lr_scheduler} lr {cfg.learning_rate:g}, warmup {warmup}")
        plural = "s" if world > 1 else ""
        groups = f"{world} group{plural} of {self.copies} processes" if self.sp else f"{world} processes"
        say(f"{self.mode}: {groups}, each with the above: {world * mbs * accum} {unit} per step in all")
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
            state = load_sharded(self.ranks, self.mode, resume, self.model, self.optimizer, self.scheduler)
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
        ranks = self.ranks
        self.log = (MetricsLogger(self.out, self.step, self.total, show_progress=sys.stderr.isatty())
                    if ranks.is_main else QuietLogger(self.say))
        stop = StopFlag(self.say)
        stop.install()
        stream = iter(StepStream(data.train, cfg.micro_batch_size, cfg.gradient_accumulation_steps, self.pad_id,
                                 cfg.seed, start=self.position, image_encoder=self.image_encoder,
                                 packs=self.packed.packs if self.packed else None, shard=(self.dp_rank, self.dp_world),
                                 pad_to=self.pad_to))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.normaliser, self.grad_sync = token_normaliser(ranks), grad_sync(self.root, self.mode, cfg)
        if self.sp is not None:  # a group's P ranks count the same tokens
            self.normaliser = sp_normaliser(self.normaliser, self.copies)
        clip = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else math.inf  # inf: measure only
        self.longest, self.run_seconds, self.run_steps = 0, 0.0, 0  # this process's steps, for the ETA
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
        result = step_total(self.ranks, forward_backward(self.model, micro, self.loss, self.autocast, self.device,
                                                         self.normaliser, self.grad_sync), self.copies)
        if result.n_trained == 0:
            self.log.message(f"note: step {self.step + 1} has no trained token; its samples are skipped")
        elif not math.isfinite(result.loss):
            raise TrainingStopped(f"loss is {result.loss} at step {self.step + 1}")
        self.watchdog.check(self.step + 1, result.loss if result.n_trained else None)  # before the optimizer step
        grad_norm = clip_grad_norm_(params, clip)  # over every rank's shards
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
        mine = eval_share(batches, self.dp_rank, self.dp_world)
        result = step_total(self.ranks, evaluate(self.model, mine, self.loss, self.autocast, self.device), self.copies)
        self.log.log_eval(self.step, result.loss, result.n_trained)

    def save(self, at: int) -> None:
        cfg, tokenizer_file = self.cfg, self.data.tokenizer_file
        warning = ckpt.space_warning(self.out)  # less free space than the last checkpoint took
        if warning:
            self.log.message(warning)
        trainer_state = {"step": at, "total_steps": self.total, "position": self.position.to_dict(),
                         "losses": self.losses, "window": self.window.to_dict(), "n_train_samples": len(self.data.train),
                         "steps_per_epoch": self.spe, "run_config": self.run_config}
        path = save_sharded(self.ranks, self.mode, self.dtype, self.out, at, self.model, self.optimizer,
                            self.scheduler, trainer_state, self.rng, cfg, tokenizer_file)
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
        save_consolidated(self.ranks, self.model, out, cfg, self.data.tokenizer_file)  # gathered on rank 0
        png = plot_losses(self.log.path, out / "loss.png") if self.ranks.is_main else None
        done = [loss for _, loss in self.losses if loss is not None]
        self.say(f"done: {self.step} steps, loss {done[0]:.4f} → {done[-1]:.4f}" if done else f"done: {self.step} steps")
        self.say(f"outputs in {out}: {'adapter' if cfg.adapter else 'model'}, {self.data.tokenizer_file.name}, "
                 f"config.yaml, metrics.jsonl{', loss.png' if png else ''}")
        return 0


__all__ = ["SFTDistributed", "train"]
