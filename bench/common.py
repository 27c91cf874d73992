"""Shared pieces of the side-by-side benchmarks: where things live, the one model spec both tools are built
from, the environment every run gets, a process-tree memory monitor, and result files.

Imported by bench/run.py, train_bench.py, eval_bench.py and mfu.py (also on the GPU machine, where only
torch may be installed: nothing here imports torch, clipjob or open_clip at module level).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TMP = RESULTS / "tmp"  # git-ignored: datasets, run dirs, logs
CLIPJOB_PY = Path(os.environ.get("BENCH_CLIPJOB_PY", ROOT / ".venv" / "bin" / "python"))
PEER_PY = Path(os.environ.get("BENCH_PEER_PY", ROOT / ".venv-bench" / "bin" / "python"))
OPENCLIP_MODEL_NAME = "clipjob-bench"  # the name the model config is registered under in OpenCLIP


def default_precisions() -> list[str]:
    """The --precisions default: fp32 and bf16 where bf16 matmuls are measurably faster here (the test of
    train.precision=auto), else fp32 alone, said on stderr: on a CPU without AVX512-BF16 or AMX a bf16 matmul
    runs ~100x slower than fp32 (an AVX2-only AMD EPYC) and the bf16 rows would take hours. Where clipjob is not
    importable (the GPU machine may hold only torch) both."""
    try:
        import torch

        from clipjob.train.flops import choose_precision
    except ImportError:
        return ["fp32", "bf16"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen, why = choose_precision(device, "auto")
    if chosen == "bf16":
        return ["fp32", "bf16"]
    print(f"bench: bf16 rows skipped ({why}); --precisions fp32,bf16 runs them anyway", file=sys.stderr, flush=True)
    return ["fp32"]


# -- the model both tools build -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One CLIP architecture, written out for both tools. OpenCLIP defaults that clipjob also uses: class-token
    pooling, ln_pre, no bias on the patch conv, GELU (not QuickGELU), argmax (EOT) text pooling, causal text
    mask, no projection bias, LayerNorm eps 1e-5."""

    name: str
    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int
    vocab_size: int = 49408
    mlp_ratio: float = 4.0

    def clipjob_sets(self) -> list[str]:
        """`--set` overrides that make clipjob's model this one (on top of any preset)."""
        return [f"model.embed_dim={self.embed_dim}", "model.vision.family=openai",
                f"model.vision.image_size={self.image_size}", f"model.vision.patch_size={self.patch_size}",
                f"model.vision.width={self.vision_width}", f"model.vision.layers={self.vision_layers}",
                f"model.vision.heads={self.vision_heads}", f"model.vision.mlp_ratio={self.mlp_ratio}",
                "model.vision.act=gelu", "model.text.kind=transformer", "model.text.freeze=false",
                f"model.text.context_length={self.context_length}", f"model.text.vocab_size={self.vocab_size}",
                f"model.text.width={self.text_width}", f"model.text.layers={self.text_layers}",
                f"model.text.heads={self.text_heads}", f"model.text.mlp_ratio={self.mlp_ratio}",
                "model.text.act=gelu", "model.range_augment=false", "model.grad_checkpointing=false"]

    def openclip_config(self) -> dict[str, Any]:
        """The same model as an OpenCLIP model config (the JSON files in open_clip/model_configs/)."""
        return {"embed_dim": self.embed_dim,
                "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers, "width": self.vision_width,
                               "head_width": self.vision_width // self.vision_heads, "mlp_ratio": self.mlp_ratio,
                               "patch_size": self.patch_size},
                "text_cfg": {"context_length": self.context_length, "vocab_size": self.vocab_size,
                             "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers,
                             "mlp_ratio": self.mlp_ratio}}

    def write_openclip_config(self, folder: Path) -> Path:
        """`folder/clipjob-bench.json`; `open_clip.add_model_config(folder)` then makes `--model clipjob-bench`."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{OPENCLIP_MODEL_NAME}.json"
        path.write_text(json.dumps(self.openclip_config(), indent=1) + "\n")
        return path


# ViT 6 x 256, patch 8 at 64 px; text 6 x 256, context 32 (the CPU comparison model)
TINY = ModelSpec("tiny", embed_dim=256, image_size=64, patch_size=8, vision_width=256, vision_layers=6,
                 vision_heads=4, text_width=256, text_layers=6, text_heads=4, context_length=32)
# OpenCLIP ViT-B-16 (open_clip/model_configs/ViT-B-16.json) == clipjob preset openclip-vit-b16
VIT_B16 = ModelSpec("vit-b-16", embed_dim=512, image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                    vision_heads=12, text_width=512, text_layers=12, text_heads=8, context_length=77)
MODELS = {m.name: m for m in (TINY, VIT_B16)}


# -- environment ------------------------------------------------------------------------------------------------


def run_env(threads: int) -> dict[str, str]:
    """The environment every benchmarked process gets: the same intra-op threads, no tokenizer threads,
    clipjob importable from the working tree, no network look-ups by the hub libraries."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1",
               PYTHONPATH=str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    return env


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 30.0) -> dict[str, Any]:
    """Wait (at most max_wait_s) until the 1-minute load average is below max_load. Returns what happened."""
    t0 = time.monotonic()
    start = loadavg()
    while os.getloadavg()[0] >= max_load and time.monotonic() - t0 < max_wait_s:
        print(f"  load average {loadavg()} >= {max_load}: waiting ({int(time.monotonic() - t0)} s of "
              f"{int(max_wait_s)} s)", flush=True)
        time.sleep(poll_s)
    return {"max_load": max_load, "waited_s": round(time.monotonic() - t0, 1), "load_at_start": start,
            "load_when_started": loadavg(), "quiet": os.getloadavg()[0] < max_load}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides the CPU's bf16 and fp32 rates


