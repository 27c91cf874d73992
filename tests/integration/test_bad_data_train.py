"""`clipjob train` through bad data: with DDP, loader workers and every kind of bad sample and shard it trains
on; a mostly-bad dataset stops it with exit code 2 and one line; bad samples are logged by reason in every
metrics record. (Each kind skipped and counted by the loader in-process: tests/unit/test_bad_data.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TINY_MODEL
from shard_samples import bomb_png, good, png, raw_tar, write
from trainrun import free_port, sets

TINY = ["--preset", "tiny-cpu-scratch", *sets(*TINY_MODEL, "train.batch_size=8", "train.log_every=1",
                                              "train.warmup_steps=1", "data.num_workers=1", "data.shuffle_buffer=20",
                                              "train.precision=fp32", "train.ckpt_every_steps=0")]


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
    p = clipjob_train(d, tmp_path / "run", 6, "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
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
