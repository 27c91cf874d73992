"""The multi-scale variable batch schedule (CoreNet's variable batch sampler): each step trains at one
resolution with a batch scaled by area, so every step costs about the same and the model sees many scales.

    sizes  = linspace(160, 320, 5) + the base 224       -> 160 192 224 256 288 320
    batch  = floor(base^2 * base_batch / (h * w))       -> 501 348 256 196 154 125 for base 224, batch 256

Pure: `schedule(step) -> (resolution, batch)` depends only on (seed, step), so every rank and every
DataLoader worker computes the same choice for the same step without communicating (equal per-rank batch
sizes are what the contrastive labels need), and a resumed run continues the same sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from clipjob.data.shards import derive_seed

_STREAM = 0x5CA1E  # separates this RNG stream from other users of derive_seed(seed, ...)


@dataclass(frozen=True)
class MultiScaleSchedule:
    sizes: tuple[int, ...]
    base_size: int
    base_batch: int
    seed: int = 0

    def batch_for(self, size: int) -> int:
        return max(1, (self.base_size * self.base_size * self.base_batch) // (size * size))

    def __call__(self, step: int) -> tuple[int, int]:
        size = self.sizes[random.Random(derive_seed(self.seed, _STREAM, step)).randrange(len(self.sizes))]
        return size, self.batch_for(size)


def build_schedule(sizes: list[int], base_size: int, base_batch: int, seed: int) -> MultiScaleSchedule:
    """The schedule for `data.multiscale_sizes` around the model's base resolution and `train.batch_size`.
    The base size always takes part. (config.validate checks that the largest size's batch still holds
    train.accum_steps micro-batches.)"""
    return MultiScaleSchedule(tuple(sorted(set(sizes) | {base_size})), base_size, base_batch, seed)
