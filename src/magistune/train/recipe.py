"""`magistune train`: the training loop, start to end, in one readable function.

    preflight (paths, device)  →  seed  →  data  →  model (+ LoRA/QLoRA)  →  optimizer, schedule
      →  resume?  →  for each step: forward/backward over the micro-batches, clip, step, log, eval, save
      →  final eval, checkpoint, adapter/model + tekken.json + config.yaml + metrics + loss.png

Exit codes: 0 done; 1 training failed (non-finite loss, out of memory); 2 the config, data or a path is
wrong (nothing was trained); 130 interrupted (Ctrl-C / SIGTERM: a checkpoint of the last finished step is saved).
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from magistune.config import Config, ConfigError
from magistune.train import checkpoint as ckpt
from magistune.train.batches import DataPosition, StepStream, eval_batches, items_per_rank, steps_per_epoch, total_steps
from magistune.train.distributed import DistributedError, QuietLogger, setup as setup_parallel, speaks
from magistune.train.loss import evaluate, forward_backward, loss_fn_for
from magistune.train.metrics import MetricsLogger, peak_memory_gb, plot_losses
from magistune.train.optim import OptimizerError, build_optimizer, build_scheduler, warmup_steps
from magistune.train.packing import packings_for
from magistune.train.preflight import autocast_for, oom_advice, preflight, seed_everything, write_resolved_config


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss or gradient); the message says why and what to try."""


class Interrupted(Exception):
    """A stop signal arrived; raised at a step boundary, where a checkpoint is consistent."""


def say(msg: str) -> None:
    msg = speaks(msg)  # multi-GPU: rank 0 says everything, the other ranks only their errors
    if msg is not None:
        print(msg, file=sys.stderr, flush=True)


def short(e: BaseException) -> str:
    """'CUDA out of memory. Tried to allocate 2.00 GiB' without the allocator's paragraph that follows."""
    return str(e).splitlines()[0].split(". GPU ")[0] if str(e) else type(e).__name__


