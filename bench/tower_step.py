"""Isolated training-step time of several configs side by side (sizing one image tower against another).

    OMP_NUM_THREADS=2 .venv/bin/python bench/tower_step.py tiny-cpu tiny-cpu-resnet
    OMP_NUM_THREADS=2 .venv/bin/python bench/tower_step.py tiny-cpu-resnet "tiny-cpu-resnet;nchw"

Each argument is a preset with optional `;key=value` overrides (`;nchw`: a resnet tower without its
channels_last input). Each config is built as the trainer builds it
(trainer.build_parts, pretrained MiniLM where the preset has it) and runs its step as the trainer does
(step.forward_backward + step.optimizer_step) on a fixed synthetic batch (uniform images at the model's size,
distinct captions: a frozen MiniLM's cached features hit after the first step, as after the first epoch).
The configs' steps are interleaved (ABAB...) so a busy neighbour slows all alike; 2 warm-up rounds, then the
median, min and max of `--steps` rounds are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from clipjob import dist  # noqa: E402
from clipjob.config import build_config  # noqa: E402
from clipjob.model import build_tokenizer  # noqa: E402
from clipjob.train.step import forward_backward, optimizer_step  # noqa: E402
from clipjob.train.trainer import build_parts  # noqa: E402


def build_side(spec: str, precision: str):
    preset, *sets = spec.split(";")
    nchw = "nchw" in sets
    sets = [s for s in sets if s != "nchw"]
    cfg = build_config(preset, None, [f"train.precision={precision}", *sets])
    parts = build_parts(cfg, dist.DistInfo(0, 0, 1, torch.device("cpu")))
    visual = parts.model.visual
    if nchw and cfg.model.vision.family == "resnet":
        visual.forward = lambda x: visual.attn_pool(visual.stages(visual.stem(x)))
    b, s = cfg.train.batch_size, cfg.model.vision.image_size
    tokens = build_tokenizer(cfg.model)([f"a picture of thing {i}" for i in range(b)])
    images = torch.rand(b, 3, s, s)
    params = [p for p in parts.model.parameters() if p.requires_grad]

    def step() -> None:
        forward_backward(parts.model, parts.model, parts.loss_fn, images, tokens, accum_steps=1,
                         precision=precision, scaler=None)
        optimizer_step(parts.opt, None, params, list(parts.loss_fn.parameters()), 0.0)

    return step, f"{spec}: {s} px, batch {b}, image tower {sum(p.numel() for p in visual.parameters()):,} params"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    args = ap.parse_args()
    sides = [build_side(c, args.precision) for c in args.configs]
    times: list[list[float]] = [[] for _ in sides]
    for i in range(args.steps + 2):
        for (step, _), t in zip(sides, times):
            t0 = time.perf_counter()
            step()
            if i >= 2:
                t.append(time.perf_counter() - t0)
    for (_, label), t in zip(sides, times):
        print(f"{label}: median {statistics.median(t) * 1e3:.0f} ms (min {min(t) * 1e3:.0f}, "
              f"max {max(t) * 1e3:.0f}) over {len(t)} steps")


if __name__ == "__main__":
    main()
