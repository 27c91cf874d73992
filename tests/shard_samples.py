"""Samples for shards, good and bad, and the shards that hold them: the bad-data tests (in-process loader in
tests/unit/test_bad_data.py, `clipjob train` in tests/integration/test_bad_data_train.py); bad image files for
zero-shot eval on folders (tests/unit/test_zeroshot.py, tests/integration/test_folder_eval.py)."""

from __future__ import annotations

import io
import random
import struct
import tarfile
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

from clipjob.datasets.writer import ShardWriter


def png(size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (30, 60, 90)).save(buf, "PNG")
    return buf.getvalue()


def jpeg(i: int, mode: str = "RGB") -> bytes:
    """Picture i: ellipses on a background, 50-95 px a side, JPEG quality 90 (chroma 4:2:0) in `mode`."""
    rng = random.Random(i)
    w, h = rng.randrange(50, 96), rng.randrange(50, 96)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.randrange(w), rng.randrange(h)
        d.ellipse([x - 15, y - 10, x + 15, y + 10], fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG header declaring width x height pixels in a few bytes: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def good(i: int) -> dict:
    return {"png": png(), "txt": f"a good sample {i}"}


def write(out: Path, samples: list[dict], per_shard: int = 1000) -> str:
    """Shards s-000000.tar, ... of these samples (keys 000000, ...) with a manifest; returns the directory."""
    with ShardWriter(str(out), prefix="s", max_samples=per_shard) as w:
        for i, s in enumerate(samples):
            w.write(f"{i:06d}", s)
    return str(out)


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar written member by member, so it can hold what ShardWriter refuses (repeated keys)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def bad_image_files() -> dict[str, tuple[bytes, str]]:
    """Files that look like images by name but are not: name -> (bytes, the reason decoding counts them under)."""
    whole = jpeg(99)
    return {"truncated.jpg": (whole[:len(whole) // 2], "corrupt_image"),
            "random.jpg": (random.Random(0).randbytes(2000), "corrupt_image"),
            "empty.jpg": (b"", "corrupt_image"),
            "bomb.png": (bomb_png(), "image_too_large")}
