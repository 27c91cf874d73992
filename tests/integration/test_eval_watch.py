"""`clipjob eval zeroshot` and `clipjob ckpt info` on runs as the eval Job meets them (issue 12, items 8-9):
a newest step that does not load, a watcher that must end after the run's final step, a run dir that does
not exist, SIGTERM. The run is made in-process in a second (a tiny model saved by save_checkpoint, as the
trainer saves it); every command runs as a subprocess, as a user or the Job runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipjob.config import to_yaml
from clipjob.model import build_model
from clipjob import checkpoint as ckpt
from conftest import tiny_config
from trainrun import Run


def clipjob(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipjob", *args], capture_output=True, text=True, timeout=timeout)


def save_step(run: str, step: int) -> str:
    cfg = tiny_config("train.steps=4", f"storage.run_dir={run}")
    torch.manual_seed(step)
    model = build_model(cfg.model, pretrained=False)
    return ckpt.save_checkpoint(run, step, model.state_dict(), {"step": step}, to_yaml(cfg), {})


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor: safetensors still parses it
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("eval")
    for c, color in (("red", (220, 30, 30)), ("blue", (40, 60, 220))):
        (root / c).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 20), color).save(root / c / f"{i}.png")
    return f"folder:{root}"


def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------
# item 8: readers of a run dir take the newest committed step that loads


def test_should_describe_the_newest_step_that_loads_when_ckpt_info_meets_a_corrupt_newest_step(tmp_path):
    run = str(tmp_path / "run")
    for s in (2, 4):
        save_step(run, s)
    flip_last_byte(Path(ckpt.step_url(run, 4)) / "model.safetensors")
    p = clipjob("ckpt", "info", run)
    assert p.returncode == 0, p.stderr
    assert f"checkpoint: {ckpt.step_url(run, 2)}" in p.stdout and "step: 2" in p.stdout
    (warning,) = p.stderr.strip().splitlines()
    assert warning.startswith("warning: skipping checkpoint step 4, it does not load: ")
    assert f"{ckpt.step_url(run, 4)}/model.safetensors: crc32" in warning


def test_should_evaluate_the_newest_step_that_loads_when_the_newest_is_corrupt(tmp_path, images):
    run = str(tmp_path / "run")
    for s in (2, 4):
        save_step(run, s)
    os.truncate(Path(ckpt.step_url(run, 4)) / "model.safetensors", 100)
    out = tmp_path / "r.json"
    p = clipjob("eval", "zeroshot", "--checkpoint", run, "--data", images, "--workers", "0", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert json.loads(out.read_text())[0]["step"] == 2
    (warning,) = p.stderr.strip().splitlines()
    assert warning.startswith("warning: skipping checkpoint step 4") and "100 bytes, but" in warning

    os.truncate(Path(ckpt.step_url(run, 2)) / "model.safetensors", 100)
    line = one_error_line(clipjob("eval", "zeroshot", "--checkpoint", run, "--data", images, "--workers", "0"))
    assert line == f"error: {run}: none of the committed checkpoints (steps 2, 4) loads (see the warnings above)"


# ---------------------------------------------------------------------------------------------------------
# item 9: the watcher


def results(run: str) -> list[dict]:
    path = Path(run) / "eval" / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_should_exit_0_after_the_final_step_is_evaluated_when_watching(tmp_path, images):
    run = str(tmp_path / "run")  # the watcher starts before training wrote anything (the Job beside the run)
    argv = [sys.executable, "-m", "clipjob", "eval", "zeroshot", "--watch", run, "--data", images, "--workers", "0",
            "--poll-seconds", "0.5", "--wait-for-run", "60"]
    watcher = Run(argv)
    try:
        watcher.wait_for(f"for the run at {run} to appear", timeout=60)
        save_step(run, 2)
        watcher.wait_for("top1=", timeout=60)
        time.sleep(1.5)  # a few more polls: step 2 of train.steps=4 is not the end
        assert [r["step"] for r in results(run)] == [2] and watcher.proc.poll() is None, watcher.output
        save_step(run, 4)  # the final step
        rc = watcher.wait(60)
    finally:
        watcher.kill_all()
    assert rc == 0, watcher.output
    assert [r["step"] for r in results(run)] == [2, 4]
    assert "step 4 is the run's final step (train.steps=4) and is evaluated: done" in watcher.output
    assert watcher.lines[-1] == "evaluated 2 checkpoint(s)"

    p = clipjob("eval", "zeroshot", "--watch", run, "--data", images, "--workers", "0")  # a restarted Job pod
    assert p.returncode == 0 and p.stdout.strip().endswith("evaluated 0 checkpoint(s)"), p.stdout + p.stderr
    assert len(results(run)) == 2


def test_should_skip_a_step_that_does_not_load_and_still_finish_when_watching(tmp_path, images):
    run = str(tmp_path / "run")
    for s in (2, 4):
        save_step(run, s)
    flip_last_byte(Path(ckpt.step_url(run, 2)) / "model.safetensors")
    p = clipjob("eval", "zeroshot", "--watch", run, "--data", images, "--workers", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [r["step"] for r in results(run)] == [4]
    (warning,) = p.stderr.strip().splitlines()
    assert warning.startswith("warning: skipping checkpoint step 2, it does not load: ") and "crc32" in warning


def test_should_fail_in_one_line_when_the_final_step_does_not_load_when_watching(tmp_path, images):
    run = str(tmp_path / "run")
    for s in (2, 4):
        save_step(run, s)
    flip_last_byte(Path(ckpt.step_url(run, 4)) / "model.safetensors")
    line = one_error_line(clipjob("eval", "zeroshot", "--watch", run, "--data", images, "--workers", "0"))
    assert line.startswith("error: step 4 is the run's final step (train.steps=4) and it does not load: ")
    assert f"{ckpt.step_url(run, 4)}/model.safetensors: crc32" in line
    assert [r["step"] for r in results(run)] == [2]


def test_should_fail_in_one_line_when_the_watched_run_dir_does_not_exist(tmp_path, images):
    line = one_error_line(clipjob("eval", "zeroshot", "--watch", str(tmp_path / "nope"), "--data", images))
    assert line == (f"error: {tmp_path / 'nope'}: no run there (no config.yaml or checkpoints/): check the URL, "
                    f"or start the watcher once training has started")
    p = clipjob("eval", "zeroshot", "--watch", str(tmp_path / "nope"), "--data", images, "--wait-for-run", "1",
                "--poll-seconds", "0.4")
    assert one_error_line(p) == line.replace("has started", "has started (waited 1 s)")
    assert p.stdout.count("to appear") >= 2


def test_should_fail_in_one_line_when_the_watched_bucket_or_prefix_does_not_exist(s3_bucket, images):
    line = one_error_line(clipjob("eval", "zeroshot", "--watch", "s3://no-such-bucket-x1/runs/a", "--data", images))
    assert line.startswith("error: s3://no-such-bucket-x1/runs/a: bucket does not exist")
    line = one_error_line(clipjob("eval", "zeroshot", "--watch", f"{s3_bucket}/runs/typo", "--data", images))
    assert line.startswith(f"error: {s3_bucket}/runs/typo: no run there")


def test_should_watch_a_run_on_s3_until_its_final_step(s3_bucket, images):
    run = f"{s3_bucket}/runs/a"
    for s in (2, 4):
        save_step(run, s)
    p = clipjob("eval", "zeroshot", "--watch", run, "--data", images, "--workers", "0")
    assert p.returncode == 0 and "step 4 is the run's final step" in p.stdout, p.stdout + p.stderr


def test_should_exit_143_when_sigterm_arrives_while_watching(tmp_path, images):
    run = str(tmp_path / "run")
    save_step(run, 2)
    argv = [sys.executable, "-m", "clipjob", "eval", "zeroshot", "--watch", run, "--data", images, "--workers", "1",
            "--poll-seconds", "300"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not results(run) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert results(run), "step 2 was not evaluated"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        stopped_in = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 143, out + err
    assert stopped_in < 15  # the flag is checked every 0.5 s while sleeping (300 s here); the rest is exiting
    assert out.strip().splitlines()[-1] == ("stopped by signal 15 while waiting for the next checkpoint; nothing "
                                            "partial written; exit 143")
    assert len(results(run)) == 1


def test_should_abandon_the_evaluation_and_write_nothing_when_sigterm_arrives_mid_evaluation(tmp_path, images,
                                                                                             monkeypatch):
    from clipjob.eval import runner, zeroshot
    from clipjob.train.trainer import StopFlag

    run = str(tmp_path / "run")
    for s in (2, 4):
        save_step(run, s)
    real, calls = zeroshot.accuracy, []

    def accuracy_then_sigterm(*a, **k):  # the signal lands while the first batch of step 2 is scored
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(zeroshot, "accuracy", accuracy_then_sigterm)
    with StopFlag() as stop, pytest.raises(runner.EvalStopped) as e:
        runner.watch(run, [images], workers=0, batch_size=1, stop=stop)
    assert e.value.signum == signal.SIGTERM and len(calls) == 1  # abandoned at the next batch, not at the end
    assert f"while evaluating {ckpt.step_url(run, 2)} (abandoned)" in str(e.value)
    assert results(run) == []
