"""Bad data: each kind is skipped and counted by reason, training goes on; a mostly-bad dataset stops
`clipjob train` with exit code 2 and one line."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from clipjob.config import DataConfig
from clipjob.data.pipeline import build_train_loader
from clipjob.datasets.writer import ShardWriter


def png(size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (30, 60, 90)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def good(i: int) -> dict:
    return {"png": png(), "txt": f"a good sample {i}"}


def write(out: Path, samples: list[dict], per_shard: int = 1000) -> str:
    with ShardWriter(str(out), prefix="s", max_samples=per_shard) as w:
        for i, s in enumerate(samples):
            w.write(f"{i:06d}", s)
    return str(out)


def bad_counts(spec: str, batches: int = 6) -> Counter:
    """Run the real loader (in-process) for a few batches: they must come, with full shapes."""
    tok = lambda caps: torch.zeros(len(caps), 4, dtype=torch.long)  # noqa: E731
    data = DataConfig(train=spec, num_workers=0, shuffle_buffer=4, rrc_scale=(0.9, 1.0))
    it = iter(build_train_loader(data, batch_size=4, image_size=16, tokenizer=tok, seed=0, rank=0, start_step=0))
    total: Counter = Counter()
    for _ in range(batches):
        b = next(it)
        assert b.images.shape == (4, 3, 16, 16)
        total.update(b.bad)
    return total


def with_one_bad(tmp_path: Path, bad_sample: dict) -> str:
    return write(tmp_path / "ds", [good(i) for i in range(3)] + [bad_sample] + [good(i) for i in range(3, 6)])


def test_should_skip_and_count_a_truncated_tar(tmp_path):
    d = write(tmp_path / "ds", [good(i) for i in range(8)] + [{"png": os.urandom(20_000), "txt": "big"}])
    shard = tmp_path / "ds" / "s-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-15_000])  # cut inside the last sample's image
    assert bad_counts(d)["truncated_shard"] > 0  # and the 8 samples before the cut still make batches


def test_should_skip_and_count_a_corrupt_image(tmp_path):
    assert bad_counts(with_one_bad(tmp_path, {"jpg": b"\xff\xd8\xff garbage", "txt": "x"}))["corrupt_image"] > 0


def test_should_skip_and_count_a_missing_caption(tmp_path):
    assert bad_counts(with_one_bad(tmp_path, {"png": png()}))["missing_caption"] > 0


def test_should_skip_and_count_an_empty_caption(tmp_path):
    assert bad_counts(with_one_bad(tmp_path, {"png": png(), "txt": " \n\t "}))["empty_caption"] > 0


def test_should_skip_and_count_a_caption_that_is_not_utf8(tmp_path):
    assert bad_counts(with_one_bad(tmp_path, {"png": png(), "txt": b"caf\xe9 cr\xe8me"}))["caption_not_utf8"] > 0


def test_should_skip_and_count_a_decompression_bomb(tmp_path):
    bomb = bomb_png()
    assert len(bomb) < 200  # small on disk, 3.6 gigapixels declared
    assert bad_counts(with_one_bad(tmp_path, {"png": bomb, "txt": "bomb"}))["image_too_large"] > 0


def test_should_skip_and_count_a_zero_byte_shard(tmp_path):
    d = write(tmp_path / "ds", [good(i) for i in range(6)], per_shard=3)
    (tmp_path / "ds" / "s-000001.tar").write_bytes(b"")
    assert bad_counts(d)["empty_shard"] > 0


def test_should_skip_and_count_a_missing_shard(tmp_path):
    d = write(tmp_path / "ds", [good(i) for i in range(6)], per_shard=3)
    (tmp_path / "ds" / "s-000001.tar").unlink()  # still listed in manifest.json
    assert bad_counts(d)["missing_shard"] > 0


TINY = ["--preset", "tiny-cpu-scratch", "--set", "model.vision.width=32", "--set", "model.vision.layers=1",
        "--set", "model.vision.heads=2", "--set", "model.vision.image_size=16", "--set", "model.text.width=32",
        "--set", "model.text.layers=1", "--set", "model.text.heads=2", "--set", "model.text.context_length=8",
        "--set", "model.embed_dim=16", "--set", "train.batch_size=8", "--set", "train.log_every=1",
        "--set", "train.warmup_steps=1", "--set", "data.num_workers=1", "--set", "data.shuffle_buffer=20",
        "--set", "train.precision=fp32", "--set", "train.ckpt_every_steps=0"]


def clipjob_train(data: str, run: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipjob", "train", *TINY, "--set", f"data.train={data}",
                           "--set", f"train.steps={steps}", "--run-dir", str(run), *extra],
                          capture_output=True, text=True, timeout=300)


def test_should_train_with_ddp_through_every_kind_of_bad_data_and_fewer_shards_than_workers(tmp_path):
    """2 ranks x 2 workers = 4 streams over 4 shards of which only 2 are readable (one is truncated), plus one
    sample of each bad kind: every rank keeps getting batches, nothing crashes or hangs."""
    samples = [good(i) for i in range(160)]
    for i, bad in enumerate([{"jpg": b"garbage", "txt": "x"}, {"png": png()}, {"png": png(), "txt": ""},
                             {"png": png(), "txt": b"\xe9"}, {"png": bomb_png(), "txt": "bomb"}]):
        samples[5 + i] = bad
    d = write(tmp_path / "ds", samples, per_shard=40)
    (tmp_path / "ds" / "s-000001.tar").write_bytes(b"")
    (tmp_path / "ds" / "s-000002.tar").unlink()
    shard = tmp_path / "ds" / "s-000003.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = clipjob_train(d, tmp_path / "run", 6, "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
                      "--set", "data.num_workers=2")
    assert p.returncode == 0, p.stdout + p.stderr
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 6 and last["samples_seen"] == 6 * 8 * 2 and last["bad_samples"] > 0


def test_should_stop_with_exit_code_2_and_one_line_when_most_samples_are_bad(tmp_path):
    samples = [good(i) if i % 20 == 0 else {"jpg": b"\xff\xd8 broken", "txt": f"bad {i}"} for i in range(2000)]
    d = write(tmp_path / "ds", samples, per_shard=500)
    p = clipjob_train(d, tmp_path / "run", steps=500)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and [ln for ln in lines if ln.startswith("error:")] == lines[-1:]
    assert lines[-1].startswith("error: data.train:")
    assert "max_bad_fraction" in lines[-1] and "corrupt_image" in lines[-1]


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar written member by member, so it can hold what ShardWriter refuses (repeated keys)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_should_skip_and_count_a_file_that_is_not_a_tar_as_unreadable(tmp_path):
    d = write(tmp_path / "ds", [good(i) for i in range(6)], per_shard=3)
    (tmp_path / "ds" / "s-000001.tar").write_bytes(b"<html><body>Access Denied</body></html>\n" * 30)
    bad = bad_counts(d)
    assert bad["unreadable_shard"] > 0 and "truncated_shard" not in bad


def test_should_train_one_copy_of_a_duplicate_key_and_count_the_others(tmp_path):
    """Shard keys a, b, a, c, c: the separated and the adjacent repeat are dropped, so a draw of the shard
    gives 3 samples (was 4: one trained twice, one merged into its previous copy)."""
    (tmp_path / "ds").mkdir()
    members = [(f"{k}.{ext}", data) for k, cap in [("a", "first a"), ("b", "b"), ("a", "second a"), ("c", "first c"),
                                                   ("c", "second c")]
               for ext, data in [("png", png()), ("txt", cap.encode())]]
    raw_tar(tmp_path / "ds" / "s-000000.tar", members)
    captions: Counter = Counter()

    def tok(caps: list[str]) -> torch.Tensor:
        captions.update(caps)
        return torch.zeros(len(caps), 4, dtype=torch.long)

    data = DataConfig(train=str(tmp_path / "ds"), num_workers=0, shuffle_buffer=0, rrc_scale=(0.9, 1.0))
    it = iter(build_train_loader(data, batch_size=3, image_size=16, tokenizer=tok, seed=0, rank=0, start_step=0))
    bad: Counter = Counter()
    for _ in range(4):  # one batch per draw of the shard
        bad.update(next(it).bad)
    # 2 repeats per draw; the 4th draw's second c comes after its batch was full, so the next batch counts it
    assert captions == {"first a": 4, "b": 4, "first c": 4} and bad == {"duplicate_key": 2 * 4 - 1}


def test_should_log_bad_samples_by_reason_in_every_metrics_record(tmp_path):
    (tmp_path / "ds").mkdir()
    for s in range(2):  # every shard holds one of each: so every draw adds to the counts
        samples = [(f"k{i}", good(i)) for i in range(10)]
        samples[3] = ("k3", {"png": b"\x89PNG broken", "txt": b"broken"})
        samples[5] = ("k5", {"png": png()})
        samples[7] = ("k1", good(1))  # a repeat of k1
        raw_tar(tmp_path / "ds" / f"s-{s:06d}.tar",
                [(f"{k}.{ext}", v if isinstance(v, bytes) else v.encode()) for k, f in samples for ext, v in f.items()])
    p = clipjob_train(str(tmp_path / "ds"), tmp_path / "run", 4)
    assert p.returncode == 0, p.stdout + p.stderr
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for before, r in zip([{"bad_samples_by_reason": {}}, *records], records):
        by_reason = r["bad_samples_by_reason"]
        assert sum(by_reason.values()) == r["bad_samples"]
        assert all(n >= before["bad_samples_by_reason"].get(k, 0) for k, n in by_reason.items())  # cumulative
    assert set(records[-1]["bad_samples_by_reason"]) == {"corrupt_image", "missing_caption", "duplicate_key"}
