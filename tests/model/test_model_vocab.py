"""The model grows to its tokenizer's vocabulary: a SentencePiece v1 tiny model (32,000 rows, no free control slot)
with two added tokens. New rows start at the mean row, train (LoRA: embed_tokens and lm_head as modules_to_save),
and survive saving, loading for inference and the streaming merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from magistune.config import parse_config
from magistune.export.merge import merge_adapter
from magistune.model import ModelError, build_model, load_adapter, load_model, save_trained
from magistune.model.vocab import vocab_growth
from magistune.model_files.tiny import tiny_text_config, write_model_dir
from magistune.tokenizer import load_tokenizer, shipped_tokenizer_file, vocab_size
from magistune.tokenizer_edit import TokenEdits, run_tokenizer_file

CPU = torch.device("cpu")
SP_V1 = "tokenizer.model.v1"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """(model folder with 32,000 rows and tokenizer.model.v1, the run's tokenizer file with <CITE> and </CITE>)."""
    root = tmp_path_factory.mktemp("sp")
    config = tiny_text_config()
    config.vocab_size, config.bos_token_id, config.eos_token_id = 32000, 1, 2
    write_model_dir(config, root / "model")
    (root / "model" / "tekken.json").unlink()
    shutil.copyfile(shipped_tokenizer_file(SP_V1), root / "model" / SP_V1)
    tok_file = run_tokenizer_file(root / "model" / SP_V1, TokenEdits({}, ("<CITE>", "</CITE>")), root / "tok")
    return root / "model", tok_file


def _cfg(model_dir: Path, **keys):
    cfg, _ = parse_config({"base_model": str(model_dir), "datasets": [{"path": "-"}], **keys})
    return cfg


def test_growth_mean_initialises_the_new_rows(sp_model):
    model_dir, tok_file = sp_model
    tok = load_tokenizer(tok_file)
    base, _ = load_model(_cfg(model_dir), model_dir, CPU, tokenizer=load_tokenizer(model_dir / SP_V1))
    model, _ = load_model(_cfg(model_dir, unfrozen_parameters=[r"model\.norm.*"]), model_dir, CPU, tokenizer=tok)
    assert vocab_growth(model) == (32000, 32002) and vocab_growth(base) is None
    assert model.config.vocab_size == vocab_size(tok) == 32002
    for new, old in ((model.get_input_embeddings(), base.get_input_embeddings()),
                     (model.get_output_embeddings(), base.get_output_embeddings())):
        assert torch.equal(new.weight[:32000], old.weight)
        assert torch.allclose(new.weight[32000:], old.weight.mean(0).expand(2, -1))
        assert new.weight.requires_grad  # unfrozen_parameters froze them; the new rows must learn


def test_fewer_tokens_than_rows_is_an_error(sp_model, tmp_path):
    from magistune.tokenizer import tiny_tokenizer_path

    small = tmp_path / "small"
    shutil.copytree(sp_model[0], small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 200000}))
    with pytest.raises(ModelError, match="needs at least as many tokens as the model has rows"):
        load_model(_cfg(small), small, CPU, tokenizer=load_tokenizer(tiny_tokenizer_path()))


def test_lora_trains_saves_loads_and_merges_the_grown_rows(sp_model, tmp_path):
    model_dir, tok_file = sp_model
    tok = load_tokenizer(tok_file)
    cfg = _cfg(model_dir, adapter="lora", lora_target_linear=True, lora_r=4, output_dir=str(tmp_path / "out"))
    model, info, _ = build_model(cfg, CPU, tokenizer=tok)
    assert any("modules_to_save" in n and "32000 to 32002" in n for n in info.notes)
    assert set(model.peft_config["default"].modules_to_save) == {"model.embed_tokens", "lm_head"}
    # one step on text holding the new token: its rows get gradients and change
    ids = torch.tensor([tok.instruct_tokenizer.tokenizer.encode("see <CITE>the doc</CITE>", bos=True, eos=True)])
    assert 32000 in ids and 32001 in ids
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    before = model.get_input_embeddings().weight[32000].detach().clone()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    trained_emb = model.get_input_embeddings().weight.detach().clone()
    assert not torch.equal(trained_emb[32000], before)
    out = save_trained(model, tmp_path / "out", cfg, tok_file)
    assert (out / SP_V1).read_bytes() == tok_file.read_bytes()  # the output folder carries the run's tokenizer
    # inference: the base grows to the saved tokenizer, the adapter's trained copies load over it
    base, _ = load_model(_cfg(model_dir), model_dir, CPU, tokenizer=load_tokenizer(out / SP_V1))
    loaded = load_adapter(base, out)
    assert torch.equal(loaded.get_input_embeddings().weight, trained_emb)
    # the streaming merge writes the grown, trained matrices and the grown vocab_size
    report = merge_adapter(model_dir, out, tmp_path / "merged", tokenizer_file=out / SP_V1)
    merged_cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_cfg["vocab_size"] == 32002 and (tmp_path / "merged" / SP_V1).read_bytes() == tok_file.read_bytes()
    with safe_open(str(report.files[0]), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    assert emb.shape == (32002, 64) and torch.equal(emb, trained_emb.to(torch.bfloat16))
    merged, _ = load_model(_cfg(tmp_path / "merged"), tmp_path / "merged", CPU, tokenizer=load_tokenizer(out / SP_V1))
    assert vocab_growth(merged) is None  # already that size


def test_meta_build_is_the_grown_model(sp_model):
    """FSDP2 shards a weightless (meta-device) copy and fills it from rank 0's loaded model: same names, same shapes,
    the same modules_to_save."""
    model_dir, tok_file = sp_model
    tok = load_tokenizer(tok_file)
    cfg = _cfg(model_dir, adapter="lora", lora_target_linear=True, lora_r=4)
    real, _, _ = build_model(cfg, CPU, tokenizer=tok)
    meta, _, _ = build_model(cfg, CPU, tokenizer=tok, meta=True)
    assert {n: t.shape for n, t in meta.state_dict().items()} == {n: t.shape for n, t in real.state_dict().items()}
    assert meta.peft_config["default"].modules_to_save == real.peft_config["default"].modules_to_save
