"""Decoding one webdataset sample into (RGB PIL image, caption), or a reason why it is bad."""

from __future__ import annotations

import hashlib
import io
import json
import warnings

from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_PIXELS = 8192 * 8192  # larger images are decompression bombs for our purposes


class BadSample(Exception):
    """A sample that is skipped and counted; `reason` is the metrics key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_caption(sample: dict, key: str = "txt") -> str:
    raw = sample.get(key)
    if raw is None:
        raise BadSample("missing_caption")
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
    except UnicodeDecodeError:
        raise BadSample("caption_not_utf8") from None
    text = " ".join(text.split())
    if not text:
        raise BadSample("empty_caption")
    return text


def group_id(sample: dict, key: str) -> int | None:
    """The int64 id of the sample's `.json` field `key` (data.positives_key), equal for equal values; None when
    the sample has no JSON, the JSON does not parse or lacks the field (the sample is then its own group)."""
    raw = sample.get("json")
    if raw is None:
        return None
    try:
        value = json.loads(raw).get(key)
    except (ValueError, AttributeError):
        return None
    if value is None:
        return None
    digest = hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def open_image(data: bytes) -> Image.Image:
    """Parse an image's header only (no pixels decoded), refusing declared sizes above MAX_PIXELS."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadSample("image_too_large") from None
    except Exception:  # noqa: BLE001 - not an image PIL can parse
        raise BadSample("corrupt_image") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise BadSample("image_too_large")
    return img


def image_bytes(sample: dict) -> bytes:
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise BadSample("missing_image")
    return data


def decode_image(sample: dict, target: int, draft: bool = True) -> Image.Image:
    """Decode the first image field. The declared size is checked before any pixel is decoded (bombs), and
    JPEGs are decoded at a reduced DCT scale (draft mode: 1/2, 1/4 or 1/8) that still leaves the shorter
    side >= target, which is several times faster for images much larger than the target (draft=False: full
    size, as data.decode=gpu's fallback needs for a crop box drawn on the declared size)."""
    img = open_image(image_bytes(sample))
    try:
        if img.format == "JPEG" and draft:
            img.draft("RGB", (target, target))  # the largest reduction keeping both sides >= target
        img.load()
        if img.mode in ("RGBA", "LA", "P", "PA"):
            img = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
        return img.convert("RGB")
    except Exception:  # noqa: BLE001 - any decoder failure means a corrupt image
        raise BadSample("corrupt_image") from None
