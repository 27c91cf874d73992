"""Metrics on rank 0: JSON lines in `{run}/metrics.jsonl`, TensorBoard event files in `{run}/tb/` (when the
optional `tensorboard` package is installed), a progress bar on a TTY and plain lines otherwise.

Throughput: samples/s (all ranks and per device), step time, the fraction of time spent waiting for data,
and MFU (FLOPs counted by the caller with train/flops.py, over the device's peak FLOP/s).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from typing import Any

from clipjob import fs


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, total_steps: int, start_step: int = 0):
        self.url = fs.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._pending: list[str] = []
        self._last_flush = time.monotonic()
        self.progress = Progress(total_steps)
        self._remote = not fs.is_local(run_dir)
        self.tb = TensorBoard(run_dir) if enabled else None

    def set_total(self, total_steps: int) -> None:
        """The run's length changed (train.budget_minutes)."""
        self.progress.total = total_steps
        if self.bar is not None:
            self.bar.total = total_steps
            self.bar.refresh()

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._pending.append(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            self.tb.add(record)
        # object stores have no append: batch lines to keep the read-modify-write cost down
        if not self._remote or time.monotonic() - self._last_flush > 30:
            self.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.get('loss', 0):.3f}", sps=f"{record.get('samples_per_s', 0):.0f}")
            self.bar.n = record["step"]
            self.bar.refresh()
        else:
            keys = ("loss", "lr", "logit_scale", "samples_per_s", "data_wait_frac", "mfu")
            parts = " ".join(f"{k}={record[k]:.4g}" for k in keys if record.get(k) is not None)
            print(f"step {record['step']}: {parts} | {self.progress.line(record['step'])}", file=sys.stderr, flush=True)

    def flush(self) -> None:
        if self._pending:
            fs.append_text(self.url, "".join(self._pending))
            self._pending = []
        if self.tb is not None:
            self.tb.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.flush()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


class Ticker:
    """Progress of a long job with tqdm's update/close: a bar on a terminal, else a line on stderr every `every_s`
    seconds (a pod's log: a bar's carriage returns would be one ever-growing line), nothing when disabled."""

    def __init__(self, total: int, label: str, unit: str, enabled: bool = True, every_s: float = 30.0):
        self.label, self.unit, self.every_s, self.done = label, unit, every_s, 0
        self.bar, self.lines = None, None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, desc=label, mininterval=0.5, dynamic_ncols=True)
        elif enabled and total > 0:
            self.lines = Progress(total)
            self.lines.eta_s(0)  # the rate counts from here
        self.last = time.monotonic()

    def update(self, added: int, done: int | None = None) -> None:
        """`added` more are done (or `done` in all, when the caller counts)."""
        self.done = self.done + added if done is None else done
        if self.bar is not None:
            self.bar.update(added)
        elif self.lines is not None and time.monotonic() - self.last >= self.every_s:
            print(f"{self.label}: {self.lines.line(self.done)} {self.unit}s", file=sys.stderr, flush=True)
            self.last = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Progress:
    """`step/total (pct), eta` for log lines where no progress bar can be drawn (a pod's log). The rate is
    measured from the first step this process logged, so start-up and a resume do not skew it."""

    def __init__(self, total: int, clock: Any = time.monotonic):
        self.total, self.clock = total, clock
        self.first: tuple[int, float] | None = None

    def eta_s(self, step: int) -> float | None:
        now = self.clock()
        if self.first is None:
            self.first = (step, now)
        first_step, first_time = self.first
        if step <= first_step or now <= first_time:
            return None
        return (self.total - step) * (now - first_time) / (step - first_step)

    def line(self, step: int) -> str:
        eta = self.eta_s(step)
        return f"{step}/{self.total} ({100 * step / self.total:.1f}%), eta {format_duration(eta)}"


