"""Fault injection on real runs: `clipjob train` with 2 CPU workers (torchrun's elastic agent, gloo), a tiny
model, the run directory on the loopback S3 server. Each test breaks something mid-run and checks that the
run recovers (or stops with a clear error) and that every committed checkpoint still loads.

Runs are slowed by CLIPJOB_TEST_STEP_DELAY_S so the test can act mid-run; they print
`checkpoint: step N committed` and `step N: loss=...` lines that the tests wait for.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from trainrun import Run, free_port, make_shards, stop_line_step, train_argv

DELAY = {"CLIPJOB_TEST_STEP_DELAY_S": "0.3"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_shards(tmp_path_factory.mktemp("shards"), samples=192)


def launch(data: str, run: str, *overrides: str, restarts: int = 0, env: dict | None = None) -> Run:
    argv = train_argv(data, run, "train.keep_last=10", *overrides)
    argv += ["--nproc-per-node", "2", "--max-restarts", str(restarts), "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    return Run(argv, env)


def run_to_the_end(data: str, run: str, *overrides: str, env: dict) -> Run:
    """A run with one group restart allowed, waited for until it exits 0 (its output kept for the checks)."""
    r = launch(data, run, *overrides, restarts=1, env=env)
    try:
        assert r.wait(300) == 0, r.output
    finally:
        r.kill_all()
    return r


def sigterm_after(r: Run, pattern: str) -> int:
    """SIGTERM to the launched process once its output matches `pattern`; its exit code."""
    try:
        r.wait_for(pattern)
        r.proc.send_signal(signal.SIGTERM)
        return r.wait(120)
    finally:
        r.kill_all()


def committed(run: str) -> list[int]:
    from clipjob import checkpoint as ckpt

    return ckpt.committed_steps(run)


def assert_all_load(run: str) -> None:
    """Every committed step loads completely into the model of its stored config."""
    import yaml

    from clipjob.config import Config, from_dict
    from clipjob.model import build_model
    from clipjob import checkpoint as ckpt

    for step in committed(run):
        url = ckpt.step_url(run, step)
        cfg = from_dict(Config, yaml.safe_load(ckpt.load_config_yaml(url)))
        build_model(cfg.model, pretrained=False).load_state_dict(ckpt.load_weights(url))
        ts = ckpt.load_train_state(url)
        assert ts["step"] == step and ts["optimizer"]["state"], url


def metrics(run: str) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last record wins when a step was logged twice)."""
    from clipjob import fs

    return {r["step"]: r["loss"] for r in map(json.loads, fs.read_text(fs.join(run, "metrics.jsonl")).splitlines())}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    """Three shards of 16: each DataLoader worker draws some shard twice before the first step (its shuffle
    buffer takes 64 samples), so data.cache_mb serves replays from the start."""
    return make_shards(tmp_path_factory.mktemp("small"), samples=48, per_shard=16)


