"""The real CLI in subprocesses, as a user runs it: build data, train, get killed, resume, evaluate, report."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainrun import RUN_MODEL, sets

TINY = sets(*RUN_MODEL, "train.batch_size=16", "train.log_every=1", "train.warmup_steps=2", "data.num_workers=1",
            "data.shuffle_buffer=50", "train.precision=fp32")


def clipjob(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipjob", *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="session")
def emoji_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emoji")
    p = clipjob("data", "emoji", "--out", str(out))
    assert p.returncode == 0, p.stderr
    return out


def committed(run: Path) -> list[int]:
    ck = run / "checkpoints"
    return sorted(int(d.name[5:]) for d in ck.glob("step-*") if (d / "COMMITTED").exists()) if ck.exists() else []


def test_should_resume_from_the_committed_step_when_training_is_killed(tmp_path, emoji_dir):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny-cpu-scratch", "--set", f"data.train={emoji_dir}", "--run-dir", str(run),
            "--set", "train.steps=8", "--set", "train.ckpt_every_steps=2", "--set", "train.keep_last=10", *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "clipjob", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not committed(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = committed(run)
    assert first and first[-1] < 8, f"expected a partial run, got {first}"
    assert (run / "config.yaml").exists()

    p = clipjob(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"resumed from {run}/checkpoints/step-{first[-1]:08d} (step {first[-1]})" in p.stdout
    assert committed(run)[-1] == 8
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 8 and set(range(first[-1] + 1, 9)) <= set(steps)

    out = tmp_path / "eval.json"
    p = clipjob("eval", "zeroshot", "--checkpoint", str(run), "--data", f"emoji-heldout:{emoji_dir}",
                "--out", str(out), "--workers", "0")
    assert p.returncode == 0, p.stderr
    assert "top1={'zero_shot_image_logits': " in p.stdout
    r = json.loads(out.read_text())[0]
    assert r["step"] == 8 and r["classes"] == len(json.loads((emoji_dir / "heldout_concepts.json").read_text()))
    assert 0 <= r["top1"] <= r["top5"] <= 100 and r["chance_top1"] == pytest.approx(100 / r["classes"])

    p = clipjob("eval", "zeroshot", "--watch", str(run), "--max-polls", "1", "--data", f"emoji-heldout:{emoji_dir}",
                "--workers", "0")
    assert p.returncode == 0, p.stderr
    results = [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in results) == committed(run)
    p = clipjob("eval", "zeroshot", "--watch", str(run), "--max-polls", "1", "--data", f"emoji-heldout:{emoji_dir}")
    assert "evaluated 0 checkpoint(s)" in p.stdout  # each checkpoint is evaluated exactly once

    p = clipjob("report", str(run))
    assert p.returncode == 0, p.stderr
    png = run / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_should_fail_with_one_line_when_the_checkpoint_does_not_exist(tmp_path):
    p = clipjob("eval", "zeroshot", "--checkpoint", str(tmp_path / "nope"), "--data", "folder:/x")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "no committed checkpoint" in p.stderr


def test_should_fail_with_one_line_when_the_training_data_is_missing(tmp_path):
    p = clipjob("train", "--preset", "tiny-cpu-scratch", "--run-dir", str(tmp_path / "r"),
                "--set", f"data.train={tmp_path / 'nodata'}")
    assert p.returncode == 2
    assert "manifest.json" in p.stderr and p.stderr.strip().count("\n") == 0


def test_should_print_the_version_and_stop_quietly_when_the_reader_of_its_output_is_gone():
    from clipjob import __version__

    v = clipjob("--version")
    assert v.returncode == 0 and v.stdout == f"clipjob {__version__}\n", v
    # `clipjob config show --docs | head -1`: the reader closed the pipe before clipjob wrote (here: at once)
    p = subprocess.Popen([sys.executable, "-m", "clipjob", "config", "show", "--docs"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and err == "", (p.returncode, err)


def test_should_keep_the_runs_record_when_a_resume_asks_for_a_model_its_checkpoints_do_not_fit(tmp_path, emoji_dir):
    """A restart with another model (a changed preset, a wrong --run-dir) fails in one line per checkpoint and
    leaves the run dir as it was: its config.yaml (what `clipjob status` and `eval --watch` read) still says what
    the checkpoints hold."""
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny-cpu-scratch", "--set", f"data.train={emoji_dir}", "--run-dir", str(run),
            "--set", "train.ckpt_every_steps=2", *TINY]
    p = clipjob(*args, "--set", "train.steps=2")
    assert p.returncode == 0 and committed(run) == [2], p.stdout + p.stderr
    stored = (run / "config.yaml").read_text()
    p = clipjob(*args, "--set", "train.steps=4", "--set", "model.embed_dim=8")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert lines[-1] == f"error: {run}: none of the committed checkpoints (steps 2) loads (see the warnings above)"
    assert lines[0].startswith("warning: skipping checkpoint step 2, it does not load: ") and "does not fit" in lines[0]
    assert (run / "config.yaml").read_text() == stored and committed(run) == [2]
