"""Shard URLs: the source syntax of `data.train`, its expansion (manifest.json, brace patterns, globs), reading
one shard (any fsspec URL, through clipjob.fs) with bad-shard accounting, and the per-rank/per-worker seeds.

Source syntax: one or more sources joined with `::`, each `SPEC` or `SPEC@WEIGHT`:

    s3://bucket/laion                               a directory with manifest.json (from `clipjob data build`)
    s3://bucket/cc12m/shard-{000000..000099}.tar    a brace pattern
    /data/yfcc/*.tar                                a glob
    s3://a/{000..099}.tar@0.7::s3://b/@0.3          two sources: 70% of the samples from a, 30% from b

Weights are relative shares of SAMPLES (normalised over the sources). Without weights, sources mix in
proportion to their size, i.e. like one concatenated source. Shards are drawn a source at a time
(`draw_shards`), each source as often as its weight over its mean samples per shard (from its manifest), so
a source of few large shards gets no more than its share; without a manifest shards count as equal in size.
"""

from __future__ import annotations

import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate

import braceexpand

from clipjob import fs
from clipjob.data.manifest import manifest_dir, manifest_url, read_manifest
from clipjob.data.tarstream import NotATar, tar_members
from clipjob.errors import ClipjobError, RetryableError


@dataclass(frozen=True)
class Source:
    """One `::`-separated part of a shard spec."""

    spec: str
    urls: tuple[str, ...]
    weight: float  # share of the samples (normalised over the sources)
    samples: int | None  # total samples from the manifest, None without one
    weighted: bool = False  # the weight was given (SPEC@WEIGHT), not derived from the sources' sizes


def _is_pattern(spec: str) -> bool:
    return any(c in spec for c in "{*?[")


def split_weight(part: str) -> tuple[str, float | None]:
    """`SPEC@0.3` -> (SPEC, 0.3); an '@' not followed by a number is part of the URL."""
    head, sep, tail = part.rpartition("@")
    if not sep:
        return part, None
    try:
        w = float(tail)
    except ValueError:
        return part, None
    if not w > 0:
        raise ClipjobError(f"data.train: weight {tail!r} of {head!r} must be a number > 0")
    return head, w


def _expand_one(part: str) -> tuple[list[str], int | None]:
    """One source spec -> (shard URLs, total samples or None)."""
    if part.endswith(".json") or not (_is_pattern(part) or part.endswith(".tar")):
        return _expand_dir(part)
    urls = list(braceexpand.braceexpand(part)) if "{" in part else fs.glob(part) if _is_pattern(part) else [part]
    if not urls or "{" in part:  # brace expansion does no I/O: at least make sure the bucket is there
        _check_bucket(part)
    if not urls:
        raise ClipjobError(f"{part}: the pattern matches no shards")
    return urls, None


def _check_bucket(part: str) -> None:
    if fs.bucket_missing(part):
        raise ClipjobError(f"{part}: bucket does not exist (check the URL and AWS_ENDPOINT_URL_S3)")


def _expand_dir(part: str) -> tuple[list[str], int | None]:
    """A directory: its manifest.json, or (without one) the *.tar files directly in it."""
    base = manifest_dir(part)
    murl = manifest_url(part)
    if part.endswith(".json") or fs.exists(murl):
        m = read_manifest(murl)
        return [fs.join(base, s["name"]) for s in m["shards"]], int(m["total_samples"])
    found = fs.glob(fs.join(part, "*.tar"))
    if not found:
        _check_bucket(part)
        raise ClipjobError(f"{murl}: no manifest.json and no *.tar shards in {part} "
                           "(build shards with `clipjob data build`, or give a pattern)")
    return found, None


def _names_shards(part: str) -> bool:
    """Whether a source spec spells out its shard URLs itself (a single .tar URL, a brace pattern), rather than
    finding them (a glob, a directory listing, a manifest)."""
    return "{" in part or (part.endswith(".tar") and not _is_pattern(part))


def missing_shards(urls: list[str] | tuple[str, ...]) -> list[str] | None:
    """The URLs among `urls` that do not exist, in order: one listing per folder (per-object lookups over
    http(s), and where listing is refused); None when storage will not say (the reads will count them)."""
    present = None if any(fs.protocol(u) in ("http", "https") for u in urls) else _listed(urls)
    if present is None:
        try:
            with ThreadPoolExecutor(16) as pool:
                present = {u for u, ok in zip(urls, pool.map(fs.exists, urls), strict=True) if ok}
        except RetryableError:
            raise
        except ClipjobError:
            return None
    return [u for u in urls if u not in present]


