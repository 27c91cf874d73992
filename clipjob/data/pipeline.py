"""The training data pipeline: resampled shards -> tar samples -> seeded shuffle buffer -> decode + augment
-> batches with tokenised captions, all inside DataLoader workers.

Every (rank, worker) draws shards with replacement from its own RNG, seeded from (seed, rank, worker, start
step), first picking a source (as often as makes its weight its share of the samples), then a shard of it
(`shards.draw_shards`). So no rank or worker ever runs dry (no DDP hang on uneven shards, even with fewer
shards than ranks x workers) and a restart at step N gets a fresh, reproducible stream. Bad samples and
unreadable shards are skipped and counted by reason; the counts ride along with each batch so the trainer
can log them and stop past `data.max_bad_fraction`.

Batch shapes can change per step (multi-scale training): `batch_schedule(step) -> (image_size, batch_size)`
is called by the worker that produces that step's batch. DataLoader hands batches out round-robin, so worker
k of W produces steps start_step + k, start_step + k + W, ...

Waiting is bounded (`next_batch`): a shard read whose storage stops answering is retried for up to
`data.stall_timeout_s`, then the worker raises a one-line RetryableError naming the shard URL (exit 203); the
trainer polls while it waits, so a stop request (SIGTERM) during the wait is seen within a second.

With data.decode=gpu the workers decode no JPEG pixels: a JPEG travels as its bytes and its crop box, and the
trainer decodes the batch's JPEGs on its device (device_decode.py); other images are decoded here as always.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.v2.functional import pil_to_tensor

from clipjob import fs
from clipjob.config import DataConfig
from clipjob.data.decode import IMAGE_KEYS, BadSample, decode_caption, decode_image, group_id
from clipjob.data.device_decode import EncodedJpegs, plan_jpeg
from clipjob.data.shards import (Source, derive_seed, draw_shards, equal_size_note, parse_sources,
                                 read_tar_samples)
from clipjob.data.transforms import Augment, RandomResizedCrop, augment_steps, train_transform
from clipjob.errors import ClipjobError, ConfigError, RetryableError
from clipjob.hostmem import restore_malloc

BatchSchedule = Callable[[int], tuple[int, int]]  # step -> (image_size, batch_size)
MIN_HOPELESS = 10_000  # bad samples/shards in a row, with nothing good in between, before giving up
POLL_S = 1.0  # how often a trainer waiting for its DataLoader workers looks at its stop flag
_END: dict = {}  # shuffle_samples' end-of-stream marker: compared by identity, never yielded
DECODED = "__decoded__"  # a sample of data.cache_mb's cache: its picture, decoded once (uint8 (3, H, W))


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) uint8 (transforms.to_unit_float makes it float in [0, 1]); with `jpegs`
    # only the rows decoded in the worker, in row order: device_decode.materialize makes the whole batch
    tokens: torch.Tensor  # (B, context_length) long
    bad: dict[str, int] = field(default_factory=dict)  # samples skipped since the previous batch, by reason
    jpegs: EncodedJpegs | None = None  # data.decode=gpu: the JPEG rows, still encoded (None: all in `images`)
    replaced: int = 0  # rows holding a copy of another row (a corrupt JPEG found on the device), also in `bad`
    groups: torch.Tensor | None = None  # (B,) int64 with data.positives_key: equal ids are positives in the loss


class ConstantSchedule:
    """The default batch schedule: the same (image_size, batch_size) every step."""

    def __init__(self, image_size: int, batch_size: int):
        self.shape = (image_size, batch_size)

    def __call__(self, step: int) -> tuple[int, int]:
        return self.shape


class ShardStream(IterableDataset):
    """An endless stream of augmented, tokenised batches for one rank. `urls` is a list of shard URLs (one
    source) or of `Source`s (weighted mix)."""

    def __init__(self, urls: list[str] | list[Source], batch_size: int, image_size: int, tokenizer: Callable,
                 seed: int = 0, rank: int = 0, start_step: int = 0, shuffle_buffer: int = 1000,
                 rrc_scale: tuple[float, float] = (0.9, 1.0), caption_key: str = "txt",
                 augment: Augment = Augment(), batch_schedule: BatchSchedule | None = None,
                 stall_s: float | None = None, decode: str = "cpu", positives_key: str = "", cache_mb: int = 0):
        if urls and isinstance(urls[0], str):
            urls = [Source("", tuple(urls), 1.0, None)]  # type: ignore[arg-type]
        self.sources: list[Source] = list(urls)  # type: ignore[arg-type]
        self.batch_size, self.image_size, self.tokenizer = batch_size, image_size, tokenizer
        self.seed, self.rank, self.start_step = seed, rank, start_step
        self.shuffle_buffer, self.rrc_scale, self.caption_key = shuffle_buffer, rrc_scale, caption_key
        self.augment = augment
        self.decode = decode  # "gpu": JPEGs travel encoded, with their crop box (device_decode)
        self.positives_key = positives_key  # a .json field: samples sharing its value are positives (loss groups)
        self.crop = RandomResizedCrop(1, rrc_scale)  # draws decode=gpu's boxes (its size is not used)
        self.schedule = batch_schedule or ConstantSchedule(image_size, batch_size)
        self.n_shards = sum(len(s.urls) for s in self.sources)
        self.stall_s = stall_s  # longest wait for storage that does not answer (None: the process's bound)
        self.cache_mb = cache_mb  # data.cache_mb: decoded shards kept in each worker's memory (0 = none)
        # a cached picture serves every size of the schedule: JPEGs are decoded (draft mode) for the largest
        self.cache_target = max(getattr(self.schedule, "sizes", None) or (image_size,))
        self.in_process = True  # read by the trainer process (num_workers=0): reads stop on a stop request

    def _samples(self, rng: random.Random, bad: Counter) -> Iterator[dict]:
        cache = ShardCache(self.cache_mb) if self.cache_mb else None
        for url in draw_shards(self.sources, rng):
            if cache is None:
                yield from read_tar_samples(url, bad, self.stall_s, interruptible=self.in_process)
            elif (kept := cache.get(url)) is not None:
                yield from kept
            else:
                yield from self._read_decoded(url, bad, cache)
            yield {}  # end of shard: lets the consumer notice shards that gave nothing

    def _read_decoded(self, url: str, bad: Counter, cache: "ShardCache") -> Iterator[dict]:
        """The shard's samples with their pictures decoded here (a bad one is counted and skipped); the shard
        goes into `cache` when it was read whole with nothing bad in it."""
        mine: Counter = Counter()  # this shard's bad counts (the consumer clears `bad` at every batch)
        kept, nbytes, clean = [], 0, True
        for sample in read_tar_samples(url, mine, self.stall_s, interruptible=self.in_process):
            try:
                img = pil_to_tensor(decode_image(sample, self.cache_target))
            except BadSample as e:
                mine[e.reason] += 1
                img = None
            if mine:  # a bad picture, or one the shard reader counted (a duplicate key)
                bad.update(mine)
                mine.clear()
                clean = False
            if img is not None:
                sample = {k: v for k, v in sample.items() if k not in IMAGE_KEYS}
                sample[DECODED] = img
                kept.append(sample)
                nbytes += img.numel()
                yield sample
        bad.update(mine)
        if clean and not mine:
            cache.add(url, kept, nbytes)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:  # a DataLoader worker: its rank decides when to stop; requests fit the data bound
            self.in_process = False
            fs.on_stop(None)
        if self.stall_s is not None:
            fs.cap_request_timeouts(self.stall_s)
        seed = derive_seed(self.seed, self.rank, worker, self.start_step)
        rng = random.Random(seed)
        torch.manual_seed(seed)
        bad: Counter = Counter()
        transforms: dict[int, Callable] = {}
        samples: Iterator[dict] = self._samples(rng, bad)
        if self.shuffle_buffer > 1:
            samples = shuffle_samples(samples, self.shuffle_buffer, min(self.shuffle_buffer, 100), rng)
        hopeless = max(MIN_HOPELESS, 20 * self.n_shards)
        step = self.start_step + worker
        size, batch_size = self.schedule(step)
        images, captions, groups = [], [], []
        # ids for samples without the field: distinct across ranks and workers (a 64-bit hash hits one with odds ~2^-40)
        own = -(2**62) - (self.rank << 48) - (worker << 40)
        bad_before, bad_at_last_good = 0, 0  # bad counts of earlier batches; the total when last good
        for sample in samples:
            if sample:  # {} marks the end of a shard: no sample, but a chance to notice failing shards
                try:
                    caption = decode_caption(sample, self.caption_key)
                    images.append(self._image(sample, size, transforms))
                    captions.append(caption)
                    if self.positives_key:
                        gid = group_id(sample, self.positives_key)
                        own, gid = (own, gid) if gid is not None else (own + 1, own)
                        groups.append(gid)
                    bad_at_last_good = bad_before + sum(bad.values())
                except BadSample as e:
                    bad[e.reason] += 1
            if bad_before + sum(bad.values()) - bad_at_last_good >= hopeless:
                raise ClipjobError(f"data.train: {hopeless} bad samples/shards in a row and nothing usable "
                                   f"({dict(bad)}); check the shards with `clipjob data inspect`")
            if len(images) == batch_size:
                batch = self._batch(images, self.tokenizer(captions), dict(bad), size)
                if self.positives_key:
                    batch.groups = torch.tensor(groups, dtype=torch.int64)
                yield batch
                bad_before += sum(bad.values())
                bad.clear()
                images, captions, groups = [], [], []
                step += n_workers
                size, batch_size = self.schedule(step)

    def _image(self, sample: dict, size: int, transforms: dict[int, Callable]) -> torch.Tensor | tuple:
        """The sample's image as a transformed uint8 (3, size, size) tensor, or with data.decode=gpu for a JPEG
        the device decodes, (its bytes, its crop box)."""
        cached = sample.get(DECODED)
        if cached is None and self.decode == "gpu":
            planned = plan_jpeg(sample, self.crop)
            if planned is not None:
                return planned
        if size not in transforms:
            transforms[size] = train_transform(size, self.rrc_scale, self.augment)
        return transforms[size](cached if cached is not None else decode_image(sample, size))

    def _batch(self, images: list, tokens: torch.Tensor, bad: dict[str, int], size: int) -> Batch:
        encoded = [k for k, im in enumerate(images) if isinstance(im, tuple)]
        if not encoded:
            return Batch(torch.stack(images), tokens, bad)
        decoded = [im for im in images if not isinstance(im, tuple)]
        seed = int(torch.randint(0, 2**62, ())) if augment_steps(self.augment) else None  # the device's augment RNG
        jpegs = EncodedJpegs.pack(encoded, [images[k][0] for k in encoded], [images[k][1] for k in encoded], size, seed)
        stacked = torch.stack(decoded) if decoded else torch.empty((0, 3, size, size), dtype=torch.uint8)
        return Batch(stacked, tokens, bad, jpegs)


class ShardCache:
    """Shards decoded once and kept in one worker's memory (data.cache_mb): URL -> its samples, each with its
    picture decoded (a uint8 tensor under DECODED, instead of its encoded bytes). Shards are added while the
    pictures' bytes stay within the cap; none is evicted (every shard is drawn alike, so any that fit serve as
    well as any other)."""

    def __init__(self, cap_mb: int):
        self.cap, self.used = cap_mb * 2**20, 0
        self.shards: dict[str, list[dict]] = {}

    def get(self, url: str) -> list[dict] | None:
        return self.shards.get(url)

    def add(self, url: str, samples: list[dict], nbytes: int) -> None:
        if self.used + nbytes <= self.cap:
            self.shards[url] = samples
            self.used += nbytes


def shuffle_samples(samples: Iterator[dict], size: int, initial: int, rng: random.Random) -> Iterator[dict]:
    """The stream through a buffer of up to `size` samples, in an order that only `rng` decides.

    While the buffer holds fewer than `size`, each incoming sample brings the next one along (the buffer fills
    twice as fast); once it holds `initial` (at most `size`), each step lets out one buffered sample chosen by
    `rng.randint`, its slot refilled by the last one; when the stream ends the buffer drains the same way.
    These are webdataset's `shuffle(bufsize, initial)` steps and rng calls, so a seed gives the order it gave
    (the README's demo numbers were measured with it)."""
    samples = iter(samples)
    initial = min(initial, size)
    buf: list[dict] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) < size:
            extra = next(samples, _END)
            if extra is not _END:
                buf.append(extra)
        if len(buf) >= initial:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list[dict], rng: random.Random) -> dict:
    """Take a random sample out of `buf`: its slot gets the last one."""
    k = rng.randint(0, len(buf) - 1)
    sample = buf[k]
    buf[k] = buf[-1]
    buf.pop()
    return sample


