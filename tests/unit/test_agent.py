"""agent.py: the exit code and line for a worker group that failed with no restart left (torch's own
ProcessFailure records, as the agent gets them), and the commit report read from a run dir."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from clipjob import agent
from clipjob import checkpoint as ckpt


@pytest.fixture
def failure(tmp_path):
    """ProcessFailure(rank, exitcode, message=None, at=seconds): a worker that failed, with its one-line error
    in the torchelastic error file when `message` is given (as clipjob's workers leave it)."""

    def make(rank: int, exitcode: int, message: str | None = None, at: float | None = None) -> ProcessFailure:
        path = tmp_path / f"error-{rank}.json"
        if message is not None:
            ts = str(int(at if at is not None else time.time()))
            path.write_text(json.dumps({"message": {"message": message, "extraInfo": {"timestamp": ts}}}))
        return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))

    return make


def test_should_exit_2_with_the_workers_line_when_any_worker_failed_permanently(failure):
    # the permanent error wins even when a peer's lost-connection failure was seen first
    failures = {1: failure(1, 203, "lost contact with another rank ...", at=100),
                0: failure(0, 2, "data.train: 400 of 1000 samples were bad", at=101)}
    assert agent.worker_failure(failures, 0) == (2, "data.train: 400 of 1000 samples were bad")


def test_should_pass_128_plus_signal_on_when_every_worker_stopped_on_a_signal(failure):
    code, line = agent.worker_failure({0: failure(0, 143), 1: failure(1, 143)}, 0)
    assert (code, line) == (143, "the workers stopped on signal 15")
    # rank 0 still exiting when the agent saw rank 1 stop: the agent SIGTERMed it; still a stop, not a failure
    assert agent.worker_failure({1: failure(1, 143), 0: failure(0, -15)}, 0) == (143, "the workers stopped on signal 15")
    assert agent.worker_failure({0: failure(0, -15), 1: failure(1, -15)}, 0)[0] == 203  # no worker stopped itself


def test_should_exit_203_naming_the_killed_rank_and_not_the_survivor_the_agent_stopped(failure):
    # the survivor (SIGTERMed by the agent, or exiting with its own line first) is not the cause
    failures = {0: failure(0, 203, "lost contact with another rank or the rendezvous store (...)", at=100),
                1: failure(1, -9), 2: failure(2, -15)}
    assert agent.worker_failure(failures, 3) == (203, "rank 1 was killed by SIGKILL and no restart is left "
                                                      "(--max-restarts 3)")


def test_should_exit_203_with_the_workers_line_when_a_worker_exited_retryable(failure):
    code, line = agent.worker_failure({0: failure(0, 203, "s3://b/run: storage did not answer for 300 s")}, 0)
    assert code == 203 and line == ("rank 0 failed (s3://b/run: storage did not answer for 300 s) and no restart "
                                    "is left (--max-restarts 0)")


def test_should_exit_1_when_a_worker_died_of_an_unexpected_error(failure):
    assert agent.worker_failure({0: failure(0, 1), 1: failure(1, -15)}, 0) == (1, "rank 0 exited 1")


def test_should_report_the_newest_committed_step_when_the_run_dir_has_commits(tmp_path):
    run = str(tmp_path / "run")
    assert agent.committed_summary(run) == f"no committed checkpoint in {run}"
    weights = {"w": torch.zeros(2)}
    for step in (2, 4):
        ckpt.save_checkpoint(run, step, weights, {"step": step}, "{}", {})
    assert agent.committed_summary(run) == f"newest committed checkpoint: step 4 ({ckpt.step_url(run, 4)})"
    assert agent.committed_summary(None) == "run dir unknown, commits not checked"


def test_should_give_up_reading_within_its_timeout_when_storage_does_not_answer(monkeypatch, tmp_path):
    monkeypatch.setattr(ckpt, "committed_steps", lambda run_dir: time.sleep(30))
    t0 = time.monotonic()
    line = agent.committed_summary(str(tmp_path), timeout_s=1)
    assert time.monotonic() - t0 < 5 and line == f"could not read {tmp_path} (no answer within 1 s)"
