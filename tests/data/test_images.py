"""Images in conversations: ids, image-token layout and pixel arrays equal mistral-common's, labels mask every
image token, bad images are per-record errors, caps and truncation never drop an image silently."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image

from magistune.config import parse_config
from magistune.data.build import prepare_data, validate_data
from magistune.data.encode import ConversationEncoder
from magistune.data.errors import RecordError
from magistune.data.images import ImageOptions, pixel_values
from magistune.data.records import RecordOptions, parse_record
from magistune.data.sample import IGNORE_INDEX
from magistune.tokenizer import SpecialIds, load_tokenizer, tiny_tokenizer_path

# Sizes that stay small, cross the 1540-pixel limit on one side, and on both.
SIZES = [(20, 20), (300, 200), (2000, 300), (1600, 1700)]


@pytest.fixture(scope="module")
def vtok():
    return load_tokenizer(tiny_tokenizer_path())  # v13 with Magistral 2509's image config


def _png(path, size, seed=0, fmt="PNG"):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def _opts(tmp_path, **kw):
    return RecordOptions(supports_images=True, images=ImageOptions(base_dir=tmp_path, **kw))


def test_ids_layout_and_pixels_equal_mistral_common(vtok, tmp_path):
    paths = [_png(tmp_path / f"img{i}.png", size, seed=i) for i, size in enumerate(SIZES)]
    jpeg = _png(tmp_path / "photo.jpg", (640, 480), seed=9, fmt="JPEG")
    data_uri = "data:image/png;base64," + base64.b64encode(paths[1].read_bytes()).decode()
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Compare these:"},
                                     {"type": "image", "path": "img0.png"},  # relative to the dataset folder
                                     {"type": "image_url", "image_url": {"url": str(paths[2])}}]},
        {"role": "assistant", "content": "The second is wider."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri}},
                                     {"type": "image", "base64": base64.b64encode(jpeg.read_bytes()).decode()},
                                     {"type": "text", "text": "And these?"},
                                     {"type": "image", "path": str(paths[3])}]},
        {"role": "assistant", "content": "Both are noise."},
        {"role": "user", "content": [{"type": "text", "text": "Last one"}, {"type": "image", "path": "img1.png"}]},
        {"role": "assistant", "content": "Still noise."}]}
    conv = parse_record(record, _opts(tmp_path))
    ids, labels, images = ConversationEncoder(vtok).encode(conv)

    # The same conversation built by hand with mistral-common's own chunks.
    pil = lambda p: Image.open(p)  # noqa: E731
    reference = ChatCompletionRequest(messages=[
        UserMessage(content=[TextChunk(text="Compare these:"), ImageChunk(image=pil(paths[0])), ImageChunk(image=pil(paths[2]))]),
        AssistantMessage(content="The second is wider."),
        UserMessage(content=[ImageChunk(image=pil(paths[1])), ImageChunk(image=pil(jpeg)), TextChunk(text="And these?"),
                             ImageChunk(image=pil(paths[3]))]),
        AssistantMessage(content="Both are noise."),
        UserMessage(content=[TextChunk(text="Last one"), ImageChunk(image=pil(paths[1]))]),  # mistral-common puts it first
        AssistantMessage(content="Still noise.")])
    expected = vtok.encode_chat_completion(reference)
    assert ids == expected.tokens
    assert len(images) == len(expected.images) == 6
    enc = vtok.instruct_tokenizer.image_encoder
    for ours, theirs in zip(images, expected.images):
        assert np.array_equal(pixel_values(enc, ours), theirs)
    special = SpecialIds.of(vtok)
    assert ids.count(special.img_end) == 6
    image_positions = [i for i, t in enumerate(ids) if t in (special.img, special.img_break, special.img_end)]
    assert all(labels[i] == IGNORE_INDEX for i in image_positions)
    # Every image's pixel grid matches its token grid: rows of [IMG]… ending in [IMG_BREAK] / [IMG_END].
    patch = vtok.instruct_tokenizer.image_encoder.image_config.image_patch_size * 2  # spatial merge 2
    n_tokens = sum(1 for t in ids if t == special.img)
    assert n_tokens == sum((a.shape[1] // patch) * (a.shape[2] // patch) for a in expected.images)


def test_image_in_tool_message(vtok, tmp_path):
    _png(tmp_path / "chart.png", (100, 60))
    record = {"messages": [
        {"role": "user", "content": "Plot it"},
        {"role": "assistant", "tool_calls": [{"id": "abc123def", "type": "function", "function": {"name": "plot", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "abc123def", "content": [{"type": "image", "path": "chart.png"}]},
        {"role": "assistant", "content": "Here is the chart."}]}
    conv = parse_record(record, _opts(tmp_path))
    assert isinstance(conv.request.messages[2], ToolMessage)
    try:
        expected = vtok.encode_chat_completion(conv.request).tokens
    except Exception as e:  # mistral-common 1.13 refuses images in tool results: a clear per-record error
        with pytest.raises(RecordError, match="tool message") as err:
            ConversationEncoder(vtok).encode(conv)
        assert err.value.reason == "rejected_by_mistral_common" and str(e) in err.value.message
        return
    ids, _, images = ConversationEncoder(vtok).encode(conv)
    assert ids == expected and len(images) == 1


@pytest.mark.parametrize("part,files,opts,reason", [
    ({"type": "image", "path": "missing.png"}, {}, {}, "image_missing"),
    ({"type": "image", "path": "broken.png"}, {"broken.png": b"\x89PNG\r\n\x1a\nnot really"}, {}, "image_unreadable"),
    ({"type": "image", "path": "truncated.png"}, {"truncated.png": "TRUNC"}, {}, "image_unreadable"),
    ({"type": "image", "path": "vector.svg"}, {"vector.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>"}, {}, "image_unsupported_format"),
    ({"type": "image", "base64": "%%%not base64"}, {}, {}, "image_unreadable"),
    ({"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}, {}, {}, "image_url_not_allowed"),
    ({"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}, {}, {"allow_urls": True, "timeout_s": 2}, "image_fetch_failed"),
    ({"type": "image", "path": "a.png", "url": "b.png"}, {}, {}, "bad_image_part"),
])
def test_bad_images(tmp_path, part, files, opts, reason):
    for name, content in files.items():
        if content == "TRUNC":
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
            content = buf.getvalue()[:60]
        (tmp_path / name).write_bytes(content)
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, part]},
                           {"role": "assistant", "content": "ok"}]}
    with pytest.raises(RecordError) as e:
        parse_record(record, _opts(tmp_path, **opts))
    assert e.value.reason == reason
    assert "messages[0].content[1]" in e.value.message


def test_image_in_assistant_and_without_image_config(tmp_path):
    _png(tmp_path / "a.png", (10, 10))
    record = {"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": [{"type": "image", "path": "a.png"}]}]}
    with pytest.raises(RecordError) as e:
        parse_record(record, _opts(tmp_path))
    assert e.value.reason == "image_in_wrong_role"
    record = {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"}]}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(RecordError) as e:
        parse_record(record, RecordOptions(supports_images=False))
    assert e.value.reason == "image_unsupported"


def _vision_config(tmp_path, records, **extra):
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    raw = {"base_model": "tiny-random-vision", "datasets": [{"path": "data.jsonl"}], "sequence_len": 4096,
           "output_dir": str(tmp_path / "out"), **extra}
    return parse_config(raw, config_dir=tmp_path)[0]


def _image_record(names):
    return {"messages": [{"role": "user", "content": [{"type": "image", "path": n} for n in names] + [{"type": "text", "text": "?"}]},
                         {"role": "assistant", "content": "noise"}]}


def test_caps_drop_or_error_never_silent(tmp_path, capsys):
    for i in range(3):
        _png(tmp_path / f"{i}.png", (56, 56), seed=i)
    records = [_image_record(["0.png"]), _image_record(["0.png", "1.png", "2.png"])]
    data = prepare_data(_vision_config(tmp_path, records, max_images_per_sample=2), progress=False)
    assert len(data.train) == 1 and [d.reason for d in data.report.dropped] == ["too_many_images"]
    cfg = _vision_config(tmp_path, records, max_images_per_sample=2, excess_length_strategy="truncate")
    assert validate_data(cfg) == 1
    assert "data.jsonl:2: too_many_images" in capsys.readouterr().out
    data = prepare_data(_vision_config(tmp_path, records, max_image_tokens_per_sample=10), progress=False)
    # 56×56 at patch 14, merge 2: 2×2 [IMG] + 2 row ends = 6 tokens an image: 1 image fits in 10, 3 do not.
    assert [(d.source, d.reason) for d in data.report.dropped] == [("data.jsonl:2", "too_many_images")]
    assert "18 image tokens" in data.report.dropped[0].message


def test_truncation_inside_an_image_drops_the_sample(tmp_path):
    _png(tmp_path / "big.png", (560, 560))  # (560/28)² = 400 [IMG] + 20 row ends
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "answer " * 5},
                           {"role": "user", "content": [{"type": "image", "path": "big.png"}]},
                           {"role": "assistant", "content": "more"}]}
    data_cfg = _vision_config(tmp_path, [record], sequence_len=100, excess_length_strategy="truncate")
    with pytest.raises(Exception, match="no sample is left"):
        prepare_data(data_cfg, progress=False)


def test_cache_keeps_image_bytes_and_notices_changes(tmp_path):
    _png(tmp_path / "0.png", (300, 200))
    cfg = _vision_config(tmp_path, [_image_record(["0.png"])] * 3)
    first = prepare_data(cfg, progress=False)
    again = prepare_data(cfg, progress=False)
    assert again.from_cache
    assert [bytes(b) for s in again.train for b in s.images] == [bytes(b) for s in first.train for b in s.images]
    entry = next(p for p in cfg.prepared_dir.iterdir() if p.is_dir())
    assert (entry / "images.bin").stat().st_size == 3 * (tmp_path / "0.png").stat().st_size  # bytes per image = the file
    _png(tmp_path / "0.png", (300, 200), seed=5)  # same name, new pixels
    rebuilt = prepare_data(cfg, progress=False)
    assert not rebuilt.from_cache
    assert bytes(rebuilt.train[0].images[0]) == (tmp_path / "0.png").read_bytes()


def test_report_states_bytes_per_image(tmp_path, capsys):
    _png(tmp_path / "0.png", (300, 200))
    cfg = _vision_config(tmp_path, [_image_record(["0.png"])] * 2)
    assert validate_data(cfg) == 0
    size = (tmp_path / "0.png").stat().st_size
    assert "images: 2 in kept samples" in (out := capsys.readouterr().out)
    assert f"{size / 1024:,.1f} KiB per image" in out


# --- the pixel cap, and paths outside the dataset's folder ------------------------------------------------------

def _png_header_only(width, height):
    """A PNG whose header declares width × height pixels (RGB), with a tiny image-data chunk: what a small
    decompression bomb looks like to Image.open."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _one_image_record(part):
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, part]},
                         {"role": "assistant", "content": "ok"}]}


