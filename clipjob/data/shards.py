"""Shard URLs: the source syntax of `data.train`, its expansion (manifest.json, brace patterns, globs), the
webdataset gopen handler for every fsspec protocol, reading one shard, and the per-rank/per-worker seeds.

Source syntax: one or more sources joined with `::`, each `SPEC` or `SPEC@WEIGHT`:

    s3://bucket/laion                               a directory with manifest.json (from `clipjob data build`)
    s3://bucket/cc12m/shard-{000000..000099}.tar    a brace pattern
    /data/yfcc/*.tar                                a glob
    s3://a/{000..099}.tar@0.7::s3://b/@0.3          two sources: 70% of the shards drawn from a, 30% from b

Weights are relative (normalised over the sources). Without weights, sources mix in proportion to their
size (samples when every source has a manifest, else shards), i.e. like one concatenated source.
"""

from __future__ import annotations

import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import braceexpand

from clipjob import fs
from clipjob.data.tarstream import tar_members
from clipjob.data.writer import read_manifest
from clipjob.errors import ClipjobError

FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "memory", "az", "abfs", "hf", "http", "https")


@dataclass(frozen=True)
class Source:
    """One `::`-separated part of a shard spec."""

    spec: str
    urls: tuple[str, ...]
    weight: float  # relative share of shard draws (normalised over sources by the sampler)
    samples: int | None  # total samples from the manifest, None without one


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset gopen handler: open any fsspec URL as a streaming binary file (retries in fs)."""
    if mode != "rb":
        raise ValueError(f"{url}: clipjob's gopen handler only reads (mode {mode!r})")
    return fs.open_stream(url)


def register_gopen_handlers() -> None:
    """Teach webdataset to read s3://, gs://, https://, memory://, ... through fsspec (no `pipe:aws s3 cp`,
    no curl)."""
    import webdataset  # noqa: F401 - makes sure the module is loaded

    schemes = sys.modules["webdataset.gopen"].gopen_schemes
    for s in FSSPEC_SCHEMES:
        schemes[s] = _gopen_fsspec


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
    base = part[: -len("/manifest.json")] if part.endswith("/manifest.json") else part
    murl = part if part.endswith(".json") else fs.join(part, "manifest.json")
    if part.endswith(".json") or fs.exists(murl):
        m = read_manifest(murl)
        return [fs.join(base, s["name"]) for s in m["shards"]], int(m["total_samples"])
    found = fs.glob(fs.join(part, "*.tar"))
    if not found:
        _check_bucket(part)
        raise ClipjobError(f"{murl}: no manifest.json and no *.tar shards in {part} "
                           "(build shards with `clipjob data build`, or give a pattern)")
    return found, None


def parse_sources(spec: str) -> list[Source]:
    """The sources of a shard spec, each with its shard URLs and normalised weight."""
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
    return [Source(p, tuple(urls), w / total, n) for p, w, urls, n in expanded]


def expand_shard_urls(spec: str) -> list[str]:
    """All shard URLs of a spec, sources concatenated (weights ignored)."""
    return [u for s in parse_sources(spec) for u in s.urls]


def manifest_sample_count(spec: str) -> int | None:
    """Total samples from the manifests of a spec, or None when some part has no manifest."""
    counts = [s.samples for s in parse_sources(spec)]
    return None if any(c is None for c in counts) else sum(counts)  # type: ignore[misc]


def open_shard(url: str):
    """A read stream of a shard through webdataset's gopen (our fsspec handlers registered)."""
    import webdataset as wds

    register_gopen_handlers()
    return wds.gopen(url, "rb")


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
    if isinstance(exn, (tarfile.TarError, EOFError)):
        return "truncated_shard"
    return "unreadable_shard"


def read_tar_samples(url: str, bad: Counter) -> Iterator[dict]:
    """The samples of one webdataset tar ({"__key__", "jpg": bytes, "txt": bytes, ...}), read as a stream.
    A shard that cannot be opened, or breaks off, adds one count to `bad` under its reason; the samples read
    before the break are kept, the one in progress is dropped."""
    current: dict | None = None
    try:
        with open_shard(url) as stream:
            for name, data in tar_members(stream):
                key, ext = split_member_name(name)
                if key is None or key.startswith("__"):
                    continue
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext.lower()] = data
    except Exception as e:  # noqa: BLE001 - any failure of one shard is counted, never fatal
        bad[shard_error_reason(e)] += 1
        return
    if current is not None:
        yield current


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from (seed, rank, worker, restart step, ...)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1
