"""Host memory: keep freed memory in the process instead of handing it back to the kernel.

glibc's malloc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with a
fresh mmap and unmaps it on free. A CPU training step allocates and frees hundreds of activation and gradient
buffers of 1-50 MiB, so every step page-faults all of them in again, and the kernel zeroes each page first:
on the 2-core VMs of bench/ that was ~30 % of a CPU training step (profiled: `aten::copy_` inside `addmm`
and `aten::fill_` of the embedding gradient ran at < 1 GB/s, all first-touch faults). With mmap'd chunks
off and a high trim threshold, freed buffers stay on the heap and are reused warm (1.3-1.4x per CPU training
step, bench/ablate.py). This is what tcmalloc/jemalloc preloading gives CPU PyTorch, without a preload.

Applied once per process by the CLI, before any tensor exists (DataLoader workers are forked and inherit
it; the training and zero-shot eval workers undo it, see restore_malloc). Not glibc (musl, macOS): nothing to do.

On by default only where no GPU is used. On a GPU the activations live in device memory, the gain was
measured on CPU steps only, and every DataLoader worker (64 on an 8-GPU node) could keep up to the 1 GiB trim
threshold of freed decode buffers. `CLIPJOB_MALLOC=keep` or `=system` decides; unset (or `auto`), a GPU counts
as used when the process can see one: NVIDIA device nodes (/dev/nvidia0, ...) exist, or NVIDIA_VISIBLE_DEVICES
names GPUs (what the device plugin or `docker run --gpus` set; not `all`, which CUDA base images set even on
CPU-only hosts), unless CUDA_VISIBLE_DEVICES hides them all ("" or -1). This runs before torch is imported
(importing it here would cost seconds in every command), so it looks at those instead of
torch.cuda.is_available().
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free heap before returning any to the kernel
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 << 10, 65536  # glibc's defaults

_applied: bool | None = None


def _libc() -> ctypes.CDLL:
    """glibc with mallopt/malloc_trim typed; OSError or AttributeError where the C library is not glibc."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def gpu_visible() -> bool:
    """Whether this process can see an NVIDIA GPU, without importing torch (see the module doc)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    named = os.environ.get("NVIDIA_VISIBLE_DEVICES", "").strip().lower()
    return named not in ("", "all", "none", "void") or bool(glob.glob("/dev/nvidia[0-9]*"))


def malloc_mode() -> str:
    """`keep` (tune_malloc applies) or `system` (glibc's defaults): CLIPJOB_MALLOC, else by gpu_visible()."""
    mode = os.environ.get("CLIPJOB_MALLOC", "auto").strip().lower()
    if mode in ("keep", "system"):
        return mode
    return "system" if gpu_visible() else "keep"


def tune_malloc() -> bool:
    """Switch glibc malloc to keep freed memory (idempotent). True when the setting is in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if malloc_mode() == "system":
        return False
    try:
        libc = _libc()
    except (OSError, AttributeError):  # not glibc
        return False
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def restore_malloc() -> bool:
    """Back to glibc's defaults, and hand the free heap back (malloc_trim), in a process that inherited the
    setting but gains nothing from it: DataLoader workers, which decode one image at a time (zero-shot eval's
    each kept ~60 MiB of freed decode buffers, eval peak PSS +16 % with 2 workers; a training worker with a
    picture cache grew a 5 GiB heap). True when done."""
    global _applied
    if not _applied:
        return False
    libc = _libc()  # tune_malloc succeeded: glibc
    ok = bool(libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD))
    libc.malloc_trim(0)
    _applied = not ok
    return ok
