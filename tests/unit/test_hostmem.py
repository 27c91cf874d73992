"""The host allocator setting (clipjob/hostmem.py) is process-global, so each case runs in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, sys
from clipjob.hostmem import tune_malloc
on = tune_malloc()
again = tune_malloc()
# with mmap'd chunks off, a 64 MiB block comes from the heap: freeing and re-allocating it reuses the same
# address instead of a fresh mapping
libc = ctypes.CDLL("libc.so.6"); libc.malloc.restype = ctypes.c_void_p; libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
p = libc.malloc(64 << 20); libc.free(p); q = libc.malloc(64 << 20)
libc.sbrk.restype = ctypes.c_void_p
heap_top = libc.sbrk(0)
r = {"on": on, "again": again, "in_heap": p < heap_top and q < heap_top, "reused": p == q}
if "restore" in sys.argv:
    from clipjob.hostmem import restore_malloc
    r["restored"] = restore_malloc()
    libc.free(q); b = libc.malloc(64 << 20)
    r["after_restore_in_heap"] = b < libc.sbrk(0)
print(json.dumps(r))
"""


def _probe(*args: str, **env: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", PROBE, *args], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_should_serve_large_blocks_from_the_heap_when_tuned():
    r = _probe()
    assert r["on"] and r["again"]
    assert r["in_heap"] and r["reused"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_should_leave_glibc_defaults_when_clipjob_malloc_is_system():
    r = _probe(CLIPJOB_MALLOC="system")
    assert not r["on"]
    assert not r["in_heap"]  # a 64 MiB block is its own mmap above the heap by default


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_should_map_large_blocks_again_when_restored():
    r = _probe("restore")
    assert r["in_heap"] and r["restored"]
    assert not r["after_restore_in_heap"]  # glibc's default: a 64 MiB block is its own mapping again
    assert _probe("restore", CLIPJOB_MALLOC="system")["restored"] is False  # nothing to undo