def test_pixel_cap_checked_on_the_header_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header_only(13000, 13000))
    with pytest.raises(RecordError) as e:
        parse_record(_one_image_record({"type": "image", "path": "bomb.png"}), _opts(tmp_path))
    assert e.value.reason == "image_too_large"
    assert "13000×13000 = 169.0 megapixels, over max_image_pixels 50,000,000" in e.value.message
    assert e.value.message.startswith("messages[0].content[1]: ")


def test_pixel_cap_from_the_config(tmp_path, capsys):
    _png(tmp_path / "a.png", (100, 80))
    cfg = _vision_config(tmp_path, [_image_record(["a.png"])] * 2, max_image_pixels=7999)
    assert validate_data(cfg) == 1
    out = capsys.readouterr().out
    assert "image_too_large: 2" in out and "100×80 = 0.0 megapixels, over max_image_pixels 7,999" in out
    assert validate_data(_vision_config(tmp_path, [_image_record(["a.png"])], max_image_pixels=8000)) == 0


@pytest.fixture
def outside_layout(tmp_path):
    """ds/ holds the dataset and ds/img/in.png; out/ (beside it) holds out.png; ds/link.png → out/out.png."""
    (tmp_path / "ds" / "img").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    _png(tmp_path / "ds" / "img" / "in.png", (20, 20))
    _png(tmp_path / "out" / "out.png", (20, 20))
    (tmp_path / "ds" / "link.png").symlink_to(tmp_path / "out" / "out.png")
    (tmp_path / "out" / "notes.txt").write_text("secret", encoding="utf-8")
    return tmp_path


