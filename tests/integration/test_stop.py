"""SIGTERM in the shape a GPU pod runs: the elastic agent, 2 ranks, DataLoader workers per rank, shards and run
dir on the loopback S3 server. Each test stops a real `clipjob train` and checks that the stop step is
committed by every rank, the exit code is 143 (retried by the chart's `restartPolicy: ExitCode`), and the
agent's last line states the step it found committed in the run dir.

torchrun stops a rank with `killpg(rank, SIGTERM)`, which used to kill the rank's DataLoader workers too: the
rank then died with "DataLoader worker (pid N) is killed by signal: Terminated" and committed nothing.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from test_faults import assert_all_load, committed
from trainrun import Run, free_port, make_shards, stop_line_step, train_argv

DELAY = {"CLIPJOB_TEST_STEP_DELAY_S": "0.3"}


@pytest.fixture(scope="module")
def shards(s3_server, tmp_path_factory) -> str:
    url = s3_server.make_bucket(f"stop-shards-{os.getpid()}")
    return make_shards(f"{url}/train", samples=128, per_shard=32)


def agent(data: str, run: str, *overrides: str, flags: tuple[str, ...] = (), env: dict | None = None) -> Run:
    argv = train_argv(data, run, "train.steps=40", "train.ckpt_every_steps=0", *overrides)
    argv += ["--nproc-per-node", "2", "--max-restarts", "0", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *flags]
    return Run(argv, {**DELAY, **(env or {})})


def stopped_step(r: Run) -> int:
    """The step every rank stopped at (each prints its own line); fails unless both ranks did."""
    steps = {int(k) for k in re.findall(r"^stopped by signal 15 at step (\d+) of", r.output, re.M)}
    assert len(re.findall(r"^stopped by signal 15 at step", r.output, re.M)) == 2 and len(steps) == 1, r.output
    return steps.pop()


def assert_clean(output: str) -> None:
    assert "Traceback" not in output and "killed by signal" not in output, output


def test_should_commit_the_stop_step_on_every_rank_when_the_agent_gets_sigterm_with_loader_workers(shards, s3_bucket):
    run = f"{s3_bucket}/run"
    r = agent(shards, run, "data.num_workers=2")
    try:
        r.wait_for(r"^step 3: loss")
        r.proc.send_signal(signal.SIGTERM)
        rc = r.wait(120)
    finally:
        r.kill_all()
    k = stopped_step(r)
    assert rc == 143, r.output
    assert stop_line_step(r.output) == k, r.output
    assert committed(run) == [k]
    # the agent's line is what it read from the run dir, not a guess
    assert re.search(rf"^elastic agent: stopped by signal 15; newest committed checkpoint: step {k} "
                     rf"\({re.escape(run)}/checkpoints/step-{k:08d}\); exit 143", r.output, re.M), r.output
    assert_clean(r.output)
    assert_all_load(run)


def test_should_commit_and_exit_143_when_a_lone_process_group_with_loader_workers_gets_sigterm(shards, tmp_path):
    """No agent (`docker run`, a single-GPU pod): SIGTERM to the whole process group, as a shell or an init
    process forwarding to the group sends it, reaches the trainer but not its DataLoader workers."""
    run = str(tmp_path / "run")
    r = Run(train_argv(shards, run, "train.steps=40", "train.ckpt_every_steps=0", "data.num_workers=1"), DELAY)
    try:
        r.wait_for(r"^step 3: loss")
        os.killpg(r.proc.pid, signal.SIGTERM)
        rc = r.wait(120)
    finally:
        r.kill_all()
    k = int(re.search(r"^stopped by signal 15 at step (\d+) of 40", r.output, re.M)[1])
    assert rc == 143 and committed(run) == [k], r.output
    assert_clean(r.output)


def test_should_commit_a_save_slower_than_torchruns_30_s_inside_the_configured_window(shards, s3_bucket):
    """Rank 0's save takes 35 s (more than torchrun's default 30 s before SIGKILL); with --shutdown-timeout 60
    (what the chart derives from terminationGracePeriodSeconds) the step is committed and the agent exits 143
    before the window closes."""
    run = f"{s3_bucket}/run"
    r = agent(shards, run, "data.num_workers=1", flags=("--shutdown-timeout", "60"),
              env={"CLIPJOB_TEST_SAVE_DELAY_S": "35"})
    try:
        r.wait_for(r"^step 2: loss")
        r.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rc = r.wait(120)
        took = time.monotonic() - sent
    finally:
        r.kill_all()
    k = stopped_step(r)
    assert rc == 143 and committed(run) == [k], r.output
    assert 35 <= took < 60, (took, r.output)
    save = re.search(rf"^checkpoint: step {k} committed in (\d+\.\d)s", r.output, re.M)
    assert save and float(save[1]) >= 35, r.output  # the stretched save is the one that was committed
    assert "forcefully exiting" not in r.output, r.output  # torchrun never had to SIGKILL a worker
    assert_clean(r.output)


def test_should_train_on_during_a_background_save_and_commit_the_stop_step_after_it_when_sigterm_comes(
        shards, s3_bucket):
    """train.ckpt_async (the default): rank 0's save of step 2 takes 4 s in the background while both ranks go
    on; SIGTERM then comes with it in flight: the stop waits for it, then commits the stop step, exit 143."""
    run = f"{s3_bucket}/run"
    r = agent(shards, run, "data.num_workers=1", "train.ckpt_every_steps=2", env={"CLIPJOB_TEST_SAVE_DELAY_S": "4"})
    try:
        r.wait_for(r"^step 3: loss")
        assert "checkpoint: step 2 committed" not in r.output, r.output  # the ranks did not wait for the write
        r.proc.send_signal(signal.SIGTERM)
        rc = r.wait(120)
    finally:
        r.kill_all()
    k = stopped_step(r)
    assert rc == 143 and k > 2 and committed(run) == [2, k], r.output
    assert re.search(r"^checkpoint: step 2 committed in \d+\.\ds in the background; training waited", r.output, re.M)
    assert r.output.index("checkpoint: step 2 committed") < r.output.index(f"checkpoint: step {k} committed")
    assert stop_line_step(r.output) == k, r.output
    assert_clean(r.output)
    assert_all_load(run)