def _listed(urls: list[str] | tuple[str, ...]) -> set[str] | None:
    """Which of `urls` their folders' listings hold; None when a listing is refused."""
    by_dir: dict[str, list[str]] = {}
    for u in urls:
        by_dir.setdefault((u.rsplit("/", 1)[0] or "/") if "/" in u else ".", []).append(u)
    present: set[str] = set()
    for folder, group in by_dir.items():
        try:
            names = set(fs.ls(folder))
        except RetryableError:  # storage does not answer: an outage, not a refusal to list
            raise
        except ClipjobError:
            return None
        present.update(u for u in group if u.rsplit("/", 1)[-1] in names)
    return present


def check_shards_exist(sources: list[Source]) -> None:
    """Shards that a spec names itself (a single .tar URL, a brace pattern) must all exist: a one-line
    ClipjobError naming the first missing URL, before any training. Shards listed in a manifest are not
    checked here: one that goes missing is counted (`missing_shard`) per draw, like other bad data."""
    for src in sources:
        if not _names_shards(src.spec):
            continue
        missing = missing_shards(src.urls)
        if missing:
            _check_bucket(src.spec)
            some = f" ({len(missing)} of the {len(src.urls)} shards of {src.spec} are missing)" \
                if len(src.urls) > 1 else ""
            raise ClipjobError(f"{missing[0]}: shard not found{some}; fix the URL or pattern")


def parse_sources(spec: str, check_shards: bool = False) -> list[Source]:
    """The sources of a shard spec, each with its shard URLs and normalised weight. `check_shards`: also make
    sure the shards the spec names exist (`check_shards_exist`)."""
    if not spec or not spec.strip():
        raise ClipjobError("data.train: no training shards given (set data.train to a directory, URL or pattern)")
    parts = [split_weight(p.strip()) for p in spec.split("::") if p.strip()]
    given = [w is not None for _, w in parts]
    if any(given) and not all(given):
        raise ClipjobError(f"data.train: {spec!r} weights some sources but not others; "
                           "give every source a weight (SPEC@WEIGHT) or none")
    expanded = [(p, w, *_expand_one(p)) for p, w in parts]
    for p, _, urls, _ in expanded:
        if not urls:
            raise ClipjobError(f"{p}: no shards (empty manifest or pattern)")
    if not any(given):  # mix in proportion to size: samples if every source knows them, else shards
        by_samples = all(n for _, _, _, n in expanded)
        expanded = [(p, float(n if by_samples else len(urls)), urls, n) for p, _, urls, n in expanded]
    total = sum(w for _, w, _, _ in expanded)
    sources = [Source(p, tuple(urls), w / total, n, any(given)) for p, w, urls, n in expanded]
    if check_shards:
        check_shards_exist(sources)
    return sources


def draw_weights(sources: list[Source]) -> list[float]:
    """How often each source is picked per shard draw so that its `weight` is its share of samples: weight over
    mean samples per shard (a source's shards are then drawn uniformly, so each of its samples is as likely).
    Without a sample count for every source, shards are taken as equal in size: the weights themselves."""
    if not _sized(sources):
        return [s.weight for s in sources]
    return [s.weight * len(s.urls) / s.samples for s in sources]  # type: ignore[operator]


def _sized(sources: list[Source]) -> bool:
    return all(s.samples for s in sources)


def equal_size_note(sources: list[Source]) -> str | None:
    """The line to log when a weighted mix cannot know its shards' sizes (a source without a manifest, or one
    listing no samples), so its weights apply to shard draws; None when the weights are shares of samples.
    (An unweighted mix draws every shard alike whatever their sizes: exactly one concatenated source.)"""
    if len(sources) < 2 or not any(s.weighted for s in sources) or _sized(sources):
        return None
    unsized = ", ".join(s.spec for s in sources if not s.samples)
    return (f"data.train: no sample counts for {unsized} (no manifest.json, or 0 samples in it): weights are "
            "shares of shard draws, as if every shard held as many samples; write a manifest (clipjob data build) "
            "to weigh samples")


