"""errors.stderr_line: one line on stderr in one write, so the lines of ranks sharing a pipe never interleave."""

from __future__ import annotations

import os
import subprocess
import sys

WRITER = """
from clipjob.errors import stderr_line
for i in range({n}):
    stderr_line("error: rank {rank} line %d: " % i + "x" * 300)
"""


def test_should_keep_each_line_whole_when_several_processes_write_to_one_pipe():
    n, ranks = 400, 4
    read, write = os.pipe()  # one pipe for all writers, as torchrun's workers share the agent's stderr
    procs = [subprocess.Popen([sys.executable, "-c", WRITER.format(n=n, rank=r)], stderr=write) for r in range(ranks)]
    os.close(write)
    with open(read, "rb") as f:
        out = f.read().decode()
    assert all(p.wait(timeout=60) == 0 for p in procs)
    lines = out.splitlines()
    assert len(lines) == n * ranks, out[:500]
    for line in lines:
        assert line.count("error: ") == 1 and line.endswith(": " + "x" * 300), line[:200]
    for r in range(ranks):
        assert sum(line.startswith(f"error: rank {r} ") for line in lines) == n
