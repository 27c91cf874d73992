"""One write per line, so the lines of ranks sharing the agent's pipe never interleave: every print after
errors.whole_lines (which `clipjob`'s and the elastic agent's entry points call). The writers
run with PYTHONUNBUFFERED=1, as in the image (and on CI machines), where a plain print writes its text and its
newline separately (plain prints in this harness: 160 to 366 of the 1,600 lines garbled over three tries)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

WRITERS = {
    "print after whole_lines": ("from clipjob.errors import whole_lines\nwhole_lines()\nsay = print", "stdout"),
    "print to stderr after whole_lines":
        ("import functools, sys\nfrom clipjob.errors import whole_lines\nwhole_lines()\n"
         "say = functools.partial(print, file=sys.stderr)", "stderr"),
}
LOOP = """
{setup}
for i in range({n}):
    say("error: rank {rank} line %d: " % i + "x" * 300)
"""


@pytest.mark.parametrize("writer", WRITERS)
def test_should_keep_each_line_whole_when_several_processes_write_to_one_pipe(writer):
    setup, stream = WRITERS[writer]
    n, ranks = 400, 4
    read, write = os.pipe()  # one pipe for all writers, as torchrun's workers share the agent's stdout / stderr
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", LOOP.format(setup=setup, n=n, rank=r)], env=env,
                              **{stream: write}) for r in range(ranks)]
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


@pytest.mark.parametrize("module", ["clipjob.cli", "clipjob.agent"])
def test_should_join_each_print_into_one_write_in_the_entry_points(module):
    """`clipjob`'s main() and the elastic agent's reconfigure both streams before anything runs (here --help,
    then exit)."""
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: sys.__stderr__.write(f'streams {sys.stdout.write_through} "
             "{sys.stdout.line_buffering} {sys.stderr.write_through} {sys.stderr.line_buffering}\\n'))\n"
             f"sys.argv = ['{module}', '--help']\n"
             f"from {module} import main\nmain()\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert "streams False True False True" in r.stderr, r.stderr
