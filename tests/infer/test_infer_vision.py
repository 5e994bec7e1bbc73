"""Images in chat and generate (tiny-random-vision): the same parts as training data, the ids and pixels
mistral-common and the training batches give, and the image reaching the model."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from magistune.cli import main
from magistune.data.errors import RecordError
from magistune.data.images import ImageOptions, decode_image
from magistune.data.sample import Sample
from magistune.infer.chat import Session, Style, run_chat
from magistune.infer.loading import load_for_inference, resolve_source
from magistune.infer.prompts import build_request, encode_with_images, image_inputs
from magistune.infer.sampling import SamplingOptions, generate_ids
from magistune.model import pick_device
from magistune.model_files import materialize_tiny
from magistune.train.batches import collate_images

SHAPES = Path(__file__).resolve().parents[2] / "examples" / "data" / "shapes"
CIRCLE = SHAPES / "green-circle.png"


@pytest.fixture(scope="module")
def vision():
    return load_for_inference(resolve_source(None, model=str(materialize_tiny("tiny-random-vision"))), pick_device("cpu"))


def ask(*parts):
    return [{"role": "user", "content": list(parts)}]


def test_prompt_ids_and_pixels_are_mistral_commons_and_trainings(vision):
    request = build_request(ask({"type": "image", "path": "green-circle.png"}, {"type": "text", "text": "What?"}),
                            images=ImageOptions(SHAPES))
    ids, pixels = encode_with_images(vision.tokenizer, request)
    expected = vision.tokenizer.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=[
        ImageChunk(image=decode_image(CIRCLE.read_bytes())), TextChunk(text="What?")])]))
    assert ids == expected.tokens and vision.special.img in ids
    # the forward's image inputs equal what training's batches build from the same file's bytes
    ours = image_inputs(pixels, torch.device("cpu"))
    train_pixels, train_sizes = collate_images([Sample([], [], "x", [CIRCLE.read_bytes()])],
                                               vision.tokenizer.instruct_tokenizer.image_encoder)
    assert torch.equal(ours["pixel_values"], train_pixels) and torch.equal(ours["image_sizes"], train_sizes)
    # and the image reaches the model: greedy generation = argmax of a forward with those pixels
    other = image_inputs(encode_with_images(vision.tokenizer, build_request(
        ask({"type": "image", "path": "green-circle.png"}, {"type": "text", "text": "What?"}),
        images=ImageOptions(SHAPES)))[1], torch.device("cpu"))
    other["pixel_values"] = torch.flip(other["pixel_values"], dims=[-1])  # the same size, other pixels
    with torch.no_grad():
        logits = vision.model(input_ids=torch.tensor([ids]), **ours).logits[0, -1]
        assert not torch.equal(logits, vision.model(input_ids=torch.tensor([ids]), **other).logits[0, -1])
    out = generate_ids(vision.model, [ids], vision.special.eos, vision.special.pad, SamplingOptions(0, 1, 1),
                       images=ours)
    assert out == [[int(logits.argmax())]]


def test_image_parts_follow_the_training_rules(vision, tmp_path):
    data_uri = "data:image/png;base64," + base64.b64encode(CIRCLE.read_bytes()).decode()
    build_request(ask({"type": "image_url", "image_url": {"url": data_uri}}), images=ImageOptions(tmp_path))
    with pytest.raises(RecordError, match="allow_image_urls"):
        build_request(ask({"type": "image", "url": "https://example.com/a.png"}), images=ImageOptions(tmp_path))
    with pytest.raises(RecordError, match="outside the dataset folder"):
        build_request(ask({"type": "image", "path": str(CIRCLE)}), images=ImageOptions(tmp_path))
    with pytest.raises(RecordError, match="takes no images"):
        build_request(ask({"type": "image", "path": str(CIRCLE)}), images=None)


def test_generate_cli_with_images(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "c.png").write_bytes(CIRCLE.read_bytes())
    rows = [{"id": 1, "messages": ask({"type": "image", "path": "img/c.png"}, {"type": "text", "text": "Shape?"})},
            {"id": 2, "messages": ask({"type": "text", "text": "No image."})},
            {"id": 3, "messages": ask({"type": "image", "url": "http://example.com/x.png"})}]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "o.jsonl"
    rc = main(["generate", "--model", "tiny-random-vision", "--input", str(src), "--output", str(out),
               "--temperature", "0", "--max-tokens", "3", "--batch-size", "2"])
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rc == 1 and [r["id"] for r in got] == [1, 2, 3]
    assert got[0]["tokens"] == 3 and got[1]["tokens"] == 3
    assert got[2]["error"].startswith("image_url_not_allowed")


def test_chat_image_command(vision):
    said = []
    queue = [f"/image {CIRCLE}", "/image /nope.png", "What shape?", "And now?"]

    def read(prompt):
        if not queue:
            raise EOFError
        return queue.pop(0)

    class Out:
        def write(self, text):
            said.append(text)

        def flush(self):
            pass

    session = Session()
    run_chat(vision, SamplingOptions(0, 1, 2), Style(color=False), read_line=read, out=Out(), session=session)
    text = "".join(said)
    assert "image attached (1 for the next message)" in text and "image file not found" in text
    first, second = session.history[0], session.history[2]
    assert first["content"][0]["image_url"]["url"] == str(CIRCLE) and first["content"][1]["text"] == "What shape?"
    assert second["content"] == "And now?"  # the image went with the message it was attached to
    assert session.images == []


def test_chat_cli_image_command():
    """`magistune chat --model tiny-random-vision`: /image PATH attaches the image to the next message."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    stdin = f"/image {CIRCLE}\nWhat shape?\n/image {CIRCLE.parent / 'missing.png'}\n/quit\n"
    proc = subprocess.run([sys.executable, "-m", "magistune", "chat", "--model", "tiny-random-vision", "--color",
                           "never", "--temperature", "0", "--max-tokens", "3"], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "image attached (1 for the next message)" in proc.stdout and "image file not found" in proc.stdout
    assert proc.stdout.count("error:") == 1  # the missing file only: the turn with the image ran