class TrainLoader(DataLoader):
    """A DataLoader whose worker-side ClipjobErrors surface as one-line errors of the same kind (torch wraps
    them in a multi-line traceback), and whose iterator can be waited on in slices (`next_batch`)."""

    def __iter__(self):
        return _Batches(super().__iter__())


class BatchTimeout(Exception):
    """No batch from the DataLoader workers within the loader's `timeout` (POLL_S); waiting on is fine."""


class _Batches:
    def __init__(self, it: Iterator):
        self.it = it

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> Batch:
        """The next batch, however long the workers take (a plain iterator: benches, tests, tools)."""
        while True:
            try:
                return self.poll()
            except BatchTimeout:
                continue

    def poll(self) -> Batch:
        """The next batch, or BatchTimeout after the loader's POLL_S without one (next_batch waits in slices)."""
        try:
            return next(self.it)
        except ClipjobError as e:
            raise type(e)(_original_message(str(e))) from None
        except RuntimeError as e:  # torch's loader says so in words only; its state allows waiting again
            if str(e).startswith("DataLoader timed out"):
                raise BatchTimeout() from None
            raise


def _original_message(text: str) -> str:
    markers = [f"{c.__name__}: " for c in (RetryableError, ConfigError, ClipjobError)]
    lines = [ln for ln in text.splitlines() if any(m in ln for m in markers)]
    if not lines:
        return text.splitlines()[0]
    marker = next(m for m in markers if m in lines[-1])
    return lines[-1].split(marker, 1)[1]


