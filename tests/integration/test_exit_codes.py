"""One test per row of the failure table in docs/distributed.md ("Failures and exit codes"): a real `clipjob
train` (elastic agent, gloo workers, a tiny model) meets the failure, and its exit code is the one the
chart's `restartPolicy: ExitCode` needs (203 or 128 + signal: retried; 2: permanent, not retried), with one
line saying why and no traceback. SIGTERM to the agent (143) is in test_stop.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_faults import committed
from trainrun import Run, free_port, make_shards, stop_line_step, train_argv

REPO = Path(__file__).resolve().parents[2]
DELAY = {"CLIPJOB_TEST_STEP_DELAY_S": "0.3"}
COMMON = ("train.steps=40", "train.ckpt_every_steps=2", "train.keep_last=10")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_shards(tmp_path_factory.mktemp("shards"), samples=128, per_shard=32)


def agent(data: str, run: str, *overrides: str, nnodes: str = "1", nproc: str = "2", endpoint: str = "",
          restarts: int = 0, env: dict | None = None) -> Run:
    argv = train_argv(data, run, *COMMON, *overrides)
    argv += ["--nnodes", nnodes, "--nproc-per-node", nproc, "--max-restarts", str(restarts),
             "--rdzv-endpoint", endpoint or f"127.0.0.1:{free_port()}"]
    return Run(argv, {**DELAY, **(env or {})})


def finish(r: Run, timeout: float = 120) -> int:
    try:
        return r.wait(timeout)
    finally:
        r.kill_all()


def last_line(r: Run) -> str:
    return r.lines[-1] if r.lines else ""


def test_should_exit_203_with_one_line_when_the_rendezvous_times_out(data, tmp_path):
    """--nnodes 2 and the second node never comes (its pod pending, its node gone): torchrun's
    RendezvousTimeoutError -> retryable."""
    r = agent(data, str(tmp_path / "run"), nnodes="2", env={"PET_RDZV_CONF": "join_timeout=5"})
    rc = finish(r)
    assert rc == 203, r.output
    assert re.fullmatch(r"elastic agent: rendezvous at 127\.0\.0\.1:\d+ \(id clipjob\) timed out before 2 node\(s\) "
                        r"joined; no committed checkpoint in \S+; exit 203 \(retryable: .*\)", last_line(r)), r.output
    assert "Traceback" not in r.output


def test_should_exit_203_when_a_worker_is_killed_and_no_restart_is_left(data, tmp_path):
    """The OOM killer takes a worker (SIGKILL) with --max-restarts 0: retryable, and the line names the rank,
    the signal and the step a restart resumes from."""
    run = str(tmp_path / "run")
    r = agent(data, run)
    r.wait_for(r"checkpoint: step 2 committed")
    os.kill(r.children()[-1], signal.SIGKILL)
    rc = finish(r)
    k = max(committed(run))
    assert rc == 203, r.output
    assert re.fullmatch(rf"elastic agent: rank [01] was killed by SIGKILL and no restart is left \(--max-restarts 0\); "
                        rf"newest committed checkpoint: step {k} \(\S+step-{k:08d}\); exit 203 \(retryable: .*\)",
                        last_line(r)), r.output
    assert "Traceback" not in r.output


def test_should_exit_2_with_the_workers_line_when_the_workers_find_a_bad_value(data, tmp_path):
    """A config value only the workers can check (train.init_from names no file): permanent -> 2, and the
    agent's last line is the workers' own one-line error."""
    r = agent(data, str(tmp_path / "run"), "train.init_from=/nonexistent/weights.safetensors")
    rc = finish(r)
    assert rc == 2, r.output
    worker_line = re.search(r"^error: /nonexistent/weights\.safetensors: .+$", r.output, re.M)
    assert worker_line and last_line(r) == worker_line[0], r.output  # repeated by the agent as its last line
    # both ranks print it to the one pipe: each line whole (CI once saw "...not founderror: ...not found")
    assert all(line.count("error: ") == 1 for line in r.output.splitlines() if "error: " in line), r.output
    assert "Traceback" not in r.output


def test_should_exit_2_before_any_worker_starts_when_a_value_is_bad(data, tmp_path):
    proc = subprocess.run(train_argv(data, str(tmp_path / "run"), "train.steps=-1") + ["--nproc-per-node", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: train.steps") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "starting elastic agent" not in proc.stdout


def test_should_exit_143_when_the_workers_are_stopped_by_sigterm_without_the_agent(data, tmp_path):
    """SIGTERM reaches the workers but not the agent (a node drain script, `kill` of the trainers): they commit
    their step and exit 143; the agent passes 143 on, so the stop is retried and the restart resumes."""
    run = str(tmp_path / "run")
    r = agent(data, run, "train.ckpt_every_steps=0")
    r.wait_for(r"^step 3: loss")
    for pid in r.children():
        os.kill(pid, signal.SIGTERM)
    rc = finish(r)
    k = stop_line_step(r.output)
    assert rc == 143 and committed(run) == [k], r.output
    assert last_line(r).startswith(f"elastic agent: the workers stopped on signal 15; newest committed checkpoint: "
                                   f"step {k} "), r.output
    assert "Traceback" not in r.output


def test_should_exit_203_when_a_peer_node_and_then_the_rendezvous_store_are_lost(data, tmp_path):
    """Two agents on loopback (--nnodes 2); the one hosting the c10d store is SIGKILLed with its worker. The
    survivor's worker loses its gloo peer (one line, exit 203, no traceback); its agent cannot rendezvous
    again without the store and exits 203, so the operator restarts the pod and the run resumes."""
    run, endpoint = str(tmp_path / "run"), f"127.0.0.1:{free_port()}"
    host = agent(data, run, nnodes="2", nproc="1", endpoint=endpoint, env={"PET_RDZV_CONF": "join_timeout=60,is_host=1"})
    other = agent(data, run, nnodes="2", nproc="1", endpoint=endpoint, restarts=1,
                  env={"PET_RDZV_CONF": "join_timeout=60,is_host=0"})
    try:
        deadline = time.monotonic() + 120
        while not committed(run):  # rank 0 may be on either node: wait for its first commit (step 2)
            assert time.monotonic() < deadline and host.proc.poll() is None, host.output + other.output
            time.sleep(0.5)
    finally:
        host.kill_all()
    rc = finish(other)
    assert rc == 203, other.output
    assert re.search(r"^error: lost contact with another rank or the rendezvous store \(RuntimeError: ", other.output,
                     re.M), other.output
    assert re.fullmatch(r"elastic agent: lost the rendezvous store at 127\.0\.0\.1:\d+ \(RendezvousConnectionError: "
                        r".*\); newest committed checkpoint: step \d+ .*; exit 203 \(retryable: .*\)",
                        last_line(other)), other.output
    assert "Traceback" not in other.output


def test_should_name_an_existing_test_for_every_row_when_the_failure_table_is_read():
    """docs/distributed.md's table is the contract: each row names its exit code and the test that runs it."""
    doc = (REPO / "docs" / "distributed.md").read_text()
    table = doc.split("## Failures and exit codes", 1)[1].split("\n\n| failure |", 1)[1].split("\n\n", 1)[0]
    rows = [r for r in table.splitlines()[1:] if r.startswith("| ")]
    assert len(rows) >= 15, table
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert re.search(r"\b(1|2|143|203)\b|^-$|^- /", cells[2]), row  # an exit code, or "-" when it recovers
        refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", cells[4])
        assert refs, row
        for path, name in refs:
            assert (REPO / path).is_file(), path
            assert not name or re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name}"
