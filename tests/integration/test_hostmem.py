"""The host allocator setting (clipjob/hostmem.py) is process-global, so each case runs in a fresh process.

What is asserted is glibc's own accounting (mallinfo2): `hblkhd`, the bytes held in mmap'd chunks, and
`arena`, the bytes of the heap. Both are exact counters, not addresses, so the checks do not depend on where
the kernel places mappings (an earlier version compared heap addresses and failed 1 run in 9).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, sys
from clipjob.hostmem import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
BLOCK = 64 << 20

def info():
    m = libc.mallinfo2()
    return {"mmapped": m.hblkhd, "heap": m.arena}

def alloc_free():
    before = info(); p = libc.malloc(BLOCK); during = info(); libc.free(p); after = info()
    return {"mapped_while_held": during["mmapped"] - before["mmapped"], "heap_while_held": during["heap"] - before["heap"],
            "mapped_after_free": after["mmapped"] - before["mmapped"], "heap_after_free": after["heap"] - before["heap"]}

r = {"on": tune_malloc(), "again": tune_malloc(), "first": alloc_free()}
if "restore" in sys.argv:
    from clipjob.hostmem import restore_malloc
    heap_before = info()["heap"]
    r["restored"] = restore_malloc()
    r["heap_trimmed"] = heap_before - info()["heap"]
    r["after_restore"] = alloc_free()
print(json.dumps(r))
"""
BLOCK = 64 << 20


GPU_ENV = ("CLIPJOB_MALLOC", "NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
GPU_NODES = glob.glob("/dev/nvidia[0-9]*")


def _probe(*args: str, **env: str) -> dict:
    """The probe in a fresh process, with only the given allocator/GPU env set (CLIPJOB_MALLOC=keep unless
    given: most cases test the setting itself, which a GPU machine would otherwise turn off by default)."""
    base = {k: v for k, v in os.environ.items() if k not in GPU_ENV}
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env={**base, "CLIPJOB_MALLOC": "keep", **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _served_by_mmap(r: dict) -> bool:
    """glibc's default for a block above the mmap threshold: its own mapping, unmapped again on free."""
    return r["mapped_while_held"] >= BLOCK and r["mapped_after_free"] == 0


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")


def test_should_serve_large_blocks_from_the_heap_and_keep_them_when_tuned():
    r = _probe()
    assert r["on"] and r["again"]
    first = r["first"]
    assert first["mapped_while_held"] == 0 and first["heap_while_held"] >= BLOCK, first
    assert first["heap_after_free"] >= BLOCK, first  # freed, but kept in the process (trim threshold 1 GiB)


def test_should_leave_glibc_defaults_when_clipjob_malloc_is_system():
    r = _probe(CLIPJOB_MALLOC="system")
    assert not r["on"]
    assert _served_by_mmap(r["first"]), r


def test_should_map_large_blocks_again_and_trim_the_heap_when_restored():
    r = _probe("restore")
    assert r["restored"] and r["heap_trimmed"] >= BLOCK, r  # malloc_trim handed the kept block back
    assert _served_by_mmap(r["after_restore"]), r
    assert _probe("restore", CLIPJOB_MALLOC="system")["restored"] is False  # nothing to undo


# -- the default: on where no GPU is used, off where one is ---------------------------------------------------
# The GPU signal is faked through the environment (NVIDIA_VISIBLE_DEVICES naming a GPU, as the NVIDIA device
# plugin and `docker run --gpus` set it): no GPU here. CLIPJOB_MALLOC="" is "unset" for the probe.


@pytest.mark.skipif(bool(GPU_NODES), reason=f"this machine has NVIDIA device nodes ({GPU_NODES[:1]})")
def test_should_keep_freed_memory_by_default_when_no_gpu_is_visible():
    r = _probe(CLIPJOB_MALLOC="")
    assert r["on"] and r["first"]["heap_after_free"] >= BLOCK, r
    # CUDA base images set NVIDIA_VISIBLE_DEVICES=all even on CPU-only hosts: not a GPU by itself
    assert _probe(CLIPJOB_MALLOC="", NVIDIA_VISIBLE_DEVICES="all")["on"]


def test_should_leave_glibc_defaults_by_default_when_a_gpu_is_visible():
    """Faked: NVIDIA_VISIBLE_DEVICES names a GPU by UUID (the device plugin's env strategy)."""
    r = _probe(CLIPJOB_MALLOC="", NVIDIA_VISIBLE_DEVICES="GPU-2b8f6e1c-0d4a-4f2e-9c61-5a0e7d3b9f10")
    assert not r["on"]
    assert _served_by_mmap(r["first"]), r
    assert _probe(NVIDIA_VISIBLE_DEVICES="0")["on"], "CLIPJOB_MALLOC=keep still applies on a GPU"


def test_should_keep_freed_memory_by_default_when_cuda_visible_devices_hides_every_gpu():
    r = _probe(CLIPJOB_MALLOC="", NVIDIA_VISIBLE_DEVICES="0", CUDA_VISIBLE_DEVICES="")
    assert r["on"], "a CPU-only run on a GPU host keeps the CPU setting"
