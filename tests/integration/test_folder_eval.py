"""`clipjob eval zeroshot --data folder:DIR` on a folder holding files that do not decode, as a user and the
eval Job run it (the CLI, DataLoader workers): they are skipped and counted by reason in the printed line and
in the results (--out, and RUN/eval/results.jsonl with --watch); a folder of bad files alone is a one-line
error. The checkpoint is a tiny model saved in-process by save_checkpoint, as the trainer saves it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from shard_samples import bad_image_files, jpeg

from clipjob import checkpoint as ckpt
from clipjob.config import to_yaml
from clipjob.model import build_model
from conftest import tiny_config


def clipjob(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipjob", *args], capture_output=True, text=True, timeout=timeout)


def save_final_step(run: str, step: int = 4) -> str:
    cfg = tiny_config(f"train.steps={step}", f"storage.run_dir={run}")  # the default tiny preset
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False)
    return ckpt.save_checkpoint(run, step, model.state_dict(), {"step": step}, to_yaml(cfg), {})


def image_folder(root: Path, with_bad: bool) -> str:
    """3 classes x 3 good JPEGs; `with_bad`: every kind of bad file of bad_image_files() in the middle class."""
    for c, cls in enumerate(("blue", "green", "red")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.jpg").write_bytes(jpeg(3 * c + i))
    for name, (data, _) in (bad_image_files().items() if with_bad else ()):
        (root / "green" / f"x_{name}").write_bytes(data)
    return f"folder:{root}"


def test_should_count_bad_files_by_reason_in_the_line_and_the_results_when_evaluating_a_folder(tmp_path):
    run = str(tmp_path / "run")
    save_final_step(run)
    dirty, clean = image_folder(tmp_path / "dirty", True), image_folder(tmp_path / "clean", False)
    out = tmp_path / "clean.json"
    p = clipjob("eval", "zeroshot", "--checkpoint", run, "--data", clean, "--workers", "1", "--out", str(out))
    assert p.returncode == 0, p.stderr
    (want,) = json.loads(out.read_text())

    p = clipjob("eval", "zeroshot", "--watch", run, "--data", dirty, "--workers", "2", "--batch-size", "2")
    assert p.returncode == 0, p.stderr
    (r,) = [json.loads(line) for line in (Path(run) / "eval" / "results.jsonl").read_text().splitlines()]
    assert r["bad_samples_by_reason"] == {"corrupt_image": 3, "image_too_large": 1} and r["bad_samples"] == 4
    assert (r["images"], r["top1"], r["top5"]) == (9, want["top1"], want["top5"]) and want["bad_samples"] == 0
    line = next(x for x in p.stdout.splitlines() if x.startswith(f"{dirty}: top-1 "))
    assert "9 images" in line and line.endswith("; skipped: corrupt_image 3, image_too_large 1")
    assert "Traceback" not in p.stderr


def test_should_exit_2_with_one_line_when_every_file_of_a_folder_is_bad(tmp_path):
    run = str(tmp_path / "run")
    save_final_step(run)
    root = tmp_path / "bad"
    for cls, (name, (data, _)) in zip(("a", "a", "b", "b"), bad_image_files().items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / name).write_bytes(data)
    p = clipjob("eval", "zeroshot", "--checkpoint", run, "--data", f"folder:{root}", "--workers", "1")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [f"error: folder:{root}: no image could be evaluated, all 4 skipped "
                                             "(corrupt_image 3, image_too_large 1): check the files"]
