"""`clipjob data inspect`: what is in a set of shards, and what is wrong with it.

Every shard is read as the training pipeline reads it (same fsspec stream and tar reader, clipjob.data.shards;
same caption checks). By default images are only parsed up to their header (format, size, decompression bombs);
`verify=True` decodes every image as training would, which also finds truncated or corrupt pixel data.
"""

from __future__ import annotations

import statistics
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from clipjob.data.decode import BadSample, decode_caption, decode_image, image_bytes, open_image
from clipjob.data.manifest import shard_sample_counts
from clipjob.data.shards import parse_sources, read_tar_samples


@dataclass
class ShardStats:
    url: str
    expected: int | None = None  # samples the manifest promises
    samples: int = 0
    good: int = 0
    bad: Counter = field(default_factory=Counter)  # by reason; shard-level reasons count once
    formats: Counter = field(default_factory=Counter)
    caption_chars: list[int] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)


def inspect_shard(url: str, expected: int | None = None, verify: bool = False, image_size: int = 224,
                  caption_key: str = "txt") -> ShardStats:
    st = ShardStats(url, expected)
    for sample in read_tar_samples(url, st.bad):
        st.samples += 1
        try:
            caption = decode_caption(sample, caption_key)
            img = open_image(image_bytes(sample))
            if verify:
                decode_image(sample, image_size)
        except BadSample as e:
            st.bad[e.reason] += 1
            continue
        st.good += 1
        st.formats[img.format or "?"] += 1
        st.caption_chars.append(len(caption))
        st.caption_words.append(len(caption.split()))
        st.widths.append(img.width)
        st.heights.append(img.height)
    return st


def _summary(values: list[int]) -> dict:
    if not values:
        return {}
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else [values[0]] * 19
    return {"min": min(values), "p5": q[0], "median": statistics.median(values),
            "mean": round(statistics.fmean(values), 2), "p95": q[18], "max": max(values)}


def inspect_shards(spec: str, verify: bool = False, workers: int = 1, max_shards: int = 0,
                   image_size: int = 224, caption_key: str = "txt") -> dict:
    """Counts, bad samples by reason, caption length and image size statistics of the shards of a spec."""
    jobs: list[tuple[str, int | None]] = []
    for src in parse_sources(spec, check_shards=True):
        counts = shard_sample_counts(src.spec) if src.samples is not None else {}
        jobs += [(u, counts.get(u)) for u in src.urls]
    if max_shards:
        jobs = jobs[:max_shards]
    args = [(u, n, verify, image_size, caption_key) for u, n in jobs]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            stats = list(pool.map(_inspect_args, args))
    else:
        stats = [inspect_shard(*a) for a in args]
    return _report(spec, stats, verify)


def _inspect_args(a: tuple) -> ShardStats:
    return inspect_shard(*a)


def _report(spec: str, stats: list[ShardStats], verify: bool) -> dict:
    bad: Counter = Counter()
    formats: Counter = Counter()
    chars, words, widths, heights, shorter = [], [], [], [], []
    for st in stats:
        bad.update(st.bad)
        formats.update(st.formats)
        chars += st.caption_chars
        words += st.caption_words
        widths += st.widths
        heights += st.heights
        shorter += [min(w, h) for w, h in zip(st.widths, st.heights, strict=True)]
    mismatched = [{"shard": st.url, "manifest": st.expected, "found": st.samples} for st in stats
                  if st.expected is not None and st.expected != st.samples]
    return {
        "spec": spec, "verified": verify, "shards": len(stats), "samples": sum(st.samples for st in stats),
        "good": sum(st.good for st in stats), "bad": dict(sorted(bad.items())), "bad_total": sum(bad.values()),
        "manifest_mismatch": mismatched, "image_formats": dict(formats),
        "caption_chars": _summary(chars), "caption_words": _summary(words),
        "image_width": _summary(widths), "image_height": _summary(heights), "image_shorter_side": _summary(shorter),
    }


def format_report(r: dict) -> str:
    """The report as a few aligned lines for a terminal."""
    lines = [f"{r['spec']}: {r['shards']} shards, {r['samples']} samples, {r['good']} good, "
             f"{r['bad_total']} bad{' (images decoded)' if r['verified'] else ' (headers only; --verify decodes)'}"]
    for reason, n in r["bad"].items():
        lines.append(f"  bad  {reason:20s} {n}")
    for m in r["manifest_mismatch"]:
        lines.append(f"  manifest says {m['manifest']} samples, found {m['found']}: {m['shard']}")
    if r["image_formats"]:
        lines.append("  formats " + ", ".join(f"{k} {v}" for k, v in r["image_formats"].items()))
    stats = [(key, r[key]) for key in ("caption_chars", "caption_words", "image_width", "image_height",
                                       "image_shorter_side") if r[key]]
    if stats:  # (none when no sample was good: no header over nothing)
        cols = ("min", "p5", "median", "mean", "p95", "max")
        lines.append(f"  {'':20s} " + " ".join(f"{c:>7s}" for c in cols))
        lines += [f"  {key:20s} " + " ".join(f"{s[c]:>7g}" for c in cols) for key, s in stats]
    return "\n".join(lines)