def ours(tmp: Path) -> list[str]:
    """What the agent (its torchrun log dir, workers' error files) and rank 0 (TensorBoard events of a remote
    run dir) left in a temp dir: nothing once the agent has exited."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(("clipjob-", "torchelastic_")))


def test_should_restart_the_group_and_continue_the_curve_when_a_worker_is_killed(small, s3_bucket, tmp_path):
    """(a) SIGKILL one worker mid-run: the agent restarts the group, which resumes from the newest committed
    step and reaches the last one; (e) the curve matches a run that was never interrupted. Production's shape:
    DataLoader workers on every rank, and the killed run keeps decoded shards in them (data.cache_mb), the
    straight one does not: up to the kill both must train on the same pictures, bit for bit. Neither leaves
    its scratch folders behind (a pod restarts many times in one /tmp)."""
    common = ("train.steps=12", "train.ckpt_every_steps=6", "data.num_workers=2")
    straight = f"{s3_bucket}/straight"
    (tmp_a := tmp_path / "tmp-straight").mkdir()
    r = launch(small, straight, *common, env={"TMPDIR": str(tmp_a)})
    try:
        assert r.wait(300) == 0, r.output
    finally:
        r.kill_all()
    assert ours(tmp_a) == [], ours(tmp_a)

    run = f"{s3_bucket}/killed"
    (tmp_b := tmp_path / "tmp-killed").mkdir()
    r = launch(small, run, *common, "data.cache_mb=16", restarts=1, env={**DELAY, "TMPDIR": str(tmp_b)})
    try:
        r.wait_for(r"checkpoint: step 6 committed")
        workers = r.children()
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        assert r.wait(300) == 0, r.output
    finally:
        r.kill_all()
    assert f"resumed from {run}/checkpoints/step-00000006 (step 6)" in r.output, r.output
    # the agent's log dir goes; a SIGKILLed rank 0 cannot remove its TensorBoard scratch, the restarted one does
    left = ours(tmp_b)
    assert [n for n in left if not n.startswith("clipjob-tb-")] == [] and len(left) <= 1, left
    assert committed(run) == committed(straight) == [6, 12]
    assert_all_load(run)
    a, b = metrics(straight), metrics(run)
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 7):  # identical up to the checkpoint (same data, same per-step RNG)
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)
    after = range(7, 13)  # the resumed data stream draws other samples: close, not equal
    assert sum(abs(a[s] - b[s]) for s in after) / len(after) < 0.35, (a, b)


def test_should_commit_the_current_step_when_sigterm_reaches_the_agent(data, s3_bucket):
    """(b) SIGTERM to the launcher (the agent: what the kubelet signals on preemption): both workers stop at
    the same step after a checkpoint of that step is committed."""
    run = f"{s3_bucket}/run"
    r = launch(data, run, "train.steps=12", "train.ckpt_every_steps=0", env=DELAY)
    rc = sigterm_after(r, r"^step 4: loss")
    k = stop_line_step(r.output)
    # interrupted, not finished: 128 + SIGTERM, which PyTorchJob's ExitCode policy retries (torchrun alone: 1)
    assert rc == 143 and "elastic agent: stopped by signal 15" in r.output and "Traceback" not in r.output, r.output
    logged = [int(m) for m in re.findall(r"^step (\d+): loss", r.output, re.M)]
    assert 4 <= k < 12 and max(logged) == k  # the checkpoint is at the step where training stopped
    assert committed(run) == [k]
    assert_all_load(run)


def test_should_resume_from_the_previous_commit_when_a_save_is_interrupted(data, s3_bucket):
    """(c) rank 0 dies after writing model.safetensors of step 4, before COMMITTED: the restarted group
    loads step 2 and finishes; the half-written step is written again in full."""
    from clipjob import fs
    from clipjob import checkpoint as ckpt

    run = f"{s3_bucket}/run"
    r = run_to_the_end(data, run, "train.steps=6", "train.ckpt_every_steps=2",
                       env={"CLIPJOB_TEST_CRASH_DURING_SAVE": "2"})
    assert "exiting during save 2" in r.output
    assert f"resumed from {run}/checkpoints/step-00000002 (step 2)" in r.output, r.output
    assert committed(run) == [2, 4, 6]
    assert "COMMITTED" in fs.ls(ckpt.step_url(run, 4))
    assert_all_load(run)


def test_should_finish_at_once_when_a_worker_aborts_in_teardown_after_the_final_commit(data, s3_bucket):
    """(f) rank 1 dies of SIGABRT while tearing down its process group, after the final step is committed (gloo's
    teardown did so once in this suite): the agent restarts the group, which finds the final step committed and
    exits 0 at once: no step trains twice, nothing is saved again."""
    run = f"{s3_bucket}/run"
    r = run_to_the_end(data, run, "train.steps=6", "train.ckpt_every_steps=3",
                       env={"CLIPJOB_TEST_ABORT_IN_TEARDOWN": "1"})
    assert "CLIPJOB_TEST_ABORT_IN_TEARDOWN: rank 1 aborts" in r.output, r.output
    assert f"resumed from {run}/checkpoints/step-00000006 (step 6)" in r.output, r.output
    logged = [int(m) for m in re.findall(r"^step (\d+): loss", r.output, re.M)]
    assert sorted(logged) == list(range(1, 7)), r.output  # each step once: the restart trained nothing
    assert "done: step 6, " in r.output.split("resumed from", 1)[1], r.output  # the restarted group's own end
    assert len(re.findall(r"checkpoint: step 6 committed", r.output)) == 1, r.output
    assert committed(run) == [3, 6]
    assert_all_load(run)


def test_should_continue_or_stop_cleanly_when_the_s3_server_restarts_mid_run(data, monkeypatch):
    """(d) the S3 server goes away while a checkpoint is due and comes back empty a few seconds later (moto
    keeps state in memory; the bucket is recreated): the save waits (storage.stall_timeout_s) and training
    finishes, or it stops with a one-line error naming the URL. Either way every committed checkpoint loads.
    (Outages that outlast the bound, and SIGTERM during one: tests/integration/test_outage.py.)"""
    from s3server import S3Server, apply_env

    server = S3Server().start()
    try:
        bucket = server.make_bucket("faults-restart")
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        apply_env({})  # drop s3fs clients bound to the session's server
        run = f"{bucket}/run"
        env = {**server.env(), "CLIPJOB_TEST_STEP_DELAY_S": "1"}
        r = launch(data, run, "train.steps=8", "train.ckpt_every_steps=2", "storage.stall_timeout_s=60", env=env)
        try:
            r.wait_for(r"checkpoint: step 2 committed")
            server.stop()  # (2 s of step delays before the next save is due)
            r.wait_for(r"^step 4: loss")  # the save of step 4 is now retrying against a dead endpoint
            time.sleep(2)
            server.start()
            server.make_bucket("faults-restart")
            rc = r.wait(300)
        finally:
            r.kill_all()
        apply_env({})
        if rc == 0:
            outage = r.time_of(r"checkpoint: step 4 committed") - r.time_of(r"^step 4: loss")
            assert outage >= 2, r.output  # the metrics flush + save of step 4 waited out the outage
            assert committed(run) == [4, 6, 8], r.output  # step 2 went down with the server's memory
        else:  # a clear one-line error naming the storage URL, not a hang
            assert re.search(r"^(\[rank0\]: )?error: s3://faults-restart/\S+: ", r.output, re.M), r.output
        assert_all_load(run)
    finally:
        server.stop()
        monkeypatch.undo()
        apply_env({})


def test_should_exit_143_when_a_lone_process_is_stopped_and_resume_to_the_end(data, tmp_path):
    """(e) one process, no agent (`clipjob train` in a single-GPU pod or `docker run`): SIGTERM commits the step
    and exits 128 + 15, so a restart policy treats it as interrupted, not done; the rerun finishes."""
    run = str(tmp_path / "run")
    r = Run(train_argv(data, run, "train.steps=10", "train.ckpt_every_steps=0"), DELAY)
    rc = sigterm_after(r, r"^step 3: loss")
    k = stop_line_step(r.output)
    assert rc == 143 and f"stopped by signal 15 at step {k} of 10" in r.output and "done:" not in r.output, r.output
    again = Run(train_argv(data, run, "train.steps=10", "train.ckpt_every_steps=0"))
    try:
        assert again.wait(120) == 0, again.output
    finally:
        again.kill_all()
    assert f"(step {k})" in again.output and "done: step 10" in again.output, again.output
