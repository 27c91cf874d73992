"""Helpers for tests that run `clipjob train` for real: tiny synthetic shards, the tiny-model overrides, and a
launched training process whose output is followed line by line (to act mid-run)."""

from __future__ import annotations

import io
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import TINY_MODEL
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
          "purple": (140, 40, 170), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (250, 250, 250)}
SHAPES = ("square", "circle", "triangle")

# The model of the integration runs: the tests' tiny model (tests/conftest.py) at width 64 with two layers per
# tower, 32 px images (patch 8), 16 text tokens and 32-d embeddings.
RUN_MODEL = [*TINY_MODEL, "model.vision.width=64", "model.vision.layers=2", "model.vision.image_size=32",
             "model.text.width=64", "model.text.layers=2", "model.text.context_length=16", "model.embed_dim=32"]
# RUN_MODEL trained in seconds: 8 samples per rank, fp32, no DataLoader worker processes, no peak-FLOP/s timing
TINY = [*RUN_MODEL, "train.batch_size=8", "train.log_every=1", "train.warmup_steps=2", "train.lr=2e-3",
        "data.num_workers=0", "data.shuffle_buffer=64", "train.precision=fp32", "train.threads=1",
        "train.peak_flops=2e11"]


def _png(color: tuple[int, int, int], shape: str, rng: random.Random) -> bytes:
    bg = tuple(rng.randrange(90, 170) for _ in range(3))
    img = Image.new("RGB", (40, 40), bg)
    d = ImageDraw.Draw(img)
    x, y, s = rng.randrange(2, 10), rng.randrange(2, 10), rng.randrange(22, 28)
    if shape == "square":
        d.rectangle([x, y, x + s, y + s], fill=color)
    elif shape == "circle":
        d.ellipse([x, y, x + s, y + s], fill=color)
    else:
        d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_shards(out: str | Path, samples: int = 256, per_shard: int = 64, seed: int = 0) -> str:
    """Synthetic image-caption shards ("a red circle") with a manifest; returns the directory."""
    from clipjob.datasets.writer import ShardWriter

    rng = random.Random(seed)
    with ShardWriter(str(out), prefix="train", max_samples=per_shard) as w:
        for i in range(samples):
            color = rng.choice(list(COLORS))
            shape = rng.choice(SHAPES)
            w.write(f"s{i:06d}", {"png": _png(COLORS[color], shape, rng), "txt": f"a {color} {shape}"})
    return str(out)


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def train_argv(data: str, run_dir: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "clipjob", "train", "--preset", "tiny-cpu-scratch", "--run-dir", run_dir,
            *sets(f"data.train={data}", *TINY, *overrides)]


def stop_line_step(output: str) -> int:
    """The step of rank 0's "stop requested...: saved step k, exiting" line. The line says "while waiting for
    data" when any rank was still waiting for its batch as the stop came: with loader workers that happens at
    random, so a test that does not hold the data accepts both."""
    m = re.search(r"stop requested(?: while waiting for data)?: saved step (\d+), exiting", output)
    assert m, output
    return int(m[1])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """A `clipjob train` subprocess in its own session; its stdout+stderr is collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line arrived
        self.seen_pids: set[int] = set()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.times.append(time.monotonic())
            self.lines.append(line.rstrip("\n"))
            self.seen_pids.update(self.children())  # remembered for cleanup, even once orphaned

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        """The first output line matching `pattern` (regex); fails if the process ends or time runs out."""
        rx = re.compile(pattern)
        deadline = time.time() + timeout
        seen = 0
        while time.time() < deadline:
            while seen < len(self.lines):
                m = rx.search(self.lines[seen])
                seen += 1
                if m:
                    return m
            if self.proc.poll() is not None and seen >= len(self.lines):
                self._reader.join(5)
                if seen >= len(self.lines):
                    raise AssertionError(f"process exited ({self.proc.returncode}) before {pattern!r}:\n{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.output}")

    def time_of(self, pattern: str) -> float:
        """When the first line matching `pattern` arrived (time.monotonic)."""
        rx = re.compile(pattern)
        return next(t for t, line in zip(self.times, self.lines) if rx.search(line))

    def wait(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"run did not finish within {timeout} s:\n{self.output}") from None
        self._reader.join(10)
        return rc

    def children(self) -> list[int]:
        """PIDs of the direct children of the launched process (torchrun's workers)."""
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(entry))
        return sorted(out)

    def kill_all(self) -> None:
        """SIGKILL the launched process and its workers (torchrun starts each in its own session): cleanup
        after a test, whatever state it ended in."""
        for pid in {*self.seen_pids, *self.children()}:
            try:
                if b"clipjob" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
