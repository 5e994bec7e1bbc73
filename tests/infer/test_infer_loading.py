"""Which tokenizer inference uses: the trained folder's own copy (the run's tokenizer, token edits applied) before
tokenizer_path or the base model's; the base model alone (--base) keeps the config's."""

from __future__ import annotations

import shutil

from adapter_helpers import save_adapter
from magistune.config import parse_config
from magistune.infer.loading import resolve_source
from magistune.tokenizer import tiny_tokenizer_path
from magistune.tokenizer_edit import TokenEdits, run_tokenizer_file


def test_the_trained_folders_tokenizer_wins(tiny_dir, tmp_path):
    edited = run_tokenizer_file(tiny_tokenizer_path(), TokenEdits({}, ("<CITE>",)), tmp_path / "tok")
    out = save_adapter(str(tiny_dir), tmp_path / "out", random_b=False)
    shutil.copyfile(edited, out / "tekken.json")  # as training copies the run's tokenizer
    cfg, _ = parse_config({"base_model": str(tiny_dir), "datasets": [{"path": "-"}], "adapter": "lora",
                           "lora_target_linear": True, "output_dir": str(out),
                           "tokenizer_path": str(tiny_tokenizer_path())}, config_dir=tmp_path)
    assert resolve_source(cfg).tokenizer_file == out / "tekken.json"
    assert resolve_source(cfg, adapter=str(out)).tokenizer_file == out / "tekken.json"
    assert resolve_source(cfg, base_only=True).tokenizer_file == tiny_tokenizer_path()
    (out / "tekken.json").unlink()  # an adapter saved without one: the config's tokenizer, as before
    assert resolve_source(cfg).tokenizer_file == tiny_tokenizer_path()