def every(per_epoch: int | None, steps: int | None, spe: int) -> int | None:
    """An interval in steps from `eval_steps`-style or `evals_per_epoch`-style keys (4 per epoch of 125 → 31)."""
    if steps is not None:
        return steps
    return max(1, spe // per_epoch) if per_epoch else None


@dataclass
class Window:
    """The steps since the last metrics row."""

    loss_sum: float = 0.0
    n_trained: int = 0
    n_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StopFlag:
    """SIGINT/SIGTERM set it; the loop stops at the next step boundary. A second signal quits at once."""

    signum: int | None = None
    old: dict = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # anywhere, even inside optimizer.step(): no checkpoint is saved
        self.signum = signum
        say(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            "(send it again to quit without saving)")

    def restore(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def train(cfg: Config) -> int:
    try:
        par = setup_parallel(cfg)  # one process, or one of torchrun's N (FSDP2 / DDP): distributed.py
    except DistributedError as e:
        say(f"error: {e}")
        return 2
    try:
        return _train(cfg, par)
    except torch.OutOfMemoryError as e:
        say(f"error: out of memory while loading or preparing the model ({short(e)})\n{oom_advice(cfg, None)}")
        return 1
    finally:
        par.close()


def _train(cfg: Config, par) -> int:
    from magistune.data.build import DataError, prepare_data
    from magistune.model import format_model_info, resolve_dtype
    from magistune.tokenizer import SpecialIds, TokenizerError, load_tokenizer

    # --- before any weight loads ------------------------------------------------------------------------
    try:
        pre = preflight(cfg)
        for note in par.notes + pre.notes:
            say(f"note: {note}")
        seed_everything(cfg.seed)
        data = par.run_main_first(lambda: prepare_data(cfg, progress=sys.stderr.isatty() and par.is_main))
        tokenizer = load_tokenizer(data.tokenizer_file)
        par.agree(cfg, pre.model_dir, data)  # multi-GPU: every rank has the same config and samples
    except (ConfigError, ckpt.CheckpointError, OptimizerError, DataError, TokenizerError) as e:
        say(f"error: {e}")
        return 2
    pad_id = SpecialIds.of(tokenizer).pad
    device, dtype = pre.device, resolve_dtype(cfg, pre.device)
    out = cfg.out_dir.resolve()  # "examples/../outputs/x" → "outputs/x" in messages
    if par.is_main:
        write_resolved_config(cfg, pre.model_dir)
    n_train, n_eval = len(data.train), len(data.eval)
    say(f"data: {n_train} train + {n_eval} eval samples, {sum(len(s) for s in data.train)} train tokens "
        f"({sum(s.n_trained for s in data.train)} trained)")
    try:
        packed, eval_packed = packings_for(cfg, data.train, data.eval)  # None, None without sample_packing
    except ValueError as e:
        say(f"error: {e}")
        return 2
    if packed:
        say(f"packing: {packed.describe()}")
    n_items = len(packed.packs) if packed else n_train  # what an epoch shuffles: packed rows, or samples

    # --- model --------------------------------------------------------------------------------------------
    if cfg.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        source = par.model_source(cfg, pre.resume)  # a full fine-tune resumes from its checkpoint's weights
        model, info = par.build_model(source, device, tokenizer)  # load (4-bit?), LoRA or full; sharded or not
    except (ConfigError, ckpt.CheckpointError) as e:
        say(f"error: {e}")
        return 2
    model.train()  # from_pretrained returns eval mode: dropout off
    say(f"model: {format_model_info(info)}; {device.type}, {str(dtype).removeprefix('torch.')}"
        + (f"; {par.mode} over {par.world} processes" if par.distributed else ""))
    for note in info.notes:
        say(f"note: {note}")

    # --- optimisation -------------------------------------------------------------------------------------
    mbs, accum = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    n_share = items_per_rank(n_items, par.world)  # multi-GPU: each rank's equal share of an epoch
    spe = steps_per_epoch(n_share, mbs, accum)
    total = total_steps(n_share, mbs, accum, cfg.num_epochs, cfg.max_steps)
    warmup = warmup_steps(cfg, total)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, warmup, total)
    unit = "packed rows" if packed else "samples"
    say(f"schedule: {total} steps ({total / spe:.2f} epochs of {spe}) × {accum} micro-batches × {mbs} {unit} "
        f"(≤ {mbs} × {cfg.sequence_len} × {accum} = {mbs * cfg.sequence_len * accum:,} tokens/step); "
        f"{cfg.lr_scheduler} lr {cfg.learning_rate:g}, warmup {warmup}")
    if par.distributed:
        say(f"{par.mode}: {par.world} processes, each with the above: {par.world * mbs * accum} {unit} per step in all")
    eval_every = every(cfg.evals_per_epoch, cfg.eval_steps, spe) if n_eval else None
    save_every = every(cfg.saves_per_epoch, cfg.save_steps, spe)
    if not n_eval and (cfg.eval_steps or cfg.evals_per_epoch):
        say("note: no eval split (val_set_size: 0): eval_steps/evals_per_epoch have nothing to evaluate")
    image_encoder = tokenizer.instruct_tokenizer.image_encoder  # None without an image config
    pad_to = cfg.sequence_len if cfg.pad_to_sequence_len else 0  # fixed shapes: every batch sequence_len wide
    evals = lambda: par.eval_share(eval_batches(data.eval, mbs, pad_id, image_encoder,  # noqa: E731 (collated anew)
                                                eval_packed.packs if eval_packed else None, pad_to))
    loss_fn, autocast = par.wrap_loss(loss_fn_for(cfg)), autocast_for(device, dtype)

    # --- resume -------------------------------------------------------------------------------------------
    state = {"step": 0, "position": DataPosition().to_dict(), "losses": [], "window": Window().to_dict()}
    if pre.resume is not None:
        state = par.load_checkpoint(pre.resume, model, optimizer, scheduler)  # RNG restored last
        if state.get("n_train_samples") != n_train:
            say(f"error: {pre.resume} was trained on {state.get('n_train_samples')} samples, the data now has "
                f"{n_train}: the data position cannot be restored. Start a new output_dir (lora_model_dir continues "
                "from an adapter with fresh data)")
            return 2
        say(f"resumed at step {state['step']} of {total}")
    step, position, losses = state["step"], DataPosition.from_dict(state["position"]), state["losses"]
    window = Window(**state["window"])
    rng = ckpt.capture_rng()  # the RNG at the last step boundary: what a checkpoint saves

    def save(at: int) -> None:
        trainer_state = {"step": at, "total_steps": total, "position": position.to_dict(), "losses": losses,
                         "window": window.to_dict(), "n_train_samples": n_train, "steps_per_epoch": spe}
        path = par.save_checkpoint(out, at, model, optimizer, scheduler, trainer_state, rng, cfg, data.tokenizer_file)
        log.message(f"saved {path}")

    def run_eval() -> None:
        result = par.step_total(evaluate(model, evals(), loss_fn, autocast, device))
        log.log_eval(step, result.loss, result.n_trained)

    log = MetricsLogger(out, step, total, show_progress=sys.stderr.isatty()) if par.is_main else QuietLogger()
    stop = StopFlag()
    stop.install()
    stream = iter(StepStream(data.train, mbs, accum, pad_id, cfg.seed, start=position, image_encoder=image_encoder,
                             packs=packed.packs if packed else None, shard=(par.rank, par.world), pad_to=pad_to))
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else math.inf  # inf: measure only
    longest, run_seconds, run_steps = 0, 0.0, 0  # this process's steps, for the ETA
    try:
        while step < total:
            # --- one optimizer step --------------------------------------------------------------------
            t0 = time.perf_counter()
            next_position, micro = next(stream)
            longest = max([longest] + [b.input_ids.shape[1] for b in micro])
            result = par.step_total(forward_backward(model, micro, loss_fn, autocast, device, par.normaliser,
                                                     par.grad_sync))
            if result.n_trained == 0:
                log.message(f"note: step {step + 1} has no trained token; its samples are skipped")
            elif not math.isfinite(result.loss):
                raise TrainingStopped(f"loss is {result.loss} at step {step + 1}")
            grad_norm = par.clip_grad_norm_(params, clip)
            if result.n_trained and not math.isfinite(grad_norm):
                raise TrainingStopped(f"gradient norm is {grad_norm} at step {step + 1} (loss {result.loss:.4f})")
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step, position, rng = step + 1, next_position, ckpt.capture_rng()
            losses.append([step, result.loss if result.n_trained else None])
            window.loss_sum += result.loss_sum
            window.n_trained += result.n_trained
            window.n_tokens += result.n_tokens
            window.seconds += time.perf_counter() - t0
            run_seconds, run_steps = run_seconds + time.perf_counter() - t0, run_steps + 1
            log.advance()

            # --- report, evaluate, save ------------------------------------------------------------------
            if step % cfg.logging_steps == 0 or step == total:
                row = log.log_train(
                    step, epoch=round(position.epoch + position.step / spe, 4),
                    loss=window.loss_sum / max(window.n_trained, 1), lr=lr, grad_norm=grad_norm,
                    tokens_per_s=round(window.n_tokens / max(window.seconds, 1e-9), 1),
                    trained_tokens=window.n_trained, peak_mem_gb=round(peak_memory_gb(device), 3))
                if log.bar is None:
                    eta = (total - step) * run_seconds / run_steps
                    log.message(f"step {step}/{total}: loss {row['loss']:.4f}, lr {lr:.3g}, grad_norm {grad_norm:.3f}, "
                                f"{row['tokens_per_s']:.0f} tok/s, ETA {eta:.0f}s")
                window = Window()
            if eval_every and step % eval_every == 0 and step < total:
                run_eval()
            if (save_every and step % save_every == 0) or step == total:
                save(step)
            if par.any_rank(stop.signum is not None):
                raise Interrupted
        # --- the end --------------------------------------------------------------------------------------
        if data.eval:
            run_eval()
    except Interrupted:
        if step > 0 and not ckpt.is_complete(out / f"{ckpt.PREFIX}{step}"):
            save(step)
        log.message(f"interrupted after step {step}; resume with resume_from_checkpoint: auto")
        return 130
    except KeyboardInterrupt:
        last = ckpt.latest_checkpoint(out)
        log.message(f"interrupted during step {step + 1}: nothing saved; the last checkpoint is {last or '(none)'}")
        return 130
    except TrainingStopped as e:
        last = ckpt.latest_checkpoint(out)
        log.message(f"error: {e}: stopping before the optimizer step, so no weight is corrupted.\n"
                    f"  The last good checkpoint is {last or '(none yet)'}. Lower learning_rate, keep max_grad_norm "
                    "set (1.0), or check the data of this step; resume_from_checkpoint: auto continues from there.")
        return 1
    except torch.OutOfMemoryError as e:
        log.message(f"error: out of memory at step {step + 1} ({short(e)})\n"
                    f"{oom_advice(cfg, longest)}")
        return 1
    finally:
        stop.restore()
        log.close()

    # --- outputs ------------------------------------------------------------------------------------------
    par.save_trained(model, out, cfg, data.tokenizer_file)
    png = plot_losses(log.path, out / "loss.png") if par.is_main else None
    done = [l for _, l in losses if l is not None]
    say(f"done: {step} steps, loss {done[0]:.4f} → {done[-1]:.4f}" if done else f"done: {step} steps")
    say(f"outputs in {out}: {'adapter' if cfg.adapter else 'model'}, {data.tokenizer_file.name}, config.yaml, "
        f"metrics.jsonl{', loss.png' if png else ''}")
    return 0
