"""manifest.json: the shard list (names and sample counts) next to a dataset's shards, so training knows its
size without listing. The reader validates it here; the writer (clipjob.datasets.writer) writes this format.

    {"format": "clipjob-shards/1", "shards": [{"name": "shard-000000.tar", "samples": 512, "bytes": ...}, ...],
     "total_samples": ...}
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from clipjob import fs
from clipjob.errors import ClipjobError

MANIFEST_FORMAT = "clipjob-shards/1"
MANIFEST_NAME = "manifest.json"


def manifest_url(url: str) -> str:
    """The manifest of a shard directory, or a `*.json` URL itself."""
    return url if url.endswith(".json") else fs.join(url, MANIFEST_NAME)


def manifest_dir(url: str) -> str:
    """The directory a manifest's shard names are relative to: the folder of a `*.json` URL (whatever its
    name), else the URL itself (a directory holding manifest.json)."""
    if not url.endswith(".json"):
        return url
    if "://" in url:
        proto, path = url.split("://", 1)
        return f"{proto}://{posixpath.dirname(path)}"
    return os.path.dirname(url)


def read_manifest(url: str) -> dict:
    """The manifest of a shard directory (or the manifest.json URL itself), validated."""
    murl = manifest_url(url)
    if not fs.exists(murl):
        raise ClipjobError(f"{murl}: no manifest.json (write shards with ShardWriter or `clipjob data ...`)")
    try:
        m = json.loads(fs.read_text(murl))
    except (ValueError, UnicodeDecodeError) as e:
        raise ClipjobError(f"{murl}: manifest is not valid JSON ({e})") from None
    problem = _manifest_problem(m)
    if problem:
        raise ClipjobError(f"{murl}: malformed manifest: {problem}")
    return m


def shard_sample_counts(url: str) -> dict[str, int]:
    """Shard URL -> the samples the manifest of `url` (a directory or a `*.json` URL) promises in it."""
    base = manifest_dir(url)
    return {fs.join(base, s["name"]): s["samples"] for s in read_manifest(url)["shards"]}


def _manifest_problem(m: Any) -> str | None:
    if not isinstance(m, dict):
        return "expected a JSON object"
    if m.get("format") != MANIFEST_FORMAT:
        return f"format is {m.get('format')!r}, expected {MANIFEST_FORMAT!r}"
    shards = m.get("shards")
    if not isinstance(shards, list):
        return "'shards' must be a list"
    for i, s in enumerate(shards):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and s["name"]
                and posixpath.basename(s["name"]) == s["name"]
                and isinstance(s.get("samples"), int) and s["samples"] >= 0
                and isinstance(s.get("bytes"), int) and s["bytes"] >= 0):
            return f"shards[{i}] must be {{'name': file name, 'samples': int, 'bytes': int}}"
    total = m.get("total_samples")
    if not isinstance(total, int) or total != sum(s["samples"] for s in shards):
        return f"total_samples {total!r} does not equal the sum of the shards' samples"
    return None
