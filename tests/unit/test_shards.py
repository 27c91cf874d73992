"""shards.py: the source syntax, expansion, reading one shard through the gopen handler (file, memory://,
http://)."""

from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter

import pytest

from clipjob import fs
from clipjob.data.shards import (derive_seed, expand_shard_urls, manifest_sample_count, parse_sources,
                                 read_tar_samples, split_weight)
from clipjob.data.writer import ShardWriter
from clipjob.errors import ClipjobError


def write_shards(out: str, n: int, per_shard: int = 2, prefix: str = "shard") -> str:
    with ShardWriter(out, prefix=prefix, max_samples=per_shard) as w:
        for i in range(n * per_shard):
            w.write(f"{i:06d}", {"jpg": b"\xff\xd8 not really", "txt": f"caption {i}"})
    return out


def test_should_expand_a_manifest_directory_in_shard_order(tmp_path):
    d = write_shards(str(tmp_path / "ds"), 3)
    assert expand_shard_urls(d) == [f"{d}/shard-00000{i}.tar" for i in range(3)]
    assert expand_shard_urls(f"{d}/manifest.json") == expand_shard_urls(d)
    assert manifest_sample_count(d) == 6


def test_should_expand_brace_patterns_globs_and_single_tars(tmp_path):
    d = write_shards(str(tmp_path / "ds"), 3)
    assert expand_shard_urls(f"{d}/shard-{{000000..000001}}.tar") == [f"{d}/shard-000000.tar", f"{d}/shard-000001.tar"]
    assert expand_shard_urls(f"{d}/*.tar") == [f"{d}/shard-00000{i}.tar" for i in range(3)]
    assert expand_shard_urls(f"{d}/shard-000002.tar") == [f"{d}/shard-000002.tar"]
    assert manifest_sample_count(f"{d}/*.tar") is None


def test_should_list_tars_when_a_directory_has_no_manifest(tmp_path):
    d = write_shards(str(tmp_path / "ds"), 2)
    (tmp_path / "ds" / "manifest.json").unlink()
    assert expand_shard_urls(d) == [f"{d}/shard-000000.tar", f"{d}/shard-000001.tar"]


def test_should_fail_with_one_line_naming_the_place_when_there_are_no_shards(tmp_path):
    for spec, words in [(str(tmp_path / "empty"), "no manifest.json"), (f"{tmp_path}/*.tar", "matches no shards"),
                        ("", "no training shards")]:
        with pytest.raises(ClipjobError) as e:
            expand_shard_urls(spec)
        assert words in str(e.value) and "\n" not in str(e.value)


def test_should_normalise_weights_when_every_source_has_one(tmp_path):
    a, b = write_shards(str(tmp_path / "a"), 1), write_shards(str(tmp_path / "b"), 4)
    sources = parse_sources(f"{a}@3::{b}@1")
    assert [s.spec for s in sources] == [a, b]
    assert [s.weight for s in sources] == [0.75, 0.25]
    assert [len(s.urls) for s in sources] == [1, 4] and [s.samples for s in sources] == [2, 8]


def test_should_weight_sources_by_size_when_no_weights_are_given(tmp_path):
    a, b = write_shards(str(tmp_path / "a"), 1), write_shards(str(tmp_path / "b"), 3)
    assert [s.weight for s in parse_sources(f"{a}::{b}")] == [0.25, 0.75]  # by samples (manifests)
    assert [s.weight for s in parse_sources(f"{a}/*.tar::{b}")] == [0.25, 0.75]  # by shards


def test_should_refuse_partial_or_invalid_weights(tmp_path):
    a, b = write_shards(str(tmp_path / "a"), 1), write_shards(str(tmp_path / "b"), 1)
    with pytest.raises(ClipjobError, match="give every source a weight"):
        parse_sources(f"{a}@2::{b}")
    with pytest.raises(ClipjobError, match="must be a number > 0"):
        parse_sources(f"{a}@0")


def test_should_keep_an_at_sign_that_is_not_a_weight():
    assert split_weight("https://user@host/x.tar") == ("https://user@host/x.tar", None)
    assert split_weight("s3://b/{000..009}.tar@0.5") == ("s3://b/{000..009}.tar", 0.5)


def test_should_read_samples_from_memory_urls_through_the_gopen_handler():
    d = write_shards("memory://shards-test/ds", 2)
    bad: Counter = Counter()
    samples = [s for u in expand_shard_urls(d) for s in read_tar_samples(u, bad)]
    assert [s["txt"] for s in samples] == [f"caption {i}".encode() for i in range(4)] and not bad
    assert samples[0]["__key__"] == "000000" and samples[0]["__url__"] == f"{d}/shard-000000.tar"


def test_should_read_samples_over_http_through_the_gopen_handler(tmp_path):
    d = write_shards(str(tmp_path / "ds"), 1)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=d)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        bad: Counter = Counter()
        assert len(list(read_tar_samples(f"{base}/shard-000000.tar", bad))) == 2 and not bad
        assert list(read_tar_samples(f"{base}/nope.tar", bad)) == [] and bad == {"missing_shard": 1}
    finally:
        httpd.shutdown()


def test_should_derive_distinct_stable_seeds_per_rank_and_worker():
    seeds = {derive_seed(0, r, w, 0) for r in range(4) for w in range(4)}
    assert len(seeds) == 16 and derive_seed(1, 2, 3, 4) == derive_seed(1, 2, 3, 4) < 2**63


def test_should_write_and_list_shards_at_an_object_store_url(s3_bucket):
    d = write_shards(f"{s3_bucket}/ds", 2)
    assert expand_shard_urls(d) == [f"{d}/shard-000000.tar", f"{d}/shard-000001.tar"]
    assert expand_shard_urls(f"{d}/*.tar") == expand_shard_urls(d)
    assert fs.exists(f"{d}/manifest.json")
