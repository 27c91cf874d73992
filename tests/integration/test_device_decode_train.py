"""`clipjob train` with data.decode=gpu (on the CPU here): a DataLoader worker ships JPEG bytes and crop boxes,
the trainer decodes them; the run finishes and logs its samples. (The decode path itself:
tests/unit/test_device_decode.py.)"""

from __future__ import annotations

import json
import subprocess

from shard_samples import jpeg, write
from trainrun import train_argv


def test_should_train_with_decode_gpu_on_jpeg_shards(tmp_path):
    d = write(tmp_path / "ds", [{"jpg": jpeg(i), "txt": f"a picture {i}"} for i in range(48)])
    p = subprocess.run(train_argv(d, str(tmp_path / "run"), "train.steps=3", "data.num_workers=1", "data.decode=gpu",
                                  "train.ckpt_every_steps=0"), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "decode: gpu" in (tmp_path / "run" / "config.yaml").read_text()
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "samples_seen" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and steps[-1]["samples_seen"] == 24
    assert steps[-1]["bad_samples"] == 0
