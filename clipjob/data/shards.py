"""Shard URLs: expansion (manifest.json, brace patterns, globs, several sources joined with '::'), the
webdataset gopen handler for every fsspec protocol, and the per-rank/per-worker seeds."""

from __future__ import annotations

import json
import sys

import braceexpand

from clipjob import fs
from clipjob.errors import ClipjobError

FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "memory", "az", "abfs", "file", "hf")


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset gopen handler: open any fsspec URL as a streaming binary file."""
    import fsspec

    return fsspec.open(url, mode, block_size=1 << 22, **fs.storage_options(url)).open()


def register_gopen_handlers() -> None:
    """Teach webdataset to read s3://, gs://, memory://, ... through fsspec (no `pipe:aws s3 cp`)."""
    import webdataset  # noqa: F401 - makes sure the module is loaded

    schemes = sys.modules["webdataset.gopen"].gopen_schemes
    for s in FSSPEC_SCHEMES:
        schemes[s] = _gopen_fsspec


def _is_pattern(spec: str) -> bool:
    return any(c in spec for c in "{*?[")


def expand_shard_urls(spec: str) -> list[str]:
    """A source spec -> the list of shard URLs.

    - `DIR_OR_URL` holding a manifest.json: its shards, in order;
    - `.../train-{000000..000099}.tar`: brace expansion;
    - `.../*.tar`: glob;
    - several specs joined with '::' are concatenated.
    """
    if not spec:
        raise ClipjobError("data.train: no training shards given (set data.train to a directory, URL or pattern)")
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if part.endswith(".tar") and not _is_pattern(part):
            urls.append(part)
        elif "{" in part:
            urls += list(braceexpand.braceexpand(part))
        elif _is_pattern(part):
            found = fs.glob(part)
            if not found:
                raise ClipjobError(f"{part}: the pattern matches no shards")
            urls += found
        else:
            urls += [fs.join(part, s["name"]) for s in read_manifest(part)["shards"]]
    return urls


def read_manifest(url: str) -> dict:
    """The manifest.json of a shard directory: {"shards": [{"name", "samples", "bytes"}], "total_samples"}."""
    murl = url if url.endswith(".json") else fs.join(url, "manifest.json")
    if not fs.exists(murl):
        raise ClipjobError(f"{murl}: no manifest.json (build shards with `clipjob data build`, or give a pattern)")
    try:
        m = json.loads(fs.read_text(murl))
        assert isinstance(m["shards"], list) and all("name" in s for s in m["shards"])
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ClipjobError(f"{murl}: malformed manifest (expected {{'shards': [{{'name': ...}}]}})") from None
    return m


def manifest_sample_count(spec: str) -> int | None:
    """Total samples from the manifests of a spec, or None when some part has no manifest."""
    total = 0
    for part in spec.split("::"):
        if _is_pattern(part) or part.endswith(".tar"):
            return None
        total += int(read_manifest(part).get("total_samples", 0))
    return total


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from (seed, rank, worker, restart step, ...)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1
