"""Losing a whole node of a 2-node run: two `clipjob train` agents on loopback (`--nnodes 2`, one gloo worker
each, one DataLoader worker per rank), shards and run dir on the loopback S3 server. One node is SIGKILLed with
everything it started, as when a pod's machine disappears, and a new agent takes its place a few seconds later,
as the operator's replacement pod does. The run must finish from the newest committed step.

Node 0 hosts the c10d rendezvous store, as pod 0 behind the --rdzv-endpoint address does (`is_host` in
PET_RDZV_CONF: on loopback every agent matches the address); node 1 does not. docs/distributed.md, "Losing a
node", says what happens in each case.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from test_faults import assert_all_load, committed
from trainrun import Run, free_port, make_shards, train_argv

DELAY = {"CLIPJOB_TEST_STEP_DELAY_S": "0.4"}
# dead-node detection of the rendezvous: keep-alive every 2 s, dead after 3 missed (torch's default: 5 s x 3)
RDZV_CONF = "keep_alive_interval=2,keep_alive_max_attempt=3,join_timeout=120"
READ_TIMEOUT_S = 60  # torch's c10d store read timeout (read_timeout): a survivor that waited for it is not prompt
STEPS = ("train.steps=8", "train.ckpt_every_steps=3", "train.keep_last=10", "data.num_workers=1")


@pytest.fixture(scope="module")
def shards(s3_server) -> str:
    url = s3_server.make_bucket(f"shards-{os.getpid()}")
    return make_shards(f"{url}/train", samples=128, per_shard=32)


def start_node(data: str, run: str, endpoint: str, node: int, env: dict | None = None) -> Run:
    """One pod's `clipjob train`: an elastic agent with one worker, joining the 2-node rendezvous at `endpoint`.
    Node 0 hosts the rendezvous store."""
    argv = train_argv(data, run, *STEPS) + ["--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "2",
                                            "--rdzv-endpoint", endpoint, "--rdzv-id", run.rsplit("/", 1)[-1]]
    return Run(argv, {**DELAY, "PET_RDZV_CONF": f"{RDZV_CONF},is_host={int(node == 0)}", **(env or {})})


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (the agent, its workers, their DataLoader workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_node(r: Run) -> None:
    """SIGKILL the agent and everything it started at once: the node is gone, nobody gets to clean up."""
    tree = descendants(r.proc.pid)
    for pid in tree:
        os.kill(pid, signal.SIGSTOP)  # freeze first, so no process sees a sibling die before it dies itself
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    r.proc.wait(10)


def wait_for_commit(nodes: list[Run], step: int, timeout: float = 120) -> None:
    """Until rank 0 says it committed `step` (rank 0 is on the node whose agent sorts first: either one)."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(rf"^checkpoint: step {step} committed", re.M)
    while not any(pattern.search(r.output) for r in nodes):
        assert time.monotonic() < deadline and all(r.proc.poll() is None for r in nodes), [r.output for r in nodes]
        time.sleep(0.05)


def resumed_step(*nodes: Run) -> int:
    """The step of the `resumed from URL (step N)` line (printed by rank 0, on whichever node it landed)."""
    found = {int(m[1]) for r in nodes for m in re.finditer(r"^resumed from \S+ \(step (\d+)\)$", r.output, re.M)}
    assert len(found) == 1, [r.output for r in nodes]
    return found.pop()


def finish(*nodes: Run, timeout: float = 120) -> list[int]:
    """Exit codes of agents that are expected to run to the end."""
    deadline = time.monotonic() + timeout
    return [r.wait(max(1.0, deadline - time.monotonic())) for r in nodes]


def test_should_agree_on_the_workers_store_when_a_replacement_node_has_another_restart_count(monkeypatch):
    """The survivor's agent restarted its group once (TORCHELASTIC_RESTART_COUNT=1), the replacement's is new
    (0): rank 1 still finds what rank 0 put in the workers' store of their round (it hung before)."""
    from clipjob import dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what clipjob.agent's setting gives
    # each rank in a thread of its own (TCPStore's host waits for the other rank), each with its node's count
    counts = {"survivor": 1, "replacement": 0}
    monkeypatch.setattr(dist, "restart_count", lambda: counts[threading.current_thread().name])
    stores = {}

    def join(rank: int, name: str) -> None:
        stores[name] = dist._worker_store(rank, 2, datetime.timedelta(seconds=5))

    ranks = [threading.Thread(target=join, args=args, name=args[1]) for args in ((0, "survivor"), (1, "replacement"))]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join(10)
    stores["survivor"].set("rank0/address", b"127.0.0.1:1234")
    assert stores["replacement"].get("rank0/address") == b"127.0.0.1:1234"


