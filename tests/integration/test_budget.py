"""train.budget_minutes in the shape a pod runs it: the elastic agent, 2 ranks, a DataLoader worker per rank.
Steps are slowed by CLIPJOB_TEST_STEP_DELAY_S (tests/hooks) so that a short budget holds far fewer steps than
train.steps asks for, whatever the CPU."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import yaml

from test_faults import assert_all_load, committed
from trainrun import Run, free_port, make_shards, train_argv

DELAY = {"CLIPJOB_TEST_STEP_DELAY_S": "0.2"}
BUDGET_S = 30
PLAN = rf"^train\.budget_minutes={re.escape(str(BUDGET_S / 60))}: " r"([\d.]+) s/step over steps (\d+)-(\d+), [\d.]+ min left -> train\.steps (\d+) -> (\d+)$"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_shards(tmp_path_factory.mktemp("budget") / "train", samples=128, per_shard=32)


def agent(data: str, run: str, delay: bool = True) -> Run:
    """`delay=False`: steps at full speed (a resumed run that must not plan again needs no slow steps)."""
    argv = train_argv(data, run, "train.steps=1000", "train.warmup_steps=20", f"train.budget_minutes={BUDGET_S / 60}",
                      "train.ckpt_every_steps=0", "data.num_workers=1", "train.log_every=5")
    argv += ["--nproc-per-node", "2", "--max-restarts", "0", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    return Run(argv, DELAY if delay else {})


def stored_steps(path: Path) -> int:
    return yaml.safe_load(path.read_text())["train"]["steps"]


def test_should_end_within_the_budget_at_the_step_count_it_planned_on_every_rank(shards, tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    r = agent(shards, str(run))
    try:
        rc = r.wait(300)
    finally:
        r.kill_all()
    wall = time.monotonic() - t0
    assert rc == 0, r.output
    plans = [tuple(float(x) if i == 0 else int(x) for i, x in enumerate(p)) for p in re.findall(PLAN, r.output, re.M)]
    # the first plan: the second half of the warmup, each step sleeping 0.2 s; it cuts the 1,000 steps
    step_s, first, at, before, planned = plans[0]
    assert (first, at, before) == (10, 20, 1000) and step_s >= 0.2 and at <= planned < 1000, r.output
    # each later one: from the last plan's step, a third of the way to its end (at least 20 steps on), while
    # that comes before the end; three at most (rank 0 says each plan once)
    for (_, _, at, _, planned), (step_s, first, at_next, before, _) in zip(plans, plans[1:]):
        assert (first, before) == (at, planned) and at_next == at + max(20, (planned - at) // 3) and step_s >= 0.2
    _, _, at, _, steps = plans[-1]
    assert len(plans) == 3 or at + max(20, (steps - at) // 3) >= steps, r.output
    assert at <= steps <= at + BUDGET_S / 0.2, r.output  # 30 s hold at most 150 steps of >= 0.2 s
    assert len(re.findall(rf"^done: step {steps}, ", r.output, re.M)) == 2, r.output  # both ranks stop there
    assert committed(str(run)) == [steps]
    assert stored_steps(run / "config.yaml") == steps  # what `clipjob status` and eval --watch read
    assert stored_steps(run / "checkpoints" / f"step-{steps:08d}" / "config.yaml") == steps
    assert_all_load(str(run))
    # 1,000 steps of >= 0.2 s would take 200 s; the budget counts from each rank's start, after the agent's
    assert wall < BUDGET_S + 60, f"{wall:.0f} s:\n{r.output}"


def test_should_keep_the_planned_step_count_when_resumed_after_the_plan(shards, tmp_path):
    run = tmp_path / "run"
    r = agent(shards, str(run))
    try:
        steps = int(r.wait_for(PLAN).group(5))  # the first plan (at step 20); the second comes at >= 40
        r.wait_for(r"^step 30: loss")
        r.proc.send_signal(signal.SIGTERM)
        assert r.wait(120) == 143, r.output
    finally:
        r.kill_all()
    (stopped,) = committed(str(run))
    assert 25 <= stopped < steps, r.output
    again = agent(shards, str(run), delay=False)  # fast steps: a plan made now would end elsewhere
    try:
        assert again.wait(300) == 0, again.output
    finally:
        again.kill_all()
    assert f"(step {stopped})" in again.output and not re.search(PLAN, again.output, re.M), again.output
    assert committed(str(run)) == [stopped, steps]
    assert stored_steps(run / "checkpoints" / f"step-{steps:08d}" / "config.yaml") == steps
