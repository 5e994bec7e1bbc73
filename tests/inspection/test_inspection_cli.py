"""`magistune inspect` in the terminal, for every data kind, in process (as a person runs it, without a tty)."""

import re

import pytest
import yaml
from inspect_helpers import Dom, assistant_text, first_record
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from magistune.cli import main
from magistune.data.encode import ConversationEncoder
from magistune.inspection.terminal import CLOSE, OPEN

pytestmark = pytest.mark.usefixtures("fast_tokenizers")


def spans(out: str) -> list[str]:
    """The bracketed trained spans, without the ⟨id⟩ marks of --ids."""
    return [re.sub(r"⟨[\d,]+⟩", "", part.split(CLOSE)[0]) for part in out.split(OPEN)[1:]]


def test_sft_without_a_tty_brackets_the_trained_spans_and_uses_no_colour(demo, capsys):
    config = demo("demo-tiny.yaml")
    assert main(["inspect", str(config), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "\033[" not in out
    assert out.count("── data/demo.jsonl:") == 2
    first = out.split("── data/demo.jsonl:2")[0]
    assert spans(first) == [assistant_text(first_record(config))]
    assert "<s>[SYSTEM_PROMPT]" in first and "[INST]" in first and "[/INST]" + OPEN + "[THINK]" in first


def test_colour_on_request_and_the_ids_are_mistral_commons(demo, capsys, tiny_tok):
    config = demo("demo-tiny.yaml")
    assert main(["inspect", str(config), "--source", "demo.jsonl:1", "--ids", "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\033[32m" in out and OPEN not in out
    record = first_record(config)
    expected = tiny_tok.encode_chat_completion(ChatCompletionRequest.from_openai(record["messages"])).tokens
    line = next(ln for ln in out.splitlines() if "⟨" in ln)
    shown = [int(part.split("⟩")[0]) for part in line.split("⟨")[1:]]
    assert shown == expected


def test_source_selects_and_names_why_a_record_is_missing(demo, capsys):
    config = demo("demo-tiny.yaml", bad_lines=['{"messages": [{"role": "user", "content": "hi"}]}'])
    assert main(["inspect", str(config), "--source", "data/demo.jsonl:7", "--source", "demo.jsonl:3"]) == 0
    out = capsys.readouterr().out
    assert [ln.split(" (")[0] for ln in out.splitlines() if ln.startswith("── ")] == ["── data/demo.jsonl:3",
                                                                                     "── data/demo.jsonl:7"]
    assert "rejected 1" in out
    assert main(["inspect", str(config), "--source", "demo.jsonl:41"]) == 2
    err = capsys.readouterr().err
    assert "--source demo.jsonl:41: the record was not kept" in err
    assert main(["inspect", str(config), "--source", "demo.jsonl:99"]) == 2
    assert "no kept sample comes from there" in capsys.readouterr().err


def test_vision_folds_each_image(demo, capsys, tiny_tok):
    config = demo("demo-tiny-vision.yaml")
    assert main(["inspect", str(config), "--source", "shapes.jsonl:2", "--ids"]) == 0
    out = capsys.readouterr().out
    special = ConversationEncoder(tiny_tok).ids
    line = next(ln for ln in out.splitlines() if ln.startswith("<s>"))
    assert line.count("[IMG]×") == 3  # two images in the first turn, one in the second
    n = int(line.split("[IMG]×")[1].split("⟨")[0])
    assert f"⟨{special.img},{special.img_break},{special.img_end}⟩" in line
    assert n == 12  # 84 × 84 pixels at 28 a token: 3 × 3 [IMG] + 3 row ends
    assert spans(out)[:2] == ["First a yellow square, then a blue square.</s>", "A blue square.</s>"]


def test_preference_shows_chosen_and_rejected(demo, capsys):
    config = demo("demo-tiny-dpo.yaml")
    assert main(["inspect", str(config), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "demo_dpo.jsonl:1 (train, chosen:" in out and "demo_dpo.jsonl:1 (train, rejected:" in out
    assert spans(out) == ["The capital of Kenya is Nairobi.</s>", "Why do you want to know?</s>"]


def test_kto_marks_desirable_examples(tmp_path, write_jsonl, write_config, capsys):
    q = [{"role": "user", "content": "2+2?"}]
    write_jsonl(tmp_path / "data.jsonl", [{"prompt": q, "completion": [{"role": "assistant", "content": "4"}],
                                            "label": True},
                                           {"prompt": q, "completion": [{"role": "assistant", "content": "5"}],
                                            "label": False}])
    assert main(["inspect", str(write_config(rl="kto")), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "data.jsonl:1 (train, desirable" in out and "data.jsonl:2 (train, undesirable" in out
    assert spans(out) == ["4</s>", "5</s>"]


def test_grpo_prompts_end_at_inst_and_show_their_columns(demo, capsys):
    config = demo("demo-tiny-grpo.yaml", bad_lines=['{"prompt": []}'])
    assert main(["inspect", str(config), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "prompt records: 33, kept 32, rejected 1" in out
    assert "<s>[INST]What is 4 + 20? Put the result in \\boxed{}.[/INST]\n" in out
    assert OPEN not in out and 'columns for the reward functions: {"answer": "24"}' in out


def test_a_fresh_cache_is_read_not_tokenised_again(demo, capsys, monkeypatch):
    config = demo("demo-tiny.yaml")
    assert main(["preprocess", str(config)]) == 0
    capsys.readouterr()

    def refuse(*args, **kwargs):
        raise AssertionError("inspect tokenised again although the cache is fresh")

    monkeypatch.setattr(ConversationEncoder, "encode", refuse)
    assert main(["inspect", str(config), "--samples", "1", "--html", str(config.parent / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "(reused)" in out and "wrote " in out


def test_html_paths_and_counts_are_checked_first(demo, capsys):
    config = demo("demo-tiny.yaml")
    assert main(["inspect", str(config), "--html", str(config.parent / "missing" / "r.html")]) == 2
    assert "its folder does not exist" in capsys.readouterr().err
    assert main(["inspect", str(config), "--samples", "-1"]) == 2
    assert "--samples must be >= 0" in capsys.readouterr().err


def test_a_stale_cache_is_rebuilt_even_when_bad_records_would_stop_training(demo, capsys):
    config = demo("demo-tiny.yaml", bad_lines=["not json"])
    assert "on_bad_record" not in yaml.safe_load(config.read_text())  # the default: error
    assert main(["inspect", str(config), "--samples", "0"]) == 0
    assert "rejected 1" in capsys.readouterr().out
    assert main(["train", str(config)]) == 2  # training still applies on_bad_record: error
    assert "1 bad record(s)" in capsys.readouterr().err


@pytest.mark.parametrize("name, kept, seqs", [("demo-tiny-vision.yaml", 18, ["sample"]),
                                              ("demo-tiny-dpo.yaml", 64, ["chosen", "rejected"]),
                                              ("demo-tiny-grpo.yaml", 32, ["prompt"])])
def test_the_html_report_of_every_data_kind(demo, capsys, name, kept, seqs):
    config = demo(name)
    report = config.parent / "report.html"
    assert main(["inspect", str(config), "--html", str(report)]) == 0
    assert capsys.readouterr().out.endswith(f"wrote {report}: {kept} of {kept} samples, 0 rejected record(s)\n")
    dom = Dom(report.read_text(encoding="utf-8"))
    assert len(dom.samples) == kept == int(dom.body["data-samples"])
    assert all(s["seqs"] == seqs for s in dom.samples)
    kinds = {c[1] for s in dom.samples for c, _ in s["tokens"]}
    trained = [c for s in dom.samples for c, _ in s["tokens"] if c[0] == "t"]
    if name == "demo-tiny-vision.yaml":  # the images as thumbnails and as [IMG]×N tokens
        assert "img" in kinds and dom.samples[1]["images"] == 3
    if name == "demo-tiny-grpo.yaml":
        assert not trained
    else:
        assert trained
    assert "http://" not in report.read_text() and "https://" not in report.read_text()  # nothing fetched


def test_html_samples_limits_the_report(demo, capsys):
    config = demo("demo-tiny.yaml")
    report = config.parent / "report.html"
    assert main(["inspect", str(config), "--html", str(report), "--html-samples", "5"]) == 0
    assert "wrote" in capsys.readouterr().out
    dom = Dom(report.read_text(encoding="utf-8"))
    assert [s["source"] for s in dom.samples] == [f"data/demo.jsonl:{n}" for n in range(1, 6)]
    assert "the first 5 of 40 samples" in report.read_text(encoding="utf-8")
