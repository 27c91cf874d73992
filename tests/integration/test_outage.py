"""Storage outages in the production shape, in miniature: torchrun's elastic agent with 2 workers, one
DataLoader worker each, shards and run dir on the loopback S3 server behind a pausable proxy
(tests/s3proxy.py). The proxy holds every connection (accepted, never answered) or refuses them, like an S3
endpoint that is down; the test process itself talks to the server directly to check what was committed.

Bounds are seconds here (data.stall_timeout_s, storage.stall_timeout_s, storage.stop_wait_s); per shard one
batch (8 samples), so the workers need storage every step.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from s3proxy import S3Proxy
from test_faults import assert_all_load, committed
from trainrun import Run, free_port, make_shards, train_argv

STEP_DELAY = {"CLIPJOB_TEST_STEP_DELAY_S": "0.3"}


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> Path:
    return Path(make_shards(tmp_path_factory.mktemp("shards"), samples=96, per_shard=8))


@pytest.fixture
def proxy(s3_server):
    p = S3Proxy(s3_server.port).start()
    yield p
    p.close()


@pytest.fixture
def shards(local_shards, s3_bucket) -> str:
    from clipjob import fs

    for f in sorted(local_shards.iterdir()):
        fs.write_bytes(f"{s3_bucket}/shards/{f.name}", f.read_bytes())
    return f"{s3_bucket}/shards"


def launch(proxy: S3Proxy, data: str, run: str, *overrides: str, env: dict | None = None) -> Run:
    argv = train_argv(data, run, "data.num_workers=1", "train.keep_last=10", *overrides)
    argv += ["--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    return Run(argv, {"AWS_ENDPOINT_URL_S3": proxy.endpoint, **STEP_DELAY, **(env or {})})


def steps_logged(r: Run) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+): loss", r.output, re.M)]


def test_should_continue_training_when_storage_comes_back_within_the_bound(proxy, shards, s3_bucket):
    """(a) A 4.5 s outage, bounds 20 s: the reads of the workers and the save of step 4 wait it out, training
    finishes (exit 0) with every checkpoint committed."""
    run = f"{s3_bucket}/run"
    r = launch(proxy, shards, run, "train.steps=8", "train.ckpt_every_steps=4", "data.stall_timeout_s=20",
               "storage.stall_timeout_s=20")
    try:
        r.wait_for(r"^step 2: loss")
        proxy.pause("hold")
        paused = time.monotonic()
        time.sleep(4.5)
        proxy.resume()
        assert r.wait(120) == 0, r.output
    finally:
        proxy.close()
        r.kill_all()
    assert committed(run) == [4, 8], r.output
    assert_all_load(run)
    # the save of step 4 (due about a second into the outage) waited for storage to come back
    assert r.time_of(r"checkpoint: step 4 committed") - paused >= 4, r.output
    assert "Traceback" not in r.output and "error:" not in r.output, r.output


def test_should_exit_retryable_naming_the_url_when_the_outage_outlasts_the_bound(proxy, shards, s3_bucket):
    """(b) Storage stops answering for good after step 2 is committed, bounds 6 s: one line naming the URL
    that stalled, exit 203 (retryable), within the bound plus a request timeout and a step; step 2 intact."""
    run = f"{s3_bucket}/run"
    r = launch(proxy, shards, run, "train.steps=40", "train.ckpt_every_steps=2", "data.stall_timeout_s=6",
               "storage.stall_timeout_s=6")
    try:
        r.wait_for(r"checkpoint: step 2 committed")
        proxy.pause("hold")
        paused = time.monotonic()
        rc = r.wait(90)
        ended = time.monotonic()
    finally:
        proxy.close()
        r.kill_all()
    assert rc == 203, r.output
    errors = re.findall(r"^(?:\[rank\d\]: )?error: (s3://\S+): storage did not answer for (\d+) s", r.output, re.M)
    assert errors, r.output
    url, waited = errors[0]
    assert url.startswith(s3_bucket) and 6 <= int(waited) <= 10, r.output
    assert ended - paused < 6 + 2 + 25, r.output  # bound + read timeout (2 s) + buffered steps and exit
    assert 2 in committed(run), r.output
    assert_all_load(run)


def test_should_commit_the_last_step_when_sigterm_comes_while_waiting_for_data(proxy, shards, s3_bucket):
    """(c) The workers starve (storage held), SIGTERM reaches the agent while the ranks wait for data; storage
    answers again 2 s later, within storage.stop_wait_s: the last completed step is committed, exit 143."""
    run = f"{s3_bucket}/run"
    r = launch(proxy, shards, run, "train.steps=60", "train.ckpt_every_steps=0", "data.stall_timeout_s=60",
               "storage.stall_timeout_s=60", "storage.stop_wait_s=15")
    try:
        r.wait_for(r"^step 2: loss")
        proxy.pause("hold")
        while True:  # until the ranks have used up what their workers had prefetched
            n = len(steps_logged(r))
            time.sleep(3)
            if len(steps_logged(r)) == n:
                break
        stopped = time.monotonic()
        r.proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        proxy.resume()
        rc = r.wait(60)
        took = time.monotonic() - stopped
    finally:
        proxy.close()
        r.kill_all()
    m = re.search(r"stop requested while waiting for data: saved step (\d+), exiting", r.output)
    assert rc == 143 and m, r.output
    k = int(m[1])
    assert k == max(steps_logged(r)) and committed(run) == [k], r.output
    assert took < 20, r.output  # a second of polling, the 2 s outage, a save
    assert_all_load(run)


def test_should_exit_retryable_keeping_the_last_commit_when_sigterm_comes_and_storage_stays_down(proxy, shards,
                                                                                               s3_bucket):
    """(c) SIGTERM while rank 0's save of step 4 waits for storage that never answers again: the save gives up
    after storage.stop_wait_s (3 s) instead of at its 60 s bound, one line says so, a retryable exit; step 2
    intact."""
    run = f"{s3_bucket}/run"
    r = launch(proxy, shards, run, "train.steps=40", "train.ckpt_every_steps=2", "data.stall_timeout_s=60",
               "storage.stall_timeout_s=60", "storage.stop_wait_s=3")
    try:
        r.wait_for(r"checkpoint: step 2 committed")
        proxy.pause("hold")
        r.wait_for(r"^step 4: loss")
        time.sleep(1)  # rank 0 is in the metrics flush / save of step 4, held
        stopped = time.monotonic()
        r.proc.send_signal(signal.SIGTERM)
        rc = r.wait(60)
        took = time.monotonic() - stopped
    finally:
        proxy.close()
        r.kill_all()
    assert re.search(rf"^(?:\[rank0\]: )?error: {s3_bucket}/run/\S+: storage did not answer within the stop grace",
                     r.output, re.M), r.output
    # the workers exit 203; the agent, signalled itself, exits 128 + 15 saying what is committed: both retried
    assert rc in (143, 203) and "Traceback" not in r.output, r.output
    # rank 0 gave up at the grace (3 s, polled every 0.25 s); the agent's exit follows (its own 10 s look at
    # the unreachable run dir, the workers' shutdown): bounded, well inside torchrun's 30 s + the pod's grace
    assert r.time_of(r"within the stop grace") - stopped < 3 + 3, r.output
    assert took < 45, r.output
    assert committed(run) == [2], r.output
    assert_all_load(run)
