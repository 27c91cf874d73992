"""pipeline.py: batches built in workers, seeded resampling per rank/worker (no rank runs dry), weighted
sources, per-step batch shapes (multi-scale hook), one-line errors out of workers."""

from __future__ import annotations

import io
import os
import random
from collections import Counter

import pytest
import torch
from PIL import Image

from clipjob.config import DataConfig
from clipjob.data import pipeline
from clipjob.data.pipeline import Batch, build_train_loader
from clipjob.data.transforms import to_unit_float
from clipjob.datasets.writer import ShardWriter
from clipjob.errors import ClipjobError


def png(color: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def write_shards(out: str, shards: int, per_shard: int, tag: str = "a") -> str:
    with ShardWriter(out, prefix="s", max_samples=per_shard) as w:
        for i in range(shards * per_shard):
            w.write(f"{i:06d}", {"png": png((i % 256, 0, 0)), "txt": f"{tag} {i}"})
    return out


def tokenize(captions: list[str]) -> torch.Tensor:
    """Caption 'a 12' -> [ord('a'), 12]: lets tests see which samples a batch holds."""
    return torch.tensor([[ord(c[0]), int(c.split()[1])] for c in captions])


def loader(spec: str, batch: int = 4, size: int = 16, workers: int = 0, rank: int = 0, seed: int = 0, **kw):
    data = DataConfig(train=spec, num_workers=workers, shuffle_buffer=kw.pop("shuffle_buffer", 8), rrc_scale=(0.9, 1.0),
                      cache_mb=kw.pop("cache_mb", 0))
    return build_train_loader(data, batch_size=batch, image_size=size, tokenizer=tokenize, seed=seed, rank=rank,
                              start_step=0, **kw)


def take(dl, n: int) -> list[Batch]:
    it = iter(dl)
    return [next(it) for _ in range(n)]


def test_should_yield_batches_of_images_and_tokens_when_reading_shards(tmp_path):
    d = write_shards(str(tmp_path / "ds"), 2, 5)
    (b,) = take(loader(d), 1)
    assert b.images.shape == (4, 3, 16, 16) and b.images.dtype == torch.uint8  # a quarter of float's bytes
    x = to_unit_float(b.images)
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.max() > 0
    assert b.tokens.shape == (4, 2) and b.bad == {}


def test_should_repeat_the_stream_with_the_same_seed_and_differ_across_ranks(tmp_path):
    d = write_shards(str(tmp_path / "ds"), 4, 5)
    first = [b.tokens for b in take(loader(d), 3)]
    again = [b.tokens for b in take(loader(d), 3)]
    other_rank = [b.tokens for b in take(loader(d, rank=1), 3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other_rank, strict=True))


@pytest.mark.timeout(120)
def test_should_keep_every_rank_and_worker_fed_when_there_are_fewer_shards_than_workers_times_ranks(tmp_path):
    d = write_shards(str(tmp_path / "ds"), 1, 3)  # one shard for 2 ranks x 2 workers
    for rank in (0, 1):
        batches = take(loader(d, workers=2, rank=rank), 6)  # three batches from each worker
        assert all(b.images.shape[0] == 4 for b in batches)


def test_should_mix_sources_by_weight(tmp_path):
    a = write_shards(str(tmp_path / "a"), 4, 4, tag="a")
    b = write_shards(str(tmp_path / "b"), 4, 4, tag="b")
    tags = Counter(int(t) for batch in take(loader(f"{a}@0.8::{b}@0.2", batch=8, shuffle_buffer=0), 50)
                   for t in batch.tokens[:, 0])
    share_a = tags[ord("a")] / (tags[ord("a")] + tags[ord("b")])
    assert 0.7 < share_a < 0.9, share_a


def _keys(n: int):
    return iter([{"__key__": f"k{i:02d}"} for i in range(n)])


def test_should_shuffle_in_the_order_webdatasets_shuffle_gave_when_the_seed_is_fixed():
    """The expected orders were computed once with webdataset 1.0.2's filters._shuffle, which the pipeline used
    before shuffle_samples (same rng calls): the README's demo numbers depend on this order."""
    def order(n: int, size: int, initial: int, seed: int) -> list[str]:
        return [s["__key__"] for s in pipeline.shuffle_samples(_keys(n), size, initial, random.Random(seed))]

    assert order(20, 6, 6, 0) == ["k03", "k05", "k00", "k02", "k04", "k06", "k10", "k08", "k11", "k12", "k09", "k01",
                                  "k15", "k16", "k14", "k18", "k07", "k19", "k17", "k13"]
    assert order(20, 8, 3, 7) == ["k02", "k01", "k04", "k08", "k00", "k05", "k12", "k09", "k11", "k07", "k15", "k13",
                                  "k10", "k16", "k17", "k18", "k14", "k03", "k06", "k19"]
    assert order(5, 8, 3, 1) == ["k01", "k00", "k03", "k04", "k02"]  # the stream ends before the buffer fills


def test_should_batch_the_same_samples_as_before_when_the_seed_is_fixed(tmp_path):
    """Caption numbers of the first batches, computed once with the loader on webdataset's shuffle."""
    small = write_shards(str(tmp_path / "small"), 3, 5)
    assert [b.tokens[:, 1].tolist() for b in take(loader(small), 3)] == [[1, 3, 4, 3], [1, 2, 0, 2], [4, 0, 4, 1]]
    big = write_shards(str(tmp_path / "big"), 4, 50)
    assert [b.tokens[:, 1].tolist() for b in take(loader(big, batch=6, shuffle_buffer=150), 3)] == [
        [88, 59, 87, 65, 87, 71], [85, 59, 54, 53, 72, 52], [63, 94, 90, 78, 74, 84]]


class Schedule:
    """Multi-scale stand-in: (image size, batch) per step."""

    def __call__(self, step: int) -> tuple[int, int]:
        return (16, 4) if step % 3 == 0 else (8 + 8 * (step % 3), 2 + step % 3)


def test_should_follow_the_batch_schedule_in_step_order_when_workers_take_turns(tmp_path):
    d = write_shards(str(tmp_path / "ds"), 3, 6)
    sched = Schedule()
    for workers in (0, 2):
        batches = take(loader(d, workers=workers, batch_schedule=sched), 6)
        for step, b in enumerate(batches):
            size, n = sched(step)
            assert tuple(b.images.shape) == (n, 3, size, size), (workers, step)


@pytest.mark.timeout(120)
def test_should_fail_with_one_line_when_no_shard_is_readable(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "MIN_HOPELESS", 200)
    with pytest.raises(ClipjobError) as e:
        take(loader(f"{tmp_path}/missing-{{0..3}}.tar", workers=1), 1)
    msg = str(e.value)
    assert "\n" not in msg and "bad samples/shards in a row" in msg and "missing_shard" in msg


def test_should_scale_like_todtype_when_converting_uint8_batches():
    from torchvision.transforms import v2 as T

    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    torch.testing.assert_close(to_unit_float(x), T.ToDtype(torch.float32, scale=True)(x))
    f = torch.rand(2, 3, 5, 5)
    assert to_unit_float(f) is f


class _Niceness(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return os.nice(0)


class _ProcessGroup(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return os.getpgrp(), os.getpid()


def test_should_run_data_workers_in_a_process_group_of_their_own():
    """torchrun stops a rank with killpg(rank, SIGTERM): a worker in the rank's group would die of it and
    take the rank's stop step with it (tests/integration/test_stop.py runs that for real)."""
    from clipjob.data.pipeline import worker_init

    ((group, pid),) = list(torch.utils.data.DataLoader(_ProcessGroup(), batch_size=None, num_workers=1,
                                                       worker_init_fn=worker_init(0)))
    assert group == pid != os.getpid() and os.getpgrp() != group


def test_should_run_data_workers_at_the_added_niceness():
    from clipjob.data.pipeline import worker_init

    base = os.nice(0)
    got = list(torch.utils.data.DataLoader(_Niceness(), batch_size=None, num_workers=1,
                                           worker_init_fn=worker_init(7)))
    assert got == [min(19, base + 7)] * 2
    assert os.nice(0) == base  # the parent keeps its priority


def test_should_wait_through_poll_timeouts_when_iterated_plainly(tmp_path, monkeypatch):
    """The loader polls its workers every POLL_S so the trainer can look at its stop flag (next_batch); a plain
    `next()` (benches, tools) must still wait for the batch however slow the workers are, not raise. Here POLL_S
    is 1 ms, far below a batch's decode time, so nearly every batch arrives after at least one poll timeout."""
    from clipjob.data import pipeline

    monkeypatch.setattr(pipeline, "POLL_S", 0.001)
    spec = write_shards(str(tmp_path / "ds"), shards=2, per_shard=8)
    it = iter(loader(spec, batch=4, workers=1))
    timeouts = 0
    for _ in range(3):  # the poll interface does time out...
        while True:
            try:
                it.poll()
                break
            except pipeline.BatchTimeout:
                timeouts += 1
    assert timeouts > 0
    assert all(next(it).images.shape[0] == 4 for _ in range(16))  # ...plain iteration never does (past the prefetch)


def test_should_give_one_loss_group_per_json_value_and_its_own_to_a_sample_without_it(tmp_path):
    """data.positives_key=concept: rows whose .json concept is equal share a group id, in DataLoader workers;
    rows with no .json, broken JSON or no such field each get a group of their own; the stream is the same."""
    out = str(tmp_path / "ds")
    with ShardWriter(out, prefix="s", max_samples=10) as w:
        for i in range(40):
            sample = {"png": png((i % 256, 0, 0)), "txt": f"a {i}"}
            if i % 5 == 1:
                pass  # no .json at all
            elif i % 5 == 2:
                sample["json"] = {"style": "x"}  # no concept field
            elif i % 5 == 3:
                sample["json"] = b"{not json"
            else:
                sample["json"] = {"concept": f"c{i % 3}", "style": "y"}
            w.write(f"{i:06d}", sample)

    def group_of(i: int):
        return f"c{i % 3}" if i % 5 in (0, 4) else None

    data = DataConfig(train=out, num_workers=2, shuffle_buffer=8, rrc_scale=(0.9, 1.0), positives_key="concept")
    dl = build_train_loader(data, batch_size=8, image_size=16, tokenizer=tokenize, seed=0, rank=0, start_step=0)
    batches = take(dl, 6)
    rows = [(int(t[1]), int(g)) for b in batches for t, g in zip(b.tokens, b.groups, strict=True)]
    assert all(b.groups.dtype == torch.int64 and b.groups.shape == (8,) for b in batches)
    for i, gi in rows:
        for j, gj in rows:
            if i != j:
                expect_same = group_of(i) is not None and group_of(i) == group_of(j)
                assert (gi == gj) == expect_same, (i, j, gi, gj)
    assert any(group_of(i) is None for i, _ in rows) and len({g for _, g in rows}) > 3
    plain = take(loader(out, batch=8, workers=2), 6)
    assert all(b.groups is None for b in plain)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(plain, batches, strict=True))


def write_noise_shards(out: str, shards: int, per_shard: int, corrupt: tuple[int, ...] = ()) -> str:
    """Shards of random-noise pictures (every crop box gives other pixels); samples numbered in `corrupt` get
    bytes that are no image."""
    gen = torch.Generator().manual_seed(0)
    with ShardWriter(out, prefix="s", max_samples=per_shard) as w:
        for i in range(shards * per_shard):
            buf = io.BytesIO()
            Image.fromarray(torch.randint(0, 256, (24, 24, 3), dtype=torch.uint8, generator=gen).numpy()).save(buf, "PNG")
            w.write(f"{i:06d}", {"png": b"not a png" if i in corrupt else buf.getvalue(), "txt": f"a {i}"})
    return out


def counting_reads(monkeypatch) -> Counter:
    reads: Counter = Counter()
    real = pipeline.read_tar_samples

    def read(url, *a, **kw):
        reads[url] += 1
        return real(url, *a, **kw)

    monkeypatch.setattr(pipeline, "read_tar_samples", read)
    return reads


@pytest.mark.timeout(120)
def test_should_give_the_same_batches_bit_for_bit_with_the_decoded_cache_as_without(tmp_path):
    # 3 shards of 5 samples, 2 workers, 12 batches of 4: every worker draws its shards many times, so most
    # batches come from the cache's replays; pictures and captions must be those of the uncached stream
    d = write_noise_shards(str(tmp_path / "ds"), 3, 5)
    plain = take(loader(d, workers=2), 12)
    cached = take(loader(d, workers=2, cache_mb=64), 12)
    for a, b in zip(plain, cached, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens) and a.bad == b.bad == {}
    assert len({int(t) for b in cached for t in b.tokens[:, 1]}) == 15  # every sample seen


def test_should_read_each_shard_once_when_the_decoded_cache_holds_it(tmp_path, monkeypatch):
    d = write_noise_shards(str(tmp_path / "ds"), 3, 5)
    reads = counting_reads(monkeypatch)
    take(loader(d, cache_mb=64), 12)
    assert sorted(reads.values()) == [1, 1, 1]
    reads.clear()
    take(loader(d), 12)  # without the cache every draw reads its shard
    assert sum(reads.values()) > 6


def test_should_stop_adding_shards_at_the_cache_cap(tmp_path, monkeypatch):
    # 24x24x3 = 1,728 bytes a picture: a 1 MiB cap holds 606 pictures, so 600-sample shards fit one at a time
    d = write_noise_shards(str(tmp_path / "ds"), 2, 600)
    reads = counting_reads(monkeypatch)
    take(loader(d, batch=100, cache_mb=1, shuffle_buffer=0), 40)  # 4,000 samples: ~6.7 draws of 600
    read_more = [u for u, n in reads.items() if n > 1]
    assert len(reads) == 2 and len(read_more) == 1, reads  # the first shard in stays; the other is read each time


def test_should_count_a_bad_picture_on_every_read_and_not_cache_its_shard(tmp_path, monkeypatch):
    d = write_noise_shards(str(tmp_path / "ds"), 2, 5, corrupt=(7,))  # sample 7: the second shard
    for cache_mb in (0, 64):
        reads = counting_reads(monkeypatch)
        batches = take(loader(d, cache_mb=cache_mb), 10)
        bad = sum(b.bad.get("corrupt_image", 0) for b in batches)
        assert bad >= 2, (cache_mb, bad)  # counted again on later reads, not cached away
        assert all(7 not in b.tokens[:, 1].tolist() for b in batches)
        if cache_mb:
            clean, dirty = sorted(reads.values())
            assert clean == 1 and bad <= dirty, reads  # the clean shard read once, the other on each draw


@pytest.mark.parametrize("value, message", [("-1", "must be >= 0"), ("64", "needs data.decode=cpu")])
def test_should_reject_a_bad_cache_setting_in_one_line(value, message):
    from clipjob.config import build_config
    from clipjob.errors import ConfigError
    sets = [f"data.cache_mb={value}"] + (["data.decode=gpu"] if value == "64" else [])
    with pytest.raises(ConfigError, match=message):
        build_config("tiny-cpu-scratch", None, sets)


def test_should_give_a_training_worker_glibcs_malloc_defaults_back_when_it_starts(monkeypatch):
    """The trainer keeps freed memory mapped (hostmem); its DataLoader workers, forked from it, go back to glibc's
    defaults in start_worker, as zero-shot eval's do: with the setting, the demo's worker heap grew to 5 GiB past
    its 1 GiB picture cache. Checked in a forked child, as a worker is made."""
    from clipjob import hostmem
    from clipjob.data.pipeline import start_worker

    monkeypatch.setenv("CLIPJOB_MALLOC", "keep")
    pid = os.fork()
    if pid == 0:  # the child: the trainer's setting, then a worker's start
        hostmem._applied = None
        ok = hostmem.tune_malloc() and hostmem._applied
        start_worker(0)
        os._exit(0 if ok and hostmem._applied is False else 1)
    assert os.waitpid(pid, 0)[1] == 0