def _reason(path, opts):
    try:
        parse_record(_one_image_record({"type": "image", "path": path}), RecordOptions(supports_images=True, images=opts))
    except RecordError as e:
        return e.reason, e.message
    return None, None


def test_image_paths_outside_the_dataset_folder(outside_layout):
    root = outside_layout
    opts = ImageOptions(base_dir=root / "ds")
    assert _reason("img/in.png", opts) == (None, None)
    assert _reason(str(root / "ds" / "img" / "in.png"), opts) == (None, None)
    for path in ("../out/out.png", str(root / "out" / "out.png"), "link.png", "img/../../out/out.png",
                 "../out/missing.png", "../out/notes.txt"):
        reason, message = _reason(path, opts)
        assert reason == "image_outside_dataset", (path, reason, message)
        assert "allow_image_paths_outside_dataset" in message
    for url in (f"file://{root}/out/out.png", "../out/out.png"):
        record = _one_image_record({"type": "image_url", "image_url": {"url": url}})
        with pytest.raises(RecordError, match="outside the dataset folder"):
            parse_record(record, RecordOptions(supports_images=True, images=opts))
    # what exists outside cannot be told from what does not: the same message but for the path as written
    exists, missing = _reason("../out/out.png", opts)[1], _reason("../out/nope.png", opts)[1]
    assert exists.replace("out.png", "X") == missing.replace("nope.png", "X")
    # allowed: everything, or listed folders
    anywhere = ImageOptions(base_dir=root / "ds", allow_outside=True)
    assert _reason("../out/out.png", anywhere) == (None, None) and _reason("link.png", anywhere) == (None, None)
    assert _reason("../out/missing.png", anywhere)[0] == "image_missing"
    listed = ImageOptions(base_dir=root / "ds", extra_roots=(root / "out",))
    assert _reason("../out/out.png", listed) == (None, None)
    assert _reason("../elsewhere.png", listed)[0] == "image_outside_dataset"


