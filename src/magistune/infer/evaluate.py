"""`magistune evaluate`: the loss and perplexity of the trained model, measured exactly as training measures it.

Same samples (the data pipeline and its cache), same masks (only trained tokens count), same loss function
(magistune.train.loss.token_loss_sum) and the same normalisation: the loss is Σ token losses / Σ trained
tokens over the whole split, so a 1,000-token answer weighs 100 times a 10-token one, and perplexity is
exp(loss). Which samples:

    default        the eval split (val_set_size), the one training reported eval_loss on
    --all          every sample, train and eval
    --dataset P    these files instead of the config's datasets (repeatable), every sample of them
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from magistune.config import Config, ConfigError, DatasetConfig
from magistune.infer.loading import Loaded
from magistune.tokenizer import image_encoder_of


def evaluation_config(cfg: Config, datasets: list[str] | None) -> Config:
    """The config with --dataset files in place of its datasets (paths from the working directory)."""
    if not datasets:
        return cfg
    entries = []
    for p in datasets:
        path = Path(p).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"--dataset: {path}: not found")
        entries.append(DatasetConfig(path=str(path)))
    return cfg.model_copy(update={"datasets": entries, "val_set_size": 0.0})


def select_samples(cfg: Config, all_samples: bool, datasets: list[str] | None):
    """(samples, split name) as the module docstring says; raises ConfigError when there are none."""
    from magistune.data.build import prepare_data

    data = prepare_data(evaluation_config(cfg, datasets), progress=sys.stderr.isatty())
    if datasets:
        return data.train + data.eval, "datasets"
    if all_samples:
        return data.train + data.eval, "all"
    if not data.eval:
        raise ConfigError("no eval split (val_set_size is 0): use --all for every sample, or --dataset FILE")
    return data.eval, "eval"


def evaluate_loaded(loaded: Loaded, samples: list, batch_size: int) -> dict:
    from magistune.train.batches import eval_batches
    from magistune.train.loss import evaluate, token_loss_sum

    batches = eval_batches(samples, batch_size, loaded.special.pad, image_encoder_of(loaded.tokenizer))
    result = evaluate(loaded.model, batches, token_loss_sum, loaded.autocast, loaded.device)
    return {
        "loss": result.loss,
        "ppl": math.exp(result.loss) if math.isfinite(result.loss) else float("nan"),
        "samples": len(samples),
        "trained_tokens": result.n_trained,
        "tokens": result.n_tokens,
        "loss_sum": result.loss_sum,
    }


def run_evaluate(loaded: Loaded, cfg: Config, samples: list, split: str, datasets: list[str] | None,
                 batch_size: int | None, output: str | None) -> int:
    if batch_size is not None and batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    report = evaluate_loaded(loaded, samples, batch_size or cfg.micro_batch_size)
    report.update(split=split, model=str(loaded.source.model_dir),
                  adapter=str(loaded.source.adapter_dir) if loaded.source.adapter_dir else None,
                  quantized_base=loaded.source.load_in_4bit, datasets=datasets or [d.path for d in cfg.datasets])
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {output}", file=sys.stderr)
    return 0


def merge_cost(cfg: Config, merged_dir: Path, device) -> dict | str:
    """The eval split's loss of the model as trained (the adapter on its base, 4-bit again for QLoRA) and of the
    merged one (bf16 weights, the adapter folded in), one after the other; or why it was not measured."""
    from magistune.data.errors import DataError
    from magistune.infer.loading import load_for_inference, resolve_source
    from magistune.tokenizer import TokenizerError

    if not cfg.val_set_size:
        return "no eval split (val_set_size is 0): merge cost not measured"
    try:
        samples, _ = select_samples(cfg, False, None)
    except (ConfigError, DataError, TokenizerError) as e:
        return f"merge cost not measured: {e}"
    out = {}
    for name, source in (("as_trained", resolve_source(cfg)), ("merged", resolve_source(cfg, model=str(merged_dir)))):
        print(f"evaluating {name.replace('_', ' ')}: {source.describe()}", file=sys.stderr, flush=True)
        loaded = load_for_inference(source, device)
        out[name] = evaluate_loaded(loaded, samples, cfg.micro_batch_size)
        del loaded
    return out


def format_merge_cost(cost: dict | str) -> str:
    if isinstance(cost, str):
        return cost
    a, m = cost["as_trained"], cost["merged"]
    return (f"eval split ({a['samples']} samples, {a['trained_tokens']} trained tokens): loss as trained "
            f"{a['loss']:.6f} (ppl {a['ppl']:.4g}), merged {m['loss']:.6f} (ppl {m['ppl']:.4g}), "
            f"difference {m['loss'] - a['loss']:+.6f}")
