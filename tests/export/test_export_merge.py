"""`magistune merge`: the streamed merge equals PEFT's own merge rounded to bf16, and the merged model's logits
equal base + adapter within bf16 rounding (text, vision and QLoRA runs)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors import safe_open
from transformers import Mistral3ForConditionalGeneration, MistralForCausalLM

from adapter_helpers import save_adapter
from magistune.cli import main
from magistune.export.merge import MergeError, merge_adapter
from magistune.model_files.shards import checkpoint_files

IDS = torch.randint(100, 131072, (2, 12), generator=torch.Generator().manual_seed(1))
BF16_EPS = 2.0 ** -8  # bf16 keeps 8 significant bits: a rounded weight is within 2^-9 relative of the exact one


def tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def assert_bf16_close(merged: torch.Tensor, reference: torch.Tensor) -> float:
    """Merged weights are the reference's rounded to bf16: the logits may differ by a few bf16 steps of
    their own size (each of ~64 summed products carries a 2^-9 relative error, mostly cancelling)."""
    diff = (merged - reference).abs().max().item()
    assert diff <= 4 * BF16_EPS * reference.abs().max().item(), diff
    return diff


def write_cfg(root, **keys):
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump({"base_model": "tiny-random", "datasets": [{"path": "unused.jsonl"}],
                                    "adapter": "lora", "lora_target_linear": True, "lora_r": 4, "output_dir": "out",
                                    **keys}), encoding="utf-8")
    return path


def test_merge_text_model_through_the_cli(tiny_dir, tmp_path, capsys):
    keys = {"lora_target_modules": ["lm_head", "embed_tokens"]}  # an embedding and lm_head get LoRA too
    cfg = write_cfg(tmp_path, **keys)
    save_adapter("tiny-random", tmp_path / "out", **keys)
    out = tmp_path / "merged"
    assert main(["merge", str(cfg), "--output", str(out), "--max-shard-size", "20MB"]) == 0
    printed = capsys.readouterr().out
    assert "merged 16 of 21 tensors" in printed  # 2 layers × 7 linears + lm_head + embed_tokens

    # 33.7 MB in 20 MB shards: lm_head (16.8 MB) alone, then embed_tokens (16.8 MB) and the rest.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert (out / "tekken.json").is_file() and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    peft_model = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), tmp_path / "out")
    unmerged = logits(peft_model)
    reference = peft_model.merge_and_unload().state_dict()  # PEFT's merge, in fp32
    merged = tensors(out)
    assert merged.keys() == tensors(tiny_dir).keys()
    for name, w in merged.items():
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, reference[name].to(torch.bfloat16)), name  # bit-identical after one rounding
    merged_model = MistralForCausalLM.from_pretrained(out, dtype=torch.float32)
    diff = assert_bf16_close(logits(merged_model), unmerged)
    print(f"LoRA merge: max |logit diff| {diff:.2e} of max |logit| {unmerged.abs().max().item():.2f}")


def test_merge_report_memory(tiny_dir, tmp_path):
    save_adapter("tiny-random", tmp_path / "ad", lora_target_modules=["lm_head"])
    report = merge_adapter(tiny_dir, tmp_path / "ad", tmp_path / "m")
    # The largest live set: lm_head, 131,072 × 64 = 8.4M weights × (4 in + 4 fp32 copy + 4 B@A + 2 bf16 out) =
    # 14 bytes = 112 MiB. Its input is fp32 here: PEFT saves a targeted lm_head's base weight in the adapter, in
    # the dtype of the model it trained (fp32 on the CPU), and PEFT's loader would use that copy, so we do too.
    assert report.peak_tensor_mib == pytest.approx(131072 * 64 * 14 / 2**20)
    assert report.peak_rss_mib > 0


def test_merge_vision_model_keeps_checkpoint_names(vision_dir, tmp_path):
    adapter = save_adapter("tiny-random-vision", tmp_path / "ad", seed=1)
    report = merge_adapter(vision_dir, adapter, tmp_path / "m")
    assert len(report.merged) == 14  # the language model's linears only; the checkpoint says language_model.model.*
    assert tensors(tmp_path / "m").keys() == tensors(vision_dir).keys()
    base = Mistral3ForConditionalGeneration.from_pretrained(vision_dir, dtype=torch.float32)
    expected = logits(PeftModel.from_pretrained(base, adapter))
    assert_bf16_close(logits(Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "m", dtype=torch.float32)), expected)


def test_merge_writes_modules_to_save_in_full(vision_dir, tmp_path):
    """A module PEFT trained in full (train_projector: modules_to_save; a grown vocabulary's embeddings likewise,
    tests/model/test_model_vocab.py) replaces the base tensor; the merged model equals base + adapter."""
    adapter = save_adapter("tiny-random-vision", tmp_path / "ad", seed=2, train_projector=True)
    with torch.no_grad():  # give the trained copy weights of its own
        model = PeftModel.from_pretrained(Mistral3ForConditionalGeneration.from_pretrained(vision_dir), adapter,
                                          is_trainable=True)
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)
        model.save_pretrained(adapter)
    merge_adapter(vision_dir, adapter, tmp_path / "m")
    assert tensors(tmp_path / "m").keys() == tensors(vision_dir).keys()
    base = Mistral3ForConditionalGeneration.from_pretrained(vision_dir, dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, adapter)
    merged = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        saved = {k.removeprefix("base_model.model."): f.get_tensor(k) for k in f.keys() if "lora_" not in k}
    assert saved and all("multi_modal_projector" in k for k in saved)
    for name, w in saved.items():  # the trained copies, rounded to bf16 once
        assert torch.equal(merged.get_parameter(name), w.to(torch.bfloat16).float())
    assert_bf16_close(logits(merged), logits(expected))


def test_merge_qlora_uses_the_bf16_checkpoint(tiny_dir, tmp_path, capsys):
    """QLoRA: the adapter trained on NF4 weights is added to the original bf16 checkpoint. The merged model is
    compared with that (bf16 base + adapter, tight) and, for the record, with the model as trained (4-bit
    base + adapter), which differs by the NF4 rounding of the base: a much larger error."""
    keys = {"adapter": "qlora", "load_in_4bit": True}
    cfg = write_cfg(tmp_path, **keys)
    save_adapter("tiny-random", tmp_path / "out", seed=2, **keys)
    assert main(["merge", str(cfg), "--output", str(tmp_path / "m")]) == 0
    assert "re-read in bf16 from the original checkpoint" in capsys.readouterr().err
    merged = logits(MistralForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32))

    bf16_base = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), tmp_path / "out")
    diff_bf16 = assert_bf16_close(merged, logits(bf16_base))

    from magistune.infer.loading import load_for_inference, resolve_source
    from magistune.config import load_config

    as_trained = load_for_inference(resolve_source(load_config(cfg)[0]), torch.device("cpu"))
    assert as_trained.source.load_in_4bit
    diff_nf4 = (merged - logits(as_trained.model)).abs().max().item()
    print(f"QLoRA merge: max |logit diff| vs bf16 base + adapter {diff_bf16:.2e}, vs 4-bit base + adapter {diff_nf4:.2e}")
    assert diff_nf4 > diff_bf16  # NF4 rounding of the base dwarfs bf16 rounding of the merge


def test_unsupported_or_mismatched_adapters_are_refused(tiny_dir, vision_dir, tmp_path, capsys):
    adapter = save_adapter("tiny-random-vision", tmp_path / "vision-ad")
    with pytest.raises(MergeError, match="not in the base checkpoint"):
        merge_adapter(tiny_dir, adapter, tmp_path / "m1")
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(MergeError, match="use_dora"):
        merge_adapter(vision_dir, dora, tmp_path / "m2")
    cfg = write_cfg(tmp_path)
    assert main(["merge", str(cfg), "--output", str(tmp_path / "m3")]) == 2  # output_dir has no adapter yet
    assert f"output_dir: {tmp_path / 'out'}: folder not found" in capsys.readouterr().err


def test_merge_prints_the_eval_split_loss_as_trained_and_merged(tiny_dir, tmp_path, capsys):
    """QLoRA: merging into the bf16 checkpoint changes the model; merge shows by how much on the eval split, each
    number the one `magistune evaluate` gives for that model."""
    from magistune.config import load_config
    from magistune.infer.evaluate import evaluate_loaded, select_samples
    from magistune.infer.loading import load_for_inference, resolve_source

    rows = [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A {i}."}]}
            for i in range(6)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    keys = {"adapter": "qlora", "load_in_4bit": True, "datasets": [{"path": "data.jsonl"}], "val_set_size": 2}
    cfg_path = write_cfg(tmp_path, **keys)
    save_adapter("tiny-random", tmp_path / "out", seed=3, adapter="qlora", load_in_4bit=True)
    assert main(["merge", str(cfg_path), "--output", str(tmp_path / "m")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("eval split (2 samples") and "loss as trained" in line and "merged" in line

    cfg = load_config(cfg_path)[0]
    samples, _ = select_samples(cfg, False, None)
    cpu = torch.device("cpu")
    trained = evaluate_loaded(load_for_inference(resolve_source(cfg), cpu), samples, 1)["loss"]
    merged = evaluate_loaded(load_for_inference(resolve_source(cfg, model=str(tmp_path / "m")), cpu), samples, 1)["loss"]
    assert f"loss as trained {trained:.6f}" in line and f"merged {merged:.6f}" in line and trained != merged
    assert main(["merge", str(cfg_path), "--output", str(tmp_path / "m2"), "--no-eval"]) == 0
    assert "eval split" not in capsys.readouterr().out