def draw_shards(sources: list[Source], rng: random.Random) -> Iterator[str]:
    """Shard URLs drawn with replacement, endlessly: a source by `draw_weights`, then one of its shards
    uniformly. A single source makes no source draw: one rng call per shard, the stream it always gave."""
    if len(sources) == 1:
        while True:
            yield rng.choice(sources[0].urls)
    cum = list(accumulate(draw_weights(sources)))
    while True:
        yield rng.choice(rng.choices(sources, cum_weights=cum)[0].urls)


def expand_shard_urls(spec: str) -> list[str]:
    """All shard URLs of a spec, sources concatenated (weights ignored)."""
    return [u for s in parse_sources(spec) for u in s.urls]


def manifest_sample_count(spec: str) -> int | None:
    """Total samples from the manifests of a spec, or None when some part has no manifest."""
    counts = [s.samples for s in parse_sources(spec)]
    return None if any(c is None for c in counts) else sum(counts)  # type: ignore[misc]


def split_member_name(name: str) -> tuple[str | None, str]:
    """`dir/000123.seg.jpg` -> ("dir/000123", "seg.jpg"): webdataset's key/extension split (first dot of the
    base name)."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2)) if m else (None, "")


def shard_error_reason(exn: BaseException) -> str:
    """Why a shard could not be read: missing_shard, empty_shard, truncated_shard or unreadable_shard."""
    chain = [exn, exn.__cause__] if exn.__cause__ else [exn]
    if any(isinstance(e, FileNotFoundError) for e in chain) or ": not found" in str(exn):
        return "missing_shard"
    if isinstance(exn, tarfile.ReadError) and "empty file" in str(exn):
        return "empty_shard"
    if isinstance(exn, NotATar):
        return "unreadable_shard"
    if isinstance(exn, (tarfile.TarError, EOFError)):
        return "truncated_shard"
    return "unreadable_shard"


def read_tar_samples(url: str, bad: Counter, stall_s: float | None = None, interruptible: bool = False,
                     setting: str | None = "data.stall_timeout_s") -> Iterator[dict]:
    """The samples of one webdataset tar ({"__key__", "jpg": bytes, "txt": bytes, ...}), read as a stream:
    local paths as files, any other URL through fsspec (`fs.open_stream`: block-sized range requests, one block
    ahead). A shard that cannot be opened, or breaks off, adds one count to `bad` under its reason; the samples
    read before the break are kept, the one in progress is dropped. Storage that does not answer is no bad data:
    the read waits (up to `stall_s`) and then raises RetryableError naming the URL and `setting` (None: the
    process's bound), or fs.StopWaiting when `interruptible` and the process is asked to stop."""
    try:
        with fs.open_stream(url, stall_s=stall_s, setting=setting, interruptible=interruptible) as stream:
            yield from assemble_samples(tar_members(stream), url, bad)
    except (RetryableError, fs.StopWaiting):
        raise
    except Exception as e:  # noqa: BLE001 - any failure of one shard is counted, never fatal
        bad[shard_error_reason(e)] += 1


def assemble_samples(members: Iterator[tuple[str, bytes]], url: str, bad: Counter) -> Iterator[dict]:
    """Tar members -> samples: consecutive members with the same key make one sample.

    A duplicate is a later copy of a key already seen in this shard: the key comes back after another key's
    members, or a member repeats an extension the sample in progress already has (`k.jpg k.txt k.jpg ...`).
    The first copy is kept, every later copy is dropped whole and counted once as `duplicate_key`; so no copy
    is trained twice and no two copies are merged into one sample. The last sample is yielded only once the
    members end without an error (a shard that breaks off drops the sample in progress)."""
    seen: set[str] = set()
    current: dict | None = None
    dropping: set[str] | None = None  # extensions of the duplicate copy being dropped (key = dropped_key)
    dropped_key = None
    for name, data in members:
        key, ext = split_member_name(name)
        if key is None or key.startswith("__"):
            continue
        ext = ext.lower()
        if current is not None and (current["__key__"] != key or ext in current):
            yield current
            current = None
        if current is None:
            if key not in seen:
                seen.add(key)
                current, dropped_key = {"__key__": key, "__url__": url}, None
            elif key != dropped_key or dropping is None or ext in dropping:  # a new copy of a seen key
                bad["duplicate_key"] += 1
                dropped_key, dropping = key, {ext}
                continue
            else:
                dropping.add(ext)
                continue
        current[ext] = data
    if current is not None:
        yield current


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from (seed, rank, worker, restart step, ...)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1
