"""The training data pipeline: resampled shards -> tar samples -> shuffle -> decode + augment -> batches
with tokenised captions, all inside DataLoader workers.

Every (rank, worker) draws shards with replacement from its own RNG, seeded from (seed, rank, worker,
start step), so no rank or worker ever runs dry (no DDP hang on uneven shards) and a restart at step N gets
a fresh, reproducible stream. Bad samples are skipped and counted by reason; the counts ride along with each
batch so the trainer can log them and stop past `data.max_bad_fraction`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipjob.data.decode import BadSample, decode_caption, decode_image
from clipjob.data.shards import derive_seed, expand_shard_urls, register_gopen_handlers
from clipjob.data.transforms import train_transform


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1]
    tokens: torch.Tensor  # (B, context_length) long
    bad: dict[str, int] = field(default_factory=dict)  # samples skipped since the previous batch, by reason


class _Counter:
    def __init__(self) -> None:
        self.bad: Counter = Counter()

    def shard_error(self, exn: Exception) -> bool:
        """webdataset handler: a truncated or unreadable shard is counted and skipped."""
        self.bad["bad_shard"] += 1
        return True

    def take(self) -> dict[str, int]:
        out, self.bad = dict(self.bad), Counter()
        return out


class ShardStream(IterableDataset):
    """An endless stream of augmented, tokenised batches for one rank."""

    def __init__(self, urls: list[str], batch_size: int, image_size: int, tokenizer: Callable,
                 seed: int = 0, rank: int = 0, start_step: int = 0, shuffle_buffer: int = 1000,
                 rrc_scale: tuple[float, float] = (0.9, 1.0), caption_key: str = "txt"):
        self.urls, self.batch_size, self.image_size, self.tokenizer = urls, batch_size, image_size, tokenizer
        self.seed, self.rank, self.start_step = seed, rank, start_step
        self.shuffle_buffer, self.rrc_scale, self.caption_key = shuffle_buffer, rrc_scale, caption_key

    def _shards(self, rng: random.Random) -> Iterator[dict]:
        while True:
            yield {"url": rng.choice(self.urls)}

    def __iter__(self) -> Iterator[Batch]:
        register_gopen_handlers()
        info = get_worker_info()
        worker = info.id if info else 0
        seed = derive_seed(self.seed, self.rank, worker, self.start_step)
        rng = random.Random(seed)
        torch.manual_seed(seed)
        counter = _Counter()
        transform = train_transform(self.image_size, self.rrc_scale)
        samples = wds.tarfile_to_samples(handler=counter.shard_error)(self._shards(rng))
        if self.shuffle_buffer > 1:
            samples = wds.filters._shuffle(samples, self.shuffle_buffer, min(self.shuffle_buffer, 100), rng)
        images, captions = [], []
        for sample in samples:
            try:
                caption = decode_caption(sample, self.caption_key)
                img = transform(decode_image(sample, self.image_size))
            except BadSample as e:
                counter.bad[e.reason] += 1
                continue
            images.append(img)
            captions.append(caption)
            if len(images) == self.batch_size:
                yield Batch(torch.stack(images), self.tokenizer(captions), counter.take())
                images, captions = [], []


def build_train_loader(spec: str, batch_size: int, image_size: int, tokenizer: Callable, *, seed: int, rank: int,
                       start_step: int, num_workers: int, shuffle_buffer: int,
                       rrc_scale: tuple[float, float], caption_key: str = "txt") -> DataLoader:
    urls = expand_shard_urls(spec)
    stream = ShardStream(urls, batch_size, image_size, tokenizer, seed=seed, rank=rank, start_step=start_step,
                         shuffle_buffer=shuffle_buffer, rrc_scale=rrc_scale, caption_key=caption_key)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
                      collate_fn=_identity)


def _identity(x):  # module-level so it pickles for spawn-started workers
    return x
