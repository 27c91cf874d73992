"""shards.py's mixing of `::` sources: weights are shares of SAMPLES, whatever the sources' shard sizes
(draw_shards, draw_weights), the equal-size fallback without a manifest and its log line (equal_size_note,
printed by pipeline.build_train_loader), and the mix as the training loader delivers it.

Tolerances come from binomial arithmetic, not from a run: each shard draw picks source A with the probability
p_A that makes A's expected share of samples the target share t (p_A = (t/m_A) / (t/m_A + (1-t)/m_B), m = mean
samples per shard), so the number of A draws among D lies within D p_A +- 5 sqrt(D p_A (1-p_A)) but for a
chance below 1e-6, and the share of samples within the shares those two counts give."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from shard_samples import png

from clipjob.config import DataConfig
from clipjob.data.manifest import shard_sample_counts
from clipjob.data.pipeline import build_train_loader
from clipjob.data.shards import draw_shards, draw_weights, equal_size_note, parse_sources
from clipjob.datasets.writer import ShardWriter

SIGMAS = 5


def write_source(out: str, shards: int, per_shard: int, tag: str, extra: int = 0) -> str:
    """`shards` shards of `per_shard` samples (+ one of `extra`), captions '<tag> <index>', with a manifest."""
    with ShardWriter(out, prefix="s", max_samples=per_shard) as w:
        for i in range(shards * per_shard + extra):
            w.write(f"{i:06d}", {"png": png(8), "txt": f"{tag} {i}"})
    return out


def tokenize(captions: list[str]) -> torch.Tensor:
    """Caption 'a 12' -> [ord('a'), 12]: which source and sample each row of a batch is."""
    return torch.tensor([[ord(c[0]), int(c.split()[1])] for c in captions])


@pytest.fixture
def small_and_big(tmp_path) -> tuple[str, str]:
    """A: 6 shards x 20 samples (120); B: 1 shard x 240 samples: B's shards are 12x A's."""
    return write_source(str(tmp_path / "a"), 6, 20, "a"), write_source(str(tmp_path / "b"), 1, 240, "b")


def draw_probability(share: float, mean_a: float, mean_b: float) -> float:
    """The chance per shard draw of picking A that gives A `share` of the samples."""
    return (share / mean_a) / (share / mean_a + (1 - share) / mean_b)


def count_bounds(draws: int, p: float) -> tuple[float, float]:
    """The binomial count of A draws out of `draws`, +- SIGMAS standard deviations (clipped to [0, draws])."""
    sd = math.sqrt(draws * p * (1 - p))
    return max(0.0, draws * p - SIGMAS * sd), min(float(draws), draws * p + SIGMAS * sd)


def share_bounds(draws: int, p: float, mean_a: float, mean_b: float) -> tuple[float, float]:
    """A's share of samples at the two ends of `count_bounds` (A's share grows with its draw count)."""
    def share(k: float) -> float:
        return k * mean_a / (k * mean_a + (draws - k) * mean_b)
    lo, hi = count_bounds(draws, p)
    return share(lo), share(hi)


@pytest.mark.parametrize("weights, share_a", [(("", ""), 120 / 360), (("@0.5", "@0.5"), 0.5),
                                              (("@0.7", "@0.3"), 0.7), (("@1", "@3"), 0.25)])
def test_should_give_each_source_its_share_of_samples_when_shard_sizes_differ(small_and_big, weights, share_a):
    a, b = small_and_big
    sources = parse_sources(f"{a}{weights[0]}::{b}{weights[1]}")
    size = {**shard_sample_counts(a), **shard_sample_counts(b)}
    draws = 20_000
    urls = [u for u, _ in zip(draw_shards(sources, random.Random(0)), range(draws), strict=False)]
    samples = Counter("a" if u.startswith(a) else "b" for u in urls for _ in range(size[u]))
    measured = samples["a"] / (samples["a"] + samples["b"])
    lo, hi = share_bounds(draws, draw_probability(share_a, 20, 240), 20, 240)
    # unweighted: 0.311-0.356 around 1/3 (the old draw, source by total samples then a shard: 0.04); 0.5/0.5:
    # 0.478-0.522 (old: 0.077)
    assert lo <= measured <= hi, (measured, lo, hi)
    assert hi - lo < 0.1  # the bound is tight enough to mean something


def test_should_deliver_half_the_samples_from_each_source_when_weighted_equally_in_the_loader(small_and_big):
    """The training loader itself, shuffle off (so each draw's samples come in a row: a draw starts at the first
    sample of a shard): about 270 draws, 10,000 samples. Under the old draw A got 1 sample in 13 (share 0.077)."""
    a, b = small_and_big
    data = DataConfig(train=f"{a}@0.5::{b}@0.5", num_workers=0, shuffle_buffer=0, rrc_scale=(0.9, 1.0))
    dl = iter(build_train_loader(data, batch_size=100, image_size=8, tokenizer=tokenize, seed=3, rank=0,
                                 start_step=0))
    tokens = [(chr(int(t[0])), int(t[1])) for _ in range(100) for t in next(dl).tokens]
    samples = Counter(tag for tag, _ in tokens)
    draws = Counter(tag for tag, i in tokens if i % (20 if tag == "a" else 240) == 0)
    n_draws, p = draws["a"] + draws["b"], draw_probability(0.5, 20, 240)
    lo, hi = count_bounds(n_draws, p)
    assert lo <= draws["a"] <= hi, (draws, lo, hi)  # 12 of 13 draws are A's (old: 1 of 2)
    s_lo, s_hi = share_bounds(n_draws, p, 20, 240)
    assert s_lo <= samples["a"] / len(tokens) <= s_hi, (samples, s_lo, s_hi)


def test_should_draw_sources_by_weight_over_mean_shard_size_when_every_source_has_a_manifest(tmp_path):
    a = write_source(str(tmp_path / "a"), 6, 20, "a", extra=10)  # 7 shards, 130 samples: mean 130/7
    b = write_source(str(tmp_path / "b"), 1, 240, "b")
    assert draw_weights(parse_sources(f"{a}@0.5::{b}@0.5")) == pytest.approx([0.5 * 7 / 130, 0.5 / 240])
    unweighted = draw_weights(parse_sources(f"{a}::{b}"))  # like one concatenated source: every shard alike
    assert unweighted[0] / unweighted[1] == pytest.approx(7 / 1)


def test_should_treat_shards_as_equal_in_size_when_a_weighted_source_has_no_manifest(small_and_big):
    a, b = small_and_big
    sources = parse_sources(f"{a}/*.tar@0.5::{b}@0.5")  # a glob: no sample counts for A
    assert draw_weights(sources) == [0.5, 0.5]
    note = equal_size_note(sources)
    assert note is not None and f"{a}/*.tar" in note and "\n" not in note and b not in note


def test_should_log_no_fallback_when_sizes_are_known_or_no_weights_are_given(small_and_big):
    a, b = small_and_big
    assert equal_size_note(parse_sources(f"{a}@0.5::{b}@0.5")) is None
    assert equal_size_note(parse_sources(f"{a}/*.tar::{b}")) is None  # unweighted: every shard alike, exact
    assert equal_size_note(parse_sources(f"{a}/*.tar@1")) is None  # one source: nothing to mix


def test_should_print_the_fallback_once_on_rank_0_when_building_the_loader(small_and_big, capsys):
    a, b = small_and_big
    data = DataConfig(train=f"{a}/*.tar@0.5::{b}@0.5", num_workers=0)
    for rank in (0, 1):
        build_train_loader(data, batch_size=4, image_size=8, tokenizer=tokenize, seed=0, rank=rank, start_step=0)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data.train:")]
    assert len(lines) == 1 and "no sample counts" in lines[0]


def test_should_draw_the_same_shards_when_the_seed_is_the_same(small_and_big):
    a, b = small_and_big
    sources = parse_sources(f"{a}@0.5::{b}@0.5")

    def first(seed: int) -> list[str]:
        return [u for u, _ in zip(draw_shards(sources, random.Random(seed)), range(200), strict=False)]

    assert first(1) == first(1) and first(1) != first(2)


def test_should_draw_one_source_as_before_when_there_is_nothing_to_mix(small_and_big):
    a, _ = small_and_big
    (src,) = parse_sources(a)
    rng = random.Random(5)
    expected = [rng.choice(src.urls) for _ in range(50)]  # no source draw: one rng call per shard
    drawn = [u for u, _ in zip(draw_shards([src], random.Random(5)), range(50), strict=False)]
    assert drawn == expected
    assert src.weight == 1.0 and not src.weighted