def _cpu_isa() -> list[str]:
    """The matrix-relevant ISA flags /proc/cpuinfo lists: this machine kind's CPUs share a model name ("AMD EPYC")
    but not these (an AVX2-only EPYC runs bf16 matmuls at ~1/100 of fp32, an AVX512-BF16 one at ~4x)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ISA_FLAGS if f in have]
    except OSError:
        pass
    return []


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def venv_versions(python: Path, packages: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions of `packages` in another interpreter's environment."""
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    try:
        r = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, timeout=60)
        return json.loads(r.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return {p: None for p in packages}


def machine_info() -> dict[str, Any]:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cpu": _cpu_model(), "cpu_isa": _cpu_isa(), "cpus": os.cpu_count(), "mem_gib": _mem_gib(),
            "platform": platform.platform(), "python": platform.python_version(), "git": git_revision(),
            "loadavg": loadavg()}


def versions() -> dict[str, Any]:
    return {"clipjob_venv": venv_versions(CLIPJOB_PY, ("clipjob", "torch", "torchvision", "webdataset",
                                                       "open_clip_torch", "pillow")),
            "openclip_venv": venv_versions(PEER_PY, ("torch", "torchvision", "webdataset", "open_clip_torch",
                                                     "pillow", "transformers"))}


# -- process-tree memory ----------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _kib(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeMemory:
    """Polls the memory of a process and all its descendants (DataLoader workers, torchrun children).
    RSS counts pages shared between forked workers once per process; PSS splits them, so the PSS sum is the
    tree's real footprint. Reports the peaks of both sums and the main process's own peak RSS."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.pid, self.interval = pid, interval_s
        self.peak_rss_kib = self.peak_pss_kib = self.peak_main_kib = self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        pids = process_tree(self.pid)
        rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
        pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
        self.peak_rss_kib, self.peak_pss_kib = max(self.peak_rss_kib, rss), max(self.peak_pss_kib, pss)
        self.peak_main_kib = max(self.peak_main_kib, _kib(f"/proc/{self.pid}/status", "VmHWM:"))
        self.max_procs = max(self.max_procs, len(pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def result(self) -> dict[str, Any]:
        return {"peak_tree_rss_mib": round(self.peak_rss_kib / 1024, 1),
                "peak_tree_pss_mib": round(self.peak_pss_kib / 1024, 1),
                "peak_main_rss_mib": round(self.peak_main_kib / 1024, 1), "max_processes": self.max_procs}


def run_monitored(cmd: list[str], *, env: dict[str, str], log: Path, cwd: Path = ROOT,
                  timeout_s: float = 900) -> dict[str, Any]:
    """Run a command with stdout+stderr to `log`, watching its process tree's memory. Never raises on a
    failing command: the caller reads `rc` and the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    load_before = loadavg()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        with TreeMemory(proc.pid) as mem:
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                out.write(f"\n[bench] killed after {timeout_s} s\n")
            finally:
                if proc.poll() is None:  # we are being stopped: take the benchmarked process group with us
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    return {"rc": rc, "wall_s": round(time.monotonic() - t0, 2), "loadavg_before": load_before,
            "loadavg_after": loadavg(), "log": str(log.relative_to(ROOT)), **mem.result()}


def run_part(cmd: list[str], *, env: dict[str, str], cwd: Path = ROOT) -> int:
    """Run a bench script in the foreground; if we are stopped, stop it with SIGTERM (so it cleans up)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so `run_monitored`'s clean-up kills the benchmarked process group too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- results ----------------------------------------------------------------------------------------------------


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """bench/results/{name}.json"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None