def format_duration(seconds: float | None) -> str:
    """1h02m, 3m05s, 42s; '?' when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _remove_scratch(path: str, owner: int) -> None:
    """Delete a scratch folder of process `owner`; nothing in another process (a forked DataLoader worker
    holds a copy of the object that owns it, and its copy must not delete the parent's folder)."""
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


class TensorBoard:
    """Scalars to `{run}/tb/`; for remote run dirs the event files are written to a scratch folder, uploaded on
    flush, and the scratch folder removed on close (or when the writer is dropped on an error path: a pod's
    restarts and a test suite's hundreds of runs would otherwise pile them up in /tmp). Without the optional
    `tensorboard` package this does nothing."""

    def __init__(self, run_dir: str):
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.remote_dir = None if fs.is_local(run_dir) else fs.join(run_dir, "tb")
        if self.remote_dir is None:
            self.local_dir = fs.join(run_dir, "tb")
        else:
            self.local_dir = tempfile.mkdtemp(prefix="clipjob-tb-")
            self._scratch = weakref.finalize(self, _remove_scratch, self.local_dir, os.getpid())
        self.writer = SummaryWriter(self.local_dir)

    def add(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, record["step"])

    def flush(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self.remote_dir is not None:
            for name in os.listdir(self.local_dir):
                with open(os.path.join(self.local_dir, name), "rb") as f:
                    fs.write_bytes(fs.join(self.remote_dir, name), f.read())

    def close(self) -> None:
        if self.writer is not None:
            self.flush()
            self.writer.close()
            self.writer = None
            if self.remote_dir is not None:
                self._scratch()  # uploaded: the scratch copy goes


class Throughput:
    """Samples, FLOPs and data-wait time since the previous log line, turned into rates.

    `remeasure`: how to measure the peak again (the measured peaks of CPUs and unknown GPUs). A peak measured
    while other processes held the cores reads low, and every MFU after it high (2.2 on a demo started beside a
    test suite): a rate above the peak means exactly that, so the peak is measured again then (at most
    MAX_REMEASURES times a run), the higher value kept, and the log says so."""

    MAX_REMEASURES = 3

    def __init__(self, world_size: int, peak_flops: float, remeasure: Callable[[], float] | None = None):
        self.world_size, self.peak = world_size, peak_flops
        self.remeasure, self.remeasured = remeasure, 0
        self._reset()

    def _reset(self) -> None:
        self.t0, self.wait, self.steps, self.samples, self.flops = time.monotonic(), 0.0, 0, 0, 0.0

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def stepped(self, local_samples: int, local_flops: float) -> None:
        self.steps += 1
        self.samples += local_samples
        self.flops += local_flops

    def take(self) -> dict[str, float]:
        dt = max(time.monotonic() - self.t0, 1e-9)
        per_device = self.samples / dt
        out = {"samples_per_s": per_device * self.world_size, "samples_per_s_per_device": per_device,
               "step_time_s": dt / max(1, self.steps), "data_wait_frac": self.wait / dt,
               "tflops_per_device": self.flops / dt / 1e12,
               "mfu": self.flops / dt / self.peak if self.peak > 0 else None}
        if out["mfu"] is not None and out["mfu"] > 1 and self.remeasure and self.remeasured < self.MAX_REMEASURES:
            self.remeasured += 1
            was, self.peak = self.peak, max(self.peak, self.remeasure())
            print(f"mfu: {self.flops / dt / 1e12:.3g} TFLOP/s reached, above the peak measured at the start "
                  f"({was / 1e12:.3g}: the machine was busier then); peak measured again: {self.peak / 1e12:.3g} "
                  f"TFLOP/s", flush=True)
            out["mfu"] = self.flops / dt / self.peak
        self._reset()
        return out


def read_jsonl(url: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] when there is none). A line that is not a whole JSON object (a write
    cut short: a killed process, a full disk) is skipped, with one warning line saying how many."""
    if not fs.exists(url):
        return []
    rows, bad = [], 0
    for line in fs.read_text(url).splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        print(f"warning: {url}: skipped {bad} unreadable line(s) (a write cut short?)", file=sys.stderr, flush=True)
    return rows