def test_outside_paths_from_the_config(outside_layout, capsys):
    root = outside_layout
    record = _image_record(["../out/out.png"])
    (root / "ds" / "data.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    raw = {"base_model": "tiny-random-vision", "datasets": [{"path": "ds/data.jsonl"}], "output_dir": str(root / "o")}
    assert validate_data(parse_config(raw, config_dir=root)[0]) == 1
    assert "ds/data.jsonl:1: image_outside_dataset" in capsys.readouterr().out
    for allowed in (True, ["out"]):  # a list is relative to the config's folder
        cfg = parse_config({**raw, "allow_image_paths_outside_dataset": allowed}, config_dir=root)[0]
        assert validate_data(cfg) == 0


def test_truncated_images_bin_is_rebuilt(tmp_path, capsys):
    _png(tmp_path / "0.png", (60, 40))
    cfg = _vision_config(tmp_path, [_image_record(["0.png"])] * 2)
    first = prepare_data(cfg, progress=False)
    entry = next(p for p in cfg.prepared_dir.iterdir() if p.is_dir())
    blob = entry / "images.bin"
    blob.write_bytes(blob.read_bytes()[:-10])
    again = prepare_data(cfg, progress=False)
    assert not again.from_cache and "images.bin has" in capsys.readouterr().err
    assert [bytes(b) for s in again.train for b in s.images] == [bytes(b) for s in first.train for b in s.images]
