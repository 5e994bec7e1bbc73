"""bench/unsloth_step.py on the CPU: its arguments, its row (train_step.py's keys), and the bnb-4bit folder it
writes for Unsloth: transformers loads it back to the same quantised weights and logits as the model in memory, and
its tokenizer gives mistral-common's ids. (Unsloth itself needs a GPU: bench/run_three_gpu.sh runs it.)"""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import unsloth_step  # noqa: E402
from unsloth_step import TARGETS, parse_args, row_for, save_bnb4_folder  # noqa: E402


def test_arguments_default_to_train_step_s():
    args = parse_args(["--seq", "2048", "--mbs", "2", "--accum", "4"])
    assert (args.seq, args.mbs, args.accum, args.layers, args.steps, args.warmup, args.dropout) == (2048, 2, 4, 40, 3, 1, 0.05)
    assert Path(args.folder) == BENCH / "scratch" / "magistral-small-L40-bnb-4bit"
    assert parse_args(["--layers", "4", "--dropout", "0"]).folder.endswith("magistral-small-L4-bnb-4bit")
    assert TARGETS == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("argv", [["--mbs", "0"], ["--dropout", "1"], ["--warmup", "-1"], ["--tiny"], ["--side", "x"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_row_has_train_step_s_keys_and_the_unsloth_versions():
    import train_step

    args = parse_args(["--seq", "1024", "--dropout", "0"])
    row = row_for(args, 1234.56, 17.0, 13.18, 42.0, "GPU")
    source = Path(train_step.__file__).read_text()
    start = source.index("row = {")
    keys = {k.strip('"') for k in __import__("re").findall(r'"([a-z_]+)":', source[start:source.index("}", start)])}
    assert keys <= set(row), keys - set(row)
    assert (row["side"], row["seq"], row["dropout"], row["tokens_per_s"], row["peak_gib"]) == ("unsloth", 1024, 0.0, 1234.6, 17.0)
    assert {"unsloth", "unsloth_zoo", "trl", "datasets"} <= set(row)
    json.dumps(row)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unsloth") / "tiny"
    save_bnb4_folder(folder, layers=2, tiny=True, device=torch.device("cpu"))
    return folder


def test_folder_is_complete_and_says_bnb_4bit(tiny_folder):
    assert not tiny_folder.with_name("tiny.partial").exists()
    q = json.loads((tiny_folder / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["load_in_4bit"], q["bnb_4bit_quant_type"], q["bnb_4bit_use_double_quant"],
            q["bnb_4bit_compute_dtype"], q["llm_int8_skip_modules"]) == ("bitsandbytes", True, "nf4", True, "bfloat16", ["lm_head"])


def test_folder_loads_back_to_the_same_model(tiny_folder):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from magistune.model_files.tiny import tiny_text_config
    from random_model import random_model

    loaded = AutoModelForCausalLM.from_pretrained(str(tiny_folder), device_map="cpu")
    built, _ = random_model(tiny_text_config(), unsloth_step.bench_cfg(), torch.device("cpu"))
    quantised = {n: m for n, m in built.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantised) == 2 * 7
    for name, q_built in quantised.items():  # before any forward (on the CPU bitsandbytes repacks at the first)
        q_loaded = loaded.get_submodule(name)
        assert isinstance(q_loaded, bnb.nn.Linear4bit) and q_loaded.weight.quant_state.nested, name
        assert torch.equal(q_loaded.weight.data, q_built.weight.data), name  # the packed NF4 bytes
        assert torch.equal(bnb.functional.dequantize_4bit(q_loaded.weight.data, q_loaded.weight.quant_state),
                           bnb.functional.dequantize_4bit(q_built.weight.data, q_built.weight.quant_state)), name
    for name, p in built.named_parameters():
        if not isinstance(p, bnb.nn.Params4bit):
            assert torch.equal(loaded.get_parameter(name), p), name
    ids = torch.randint(1000, 131072, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the loaded model's CPU 4-bit matmul rounds differently in bf16: equal up to bf16 noise
        torch.testing.assert_close(loaded(ids).logits, built(ids).logits, atol=2e-2, rtol=2e-2)


def test_folder_tokenizer_gives_mistral_common_s_ids(tiny_folder):
    from transformers import AutoTokenizer

    from magistune.tokenizer import load_tokenizer, tiny_tokenizer_path

    tok = AutoTokenizer.from_pretrained(str(tiny_folder))
    ours = load_tokenizer(tiny_tokenizer_path()).instruct_tokenizer.tokenizer
    text = "Magistral thinks: 2 + 2 = 4, ça va? 日本語"
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text, bos=False, eos=False)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 2, 11, 131072)