def next_batch(batches: Iterator[Batch], stop_requested: Callable[[], bool], stall_s: float) -> Batch | None:
    """The next batch, or None when `stop_requested()` turns true while waiting for it. Waits are bounded:
    a worker whose storage stops answering raises a RetryableError naming the shard after `stall_s`
    (data.stall_timeout_s); a loader that yields nothing for 2 x stall_s + 60 s without any error (a stuck
    worker) is a RetryableError too."""
    t0 = time.monotonic()
    poll = getattr(batches, "poll", batches.__next__)  # a loader without workers has no timeout to poll on
    while True:
        try:
            return poll()
        except BatchTimeout:  # nothing yet from the workers: look at the stop flag and the clock
            pass
        except fs.StopWaiting:  # a read in this process saw the stop request
            return None
        if stop_requested():
            return None
        waited = time.monotonic() - t0
        if waited > 2 * stall_s + 60:
            raise RetryableError(f"data.train: no batch from the DataLoader workers for {waited:.0f} s and no storage "
                                 f"error (data.stall_timeout_s={stall_s:g}); exiting as retryable")


def build_train_loader(data: DataConfig, *, batch_size: int, image_size: int, tokenizer: Callable, seed: int,
                       rank: int, start_step: int, batch_schedule: BatchSchedule | None = None,
                       prefetch_factor: int = 4) -> DataLoader:
    """The training loader of one rank: endless, in step order, batches built inside `data.num_workers` workers.
    `data` gives the shards and how to read them; the keywords are facts of the run (train.batch_size, the
    model's image size, train.seed, this rank, the step it starts at). `batch_schedule(step) -> (image_size,
    batch_size)` varies the batch shape per step (multi-scale)."""
    sources = parse_sources(data.train)
    note = equal_size_note(sources)
    if note and rank == 0:
        print(note, flush=True)
    stream = ShardStream(sources, batch_size, image_size, tokenizer, seed=seed, rank=rank,
                         start_step=start_step, shuffle_buffer=data.shuffle_buffer, rrc_scale=data.rrc_scale,
                         augment=Augment.of(data), caption_key=data.caption_key, batch_schedule=batch_schedule,
                         stall_s=data.stall_timeout_s, decode=data.decode, positives_key=data.positives_key,
                         cache_mb=data.cache_mb)
    workers = data.num_workers
    return TrainLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                       timeout=POLL_S if workers > 0 else 0,
                       persistent_workers=workers > 0,
                       prefetch_factor=prefetch_factor if workers > 0 else None, collate_fn=_identity,
                       worker_init_fn=worker_init(data.worker_nice))


