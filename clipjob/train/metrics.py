"""Metrics: JSON lines in `{run}/metrics.jsonl` (rank 0), a progress bar on a TTY, plain lines otherwise."""

from __future__ import annotations

import json
import sys
import time
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
        self._remote = not fs.is_local(run_dir)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._pending.append(json.dumps(record, sort_keys=True) + "\n")
        # object stores have no append: batch lines to keep the read-modify-write cost down
        if not self._remote or time.monotonic() - self._last_flush > 30:
            self.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.get('loss', 0):.3f}", sps=f"{record.get('samples_per_s', 0):.0f}")
            self.bar.n = record["step"]
            self.bar.refresh()
        else:
            keys = ("loss", "lr", "logit_scale", "samples_per_s", "data_wait_frac")
            parts = " ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)
            print(f"step {record['step']}: {parts}", file=sys.stderr, flush=True)

    def flush(self) -> None:
        if self._pending:
            fs.append_text(self.url, "".join(self._pending))
            self._pending = []
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.flush()
        if self.bar is not None:
            self.bar.close()


def read_jsonl(url: str) -> list[dict[str, Any]]:
    if not fs.exists(url):
        return []
    return [json.loads(line) for line in fs.read_text(url).splitlines() if line.strip()]
