"""decode.py: captions, images, draft-mode JPEG decoding, decompression bombs."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from PIL import Image

from clipjob.data.decode import BadSample, decode_caption, decode_image, open_image


def jpeg(w: int, h: int, quality: int = 90) -> bytes:
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (the pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def reason(fn, *a) -> str:
    with pytest.raises(BadSample) as e:
        fn(*a)
    return e.value.reason


def test_should_normalise_whitespace_when_decoding_a_caption():
    assert decode_caption({"txt": b"  a red\n apple "}) == "a red apple"
    assert decode_caption({"text": "x"}, "text") == "x"


def test_should_name_the_reason_when_a_caption_is_unusable():
    assert reason(decode_caption, {}) == "missing_caption"
    assert reason(decode_caption, {"txt": b" \n "}) == "empty_caption"
    assert reason(decode_caption, {"txt": b"\xff\xfe caf\xe9"}) == "caption_not_utf8"


def test_should_decode_large_jpegs_at_a_reduced_scale_that_still_covers_the_target():
    data = jpeg(2048, 1536)
    img = decode_image({"jpg": data}, 224)
    assert img.size == (512, 384) and img.mode == "RGB"  # 1/4 scale: the shorter side stays >= 224
    assert decode_image({"jpg": data}, 400).size == (1024, 768)  # 1/2 scale for a larger target
    assert decode_image({"jpg": jpeg(300, 250)}, 224).size == (300, 250)  # small images are left alone


def test_should_decode_faster_with_draft_mode_than_a_full_decode():
    data = jpeg(2048, 1536)

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    draft = best(lambda: decode_image({"jpg": data}, 224))
    full = best(lambda: Image.open(io.BytesIO(data)).convert("RGB"))
    assert draft < full / 2, (draft, full)


def test_should_composite_transparent_images_on_white():
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(buf, "PNG")
    assert decode_image({"png": buf.getvalue()}, 8).getpixel((0, 0)) == (255, 255, 255)


def test_should_refuse_a_decompression_bomb_from_its_header_without_decoding_it():
    data = png_declaring(100_000, 100_000)
    assert len(data) < 200
    t = time.perf_counter()
    assert reason(decode_image, {"png": data}, 224) == "image_too_large"
    assert reason(open_image, data) == "image_too_large"
    assert time.perf_counter() - t < 1.0


def test_should_name_the_reason_when_an_image_is_missing_or_corrupt():
    assert reason(decode_image, {"txt": b"x"}, 224) == "missing_image"
    assert reason(decode_image, {"jpg": b"definitely not an image"}, 224) == "corrupt_image"
    truncated = jpeg(640, 480)[:2000]  # the header parses, the pixel data breaks off
    assert open_image(truncated).size == (640, 480)
    assert reason(decode_image, {"jpg": truncated}, 224) == "corrupt_image"
