"""`kill -USR1` on a clipjob process prints every thread's Python stack to stderr and the process goes on: the
way to see where a stuck pod is (docs/distributed.md). Production shape: the elastic agent, one rank, one
DataLoader worker."""

from __future__ import annotations

import os
import re
import signal

from trainrun import Run, free_port, make_shards, train_argv


def test_should_print_every_threads_stack_and_train_on_when_the_agent_and_its_rank_get_sigusr1(tmp_path):
    data = make_shards(tmp_path / "shards", samples=64, per_shard=16)
    argv = train_argv(data, str(tmp_path / "run"), "data.num_workers=1", "train.steps=10",
                      "train.ckpt_every_steps=0")
    argv += ["--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    r = Run(argv, {"CLIPJOB_TEST_STEP_DELAY_S": "0.3"})
    try:
        r.wait_for(r"^step 2: loss")
        ranks = r.children()
        assert ranks, r.output
        for pid in [r.proc.pid, *ranks]:
            os.kill(pid, signal.SIGUSR1)
        rc = r.wait(120)
    finally:
        r.kill_all()
    assert rc == 0 and re.search(r"^step 10: loss", r.output, re.M), r.output  # neither process ended
    dumps = r.output.count("(most recent call first)")
    assert dumps >= 2, r.output  # at least one thread of each process
    assert "clipjob/agent.py" in r.output and "clipjob/train/trainer.py" in r.output, r.output
