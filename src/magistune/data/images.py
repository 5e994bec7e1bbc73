"""Image parts of user and tool messages → the original image bytes plus a decoded PIL image.

Accepted parts (several per message, in any user or tool turn):
    {"type": "image", "path" | "url" | "base64": ...}
    {"type": "image_url", "image_url": {"url": "<http(s) URL | data: URI | local path>"}}   (OpenAI)
Relative paths resolve against the dataset file's folder, and a path (symlinks resolved) must stay inside it
unless `allow_image_paths_outside_dataset` allows it: a dataset from elsewhere cannot read /etc or ~/.ssh into
a training run. http(s) URLs are fetched only with `allow_image_urls: true`, with a timeout. An image is
decoded only when its header's width × height is within `max_image_pixels` (a 656 KB PNG can declare
13000² pixels: 0.7 GB of RGBA once decoded). Samples keep the original encoded bytes (a few hundred KB an image,
not the ~28 MB float32 array of a 1540×1540 image); pixels are recomputed with mistral-common's own image
encoder when batches are built, so they equal what `encode_chat_completion` returns.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mistral_common.protocol.instruct.chunk import ImageChunk
from PIL import Image, UnidentifiedImageError

from magistune.data.errors import RecordError

IMAGE_PARTS = ("image", "image_url", "input_image")
SUPPORTED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


DEFAULT_MAX_PIXELS = 50_000_000  # config.py's default for max_image_pixels


@dataclass(frozen=True)
class ImageOptions:
    base_dir: Path | None = None  # the dataset file's folder; None (API use): paths are read as given
    allow_urls: bool = False
    timeout_s: float = 10.0
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    allow_outside: bool = False  # local paths anywhere
    extra_roots: tuple[Path, ...] = ()  # folders allowed besides base_dir


def part_reference(part: dict, where: str) -> tuple[str, str]:
    """(kind, value) with kind in path|url|base64 for one image part."""
    if part["type"] == "image":
        refs = [(k, part[k]) for k in ("path", "url", "base64") if part.get(k) is not None]
        if len(refs) != 1 or not isinstance(refs[0][1], str):
            raise RecordError("bad_image_part", f"{where}: an image part needs exactly one string 'path', 'url' or 'base64'")
        kind, value = refs[0]
        return ("url", value) if kind == "url" else (kind, value)
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise RecordError("bad_image_part", f"{where}: an image_url part needs image_url.url")
    return "url", url


def _read_bytes(kind: str, value: str, opts: ImageOptions, where: str) -> tuple[bytes, str]:
    """The image file's bytes and a short description of where they came from."""
    if kind == "url" and value.startswith("data:"):
        kind, value = "base64", value.split(",", 1)[1] if "," in value else ""
    elif kind == "url" and value.startswith("file://"):
        kind, value = "path", value[len("file://"):]
    elif kind == "url" and not value.startswith(("http://", "https://")):
        kind = "path"
    if kind == "base64":
        try:
            return base64.b64decode(value, validate=True), "base64"
        except (binascii.Error, ValueError):
            raise RecordError("image_unreadable", f"{where}: invalid base64 image data") from None
    if kind == "url":
        if not opts.allow_urls:
            raise RecordError("image_url_not_allowed", f"{where}: image URL {value} (set allow_image_urls: true to fetch URLs)")
        try:
            with urllib.request.urlopen(value, timeout=opts.timeout_s) as resp:  # noqa: S310 (http/https only)
                return resp.read(), value
        except Exception as e:
            raise RecordError("image_fetch_failed", f"{where}: could not fetch {value}: {e}") from None
    path = Path(value).expanduser()
    if not path.is_absolute() and opts.base_dir is not None:
        path = opts.base_dir / path
    _check_inside_roots(path, value, opts, where)  # first: the messages below must not tell what exists outside
    if not path.is_file():
        raise RecordError("image_missing", f"{where}: image file not found: {path}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise RecordError("image_unsupported_format", f"{where}: {path.name}: unsupported image format (use {', '.join(sorted(SUPPORTED_FORMATS))})")
    return path.read_bytes(), str(path)


def _check_inside_roots(path: Path, value: str, opts: ImageOptions, where: str) -> None:
    if opts.allow_outside or opts.base_dir is None:
        return
    roots = [opts.base_dir.resolve(), *(r.resolve() for r in opts.extra_roots)]
    if not any(path.resolve().is_relative_to(root) for root in roots):  # resolve(): symlinks and ".." followed
        raise RecordError("image_outside_dataset", f"{where}: image path {value!r} is outside the dataset folder "
                          f"{roots[0]}{' and allowed folders' if len(roots) > 1 else ''} (set "
                          "allow_image_paths_outside_dataset: true, or a list of allowed folders)")


def decode_image(data: bytes, where: str = "image", origin: str = "", max_pixels: int | None = None) -> Image.Image:
    """Decode and fully load (so truncated files fail here, not during training). With max_pixels, the
    header's size is checked first: Image.open reads only the header, load() decodes."""
    name = origin or "image"
    try:
        with warnings.catch_warnings():  # PIL warns from 89 MP on; max_image_pixels is our limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # over PIL's hard limit (179 MP), which max_image_pixels cannot pass
        raise RecordError("image_too_large", f"{where}: {name}: {e} (max_image_pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise RecordError("image_unreadable", f"{where}: {name} is not a readable image ({type(e).__name__}: {e})") from None
    fmt, (w, h) = img.format, img.size
    if fmt not in SUPPORTED_FORMATS:
        raise RecordError("image_unsupported_format", f"{where}: {name}: unsupported image format {fmt}")
    if max_pixels is not None and w * h > max_pixels:
        raise RecordError("image_too_large", f"{where}: {name} is {w}×{h} = {w * h / 1e6:,.1f} megapixels, over "
                          f"max_image_pixels {max_pixels:,} (decoded it would take {w * h * 4 / 2**30:,.1f} GiB as "
                          "RGBA); shrink it, or raise max_image_pixels")
    try:
        img.load()
    except (OSError, ValueError) as e:
        raise RecordError("image_unreadable", f"{where}: {name} is not a readable image ({type(e).__name__}: {e})") from None
    return img


def load_image_part(part: dict, opts: ImageOptions, where: str) -> tuple[bytes, Image.Image, str]:
    """(file bytes, decoded image, origin): origin is the local path, the URL, or "base64"."""
    kind, value = part_reference(part, where)
    data, origin = _read_bytes(kind, value, opts, where)
    return data, decode_image(data, where, origin, opts.max_pixels), origin


def pixel_values(image_encoder, data: bytes) -> np.ndarray:
    """The (C, H, W) float32 array mistral-common's image encoder makes of these image bytes (checked against
    max_image_pixels when the data was prepared)."""
    return image_encoder(ImageChunk(image=decode_image(bytes(data)))).image


def local_file_stamp(origin: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a local image file, so the cache notices when it changes."""
    path = Path(origin)
    if origin in ("base64",) or origin.startswith(("http://", "https://")) or not path.is_file():
        return None
    st = path.stat()
    return st.st_size, st.st_mtime_ns