def _identity(x):  # module-level so it pickles for spawn-started workers
    return x


def lower_priority(nice: int, _worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn` (as `functools.partial(lower_priority, nice)`): add `nice` to this worker's
    niceness. A CPU step's OpenMP threads wait at every barrier for the slowest of them, so a decoding
    worker that preempts one stalls all; at a lower priority the workers run in the gaps and whenever the
    trainer waits for a batch. Measured with 2 workers and 2 threads on 2 cores (nice 0 vs 19, 3 alternating
    pairs of `clipjob eval zeroshot` on bench/'s 2,000 images): eval +3-12 % fp32, +13-40 % bf16, every pair
    faster; CPU training with 1 worker: no change (fp32) or slower (bf16: the starved worker made the
    trainer wait), so `eval.worker_nice` defaults to 19 and `data.worker_nice` to 0."""
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:  # not permitted here: keep the inherited priority
            pass


def start_worker(nice: int, _worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn` of the training loader (as `functools.partial(start_worker, nice)`).

    The worker leaves the rank's process group first. torchrun stops a rank with `killpg(rank, SIGTERM)`
    (and a shell's Ctrl-C or `kill -- -PGID` signals the group too); a worker in that group dies of it, and
    the rank's next step fails with "DataLoader worker ... is killed by signal: Terminated" before it can
    commit its stop step. In a group of its own only the rank's main process gets the signal: it finishes
    the step, commits it, and the loader shuts the workers down. (Ignoring SIGTERM in the worker instead
    would also ignore the loader's own `terminate()` and could hang the interpreter's exit.) A worker whose
    rank is SIGKILLed still ends: the loader's watchdog sees its parent gone within seconds.

    It also goes back to glibc's malloc defaults (hostmem.restore_malloc), as zero-shot eval's workers do: the
    keep-freed-memory setting it inherits from the trainer pays off for the step's big buffers, but in a worker
    that decodes pictures and keeps some (data.cache_mb) it let the heap grow past the cache and never shrink
    (the demo's worker: a 5 GiB heap at step 150 with a 1 GiB cache, and growing)."""
    os.setpgid(0, 0)
    restore_malloc()
    lower_priority(nice)


def worker_init(nice: int) -> Callable[[int], None]:
    return functools.partial(start_worker, nice)