def test_should_keep_restarted_groups_apart_when_the_agent_hosts_one_store_for_the_job(monkeypatch):
    """Plain torchrun (the agent's store, one address for the whole job): a restarted group on one node does
    not see the keys of the group before it."""
    import torch.distributed

    from clipjob import dist

    port = free_port()
    agent_store = torch.distributed.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    timeout = datetime.timedelta(seconds=5)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    dist._worker_store(0, 1, timeout).set("rank0/address", b"old")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not dist._worker_store(0, 1, timeout).check(["rank0/address"])
    assert agent_store.num_keys() >= 1  # the old key is still there, in the old group's namespace


def test_should_finish_from_the_newest_commit_when_the_non_host_node_is_replaced(shards, s3_bucket):
    """Node 1 is lost: node 0's worker fails its next collective (exit 203), node 0's agent restarts its group
    (--max-restarts) and waits in the next rendezvous round; the replacement joins it, and the group of the
    two resumes from the newest committed step and finishes."""
    run = f"{s3_bucket}/lose-node1"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [start_node(shards, run, endpoint, 0), start_node(shards, run, endpoint, 1)]
    try:
        wait_for_commit(nodes, 3)
        kill_node(nodes[1])
        before = committed(run)  # the next commit needs both ranks
        time.sleep(3)
        nodes.append(start_node(shards, run, endpoint, 1))
        codes = finish(nodes[0], nodes[2])
    finally:
        for r in nodes:
            r.kill_all()
    assert nodes[1].proc.returncode == -signal.SIGKILL and codes == [0, 0], [r.output for r in nodes]
    assert before[-1] >= 3 and resumed_step(nodes[0], nodes[2]) == before[-1]
    assert f"resumed from {run}/checkpoints/step-{before[-1]:08d}" in nodes[0].output + nodes[2].output
    assert committed(run) == sorted({*before, 6, 8}) and "Traceback" not in nodes[0].output
    assert_all_load(run)


def test_should_exit_retryable_and_resume_on_restart_when_the_store_host_node_is_replaced(shards, s3_bucket):
    """Node 0, which hosts the rendezvous store, is lost: the store and its state go with it, and torch's
    agents cannot rejoin a store that restarted empty. The survivor exits 203 (retryable) promptly with one
    line; the replacement of node 0 hosts a new store and waits; the operator restarts the survivor's pod (its
    exit code is retryable), and the two resume from the newest committed step."""
    run = f"{s3_bucket}/lose-node0"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [start_node(shards, run, endpoint, 0), start_node(shards, run, endpoint, 1)]
    try:
        wait_for_commit(nodes, 3)
        kill_node(nodes[0])
        lost = time.monotonic()
        before = committed(run)  # the next commit needs both ranks
        time.sleep(3)
        nodes.append(start_node(shards, run, endpoint, 0))  # node 0's replacement pod
        survivor = nodes[1].wait(2 * READ_TIMEOUT_S)
        took = nodes[1].times[-1] - lost  # until its last line
        nodes.append(start_node(shards, run, endpoint, 1))  # the operator restarts the pod that exited 203
        codes = finish(nodes[2], nodes[3])
    finally:
        for r in nodes:
            r.kill_all()
    assert survivor == 203 and "Traceback" not in nodes[1].output, nodes[1].output
    # one line, its last: what was lost, what is committed, the code; it did not wait out a store read timeout
    agent_lines = [line for line in nodes[1].lines if line.startswith("elastic agent:")]
    assert agent_lines == nodes[1].lines[-1:], nodes[1].output
    assert re.search(rf"lost the rendezvous store at {endpoint} .*step {before[-1]} .*exit 203", agent_lines[0])
    assert took < READ_TIMEOUT_S, took
    assert codes == [0, 0], [r.output for r in nodes]
    assert before[-1] >= 3 and resumed_step(nodes[2], nodes[3]) == before[-1]
    assert committed(run) == sorted({*before, 6, 8})
    assert_all_load(run)
