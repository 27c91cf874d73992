"""Data on object storage, against the loopback S3 server: build from a CSV into a bucket, train from it with
the real CLI, read mixed s3:// + local sources in DataLoader workers, and bad/missing objects."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipjob import fs
from clipjob.config import DataConfig
from clipjob.data.pipeline import build_train_loader
from clipjob.datasets.build import BuildOptions, build_shards
from clipjob.datasets.inspect import inspect_shards
from clipjob.datasets.writer import ShardWriter
from clipjob.errors import ClipjobError
from conftest import TINY_MODEL
from trainrun import sets


def png(seed: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed % 256, (seed * 7) % 256, 128)).save(buf, "PNG")
    return buf.getvalue()


def tokenize(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[ord(c[0])] for c in captions])


def write(out: str, n: int, tag: str, per_shard: int = 8) -> str:
    with ShardWriter(out, prefix="s", max_samples=per_shard) as w:
        for i in range(n):
            w.write(f"{i:06d}", {"png": png(i), "txt": f"{tag} {i}"})
    return out


@pytest.fixture
def csv_dataset(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    lines = ["image,caption"]
    for i in range(40):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(i, size=48 + i))
        lines.append(f"img/{i}.png,a square of colour {i}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "train.csv"


def test_should_build_from_a_csv_into_a_bucket_and_train_from_it_with_the_cli(s3_server, s3_bucket, csv_dataset,
                                                                                tmp_path):
    env = {**os.environ, **s3_server.env()}
    out = f"{s3_bucket}/datasets/squares"
    p = subprocess.run([sys.executable, "-m", "clipjob", "data", "build", str(csv_dataset), "--out", out,
                        "--samples-per-shard", "10", "--workers", "2", "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["samples"] == 40
    assert "testing" not in p.stdout + p.stderr  # credentials are never printed
    m = json.loads(fs.read_text(f"{out}/manifest.json"))
    assert [s["name"] for s in m["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)] and m["total_samples"] == 40
    assert inspect_shards(out, verify=True)["good"] == 40

    run = f"{s3_bucket}/runs/r1"
    tiny = [*TINY_MODEL, "train.batch_size=8", "train.log_every=1", "data.num_workers=1", "train.steps=3",
            "train.precision=fp32", f"data.train={out}"]
    p = subprocess.run([sys.executable, "-m", "clipjob", "train", "--preset", "tiny-cpu-scratch", "--run-dir", run,
                        *sets(*tiny)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    steps = [json.loads(line)["step"] for line in fs.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3]


def test_should_mix_s3_and_local_sources_by_weight_in_workers(s3_bucket, tmp_path):
    remote = write(f"{s3_bucket}/a", 32, "a")
    local = write(str(tmp_path / "b"), 32, "b")
    data = DataConfig(train=f"{remote}@0.5::{local}@0.5", num_workers=2, shuffle_buffer=16, rrc_scale=(0.9, 1.0))
    it = iter(build_train_loader(data, batch_size=8, image_size=16, tokenizer=tokenize, seed=1, rank=0, start_step=0))
    tags: Counter = Counter()
    for _ in range(16):
        b = next(it)
        assert b.images.shape == (8, 3, 16, 16) and not b.bad
        tags.update(chr(int(t)) for t in b.tokens[:, 0])
    assert tags["a"] > 20 and tags["b"] > 20


def test_should_count_a_missing_object_and_keep_reading_the_others(s3_bucket):
    d = write(f"{s3_bucket}/ds", 24, "a")
    fs.rm(f"{d}/s-000001.tar")
    fs.write_bytes(f"{d}/s-000002.tar", b"")
    r = inspect_shards(d)
    assert r["bad"] == {"missing_shard": 1, "empty_shard": 1} and r["good"] == 8
    assert r["manifest_mismatch"] == [{"shard": f"{d}/s-000001.tar", "manifest": 8, "found": 0},
                                      {"shard": f"{d}/s-000002.tar", "manifest": 8, "found": 0}]


def test_should_fail_with_one_line_naming_the_url_when_the_bucket_does_not_exist(s3_server, csv_dataset):
    with pytest.raises(ClipjobError) as e:
        build_train_loader(DataConfig(train="s3://no-such-bucket-q9/ds", num_workers=0, shuffle_buffer=0),
                           batch_size=8, image_size=16, tokenizer=tokenize, seed=0, rank=0, start_step=0)
    assert str(e.value) == "s3://no-such-bucket-q9/ds: bucket does not exist (check the URL and AWS_ENDPOINT_URL_S3)"
    with pytest.raises(ClipjobError, match="^s3://no-such-bucket-q9/{0..3}.tar: bucket does not exist"):
        build_train_loader(DataConfig(train="s3://no-such-bucket-q9/{0..3}.tar", num_workers=0, shuffle_buffer=0),
                           batch_size=8, image_size=16, tokenizer=tokenize, seed=0, rank=0, start_step=0)
    with pytest.raises(ClipjobError, match="bucket does not exist"):
        build_shards(str(csv_dataset), BuildOptions(out="s3://no-such-bucket-q9/out", progress=False))
