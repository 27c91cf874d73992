"""shards.py: the source syntax, expansion, reading one shard through fsspec (file, memory://, http://); no
webdataset import on the read path: tests/integration/test_import_isolation.py."""

from __future__ import annotations

import functools
import http.server
import io
import tarfile
import threading
from collections import Counter

import pytest

from clipjob import fs
from clipjob.data.shards import (derive_seed, expand_shard_urls, manifest_sample_count, missing_shards, parse_sources,
                                 read_tar_samples, split_weight)
from clipjob.datasets.inspect import inspect_shards
from clipjob.datasets.writer import ShardWriter
from clipjob.errors import ClipjobError, RetryableError


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


def test_should_read_samples_through_fsspec_when_the_url_is_memory():
    d = write_shards("memory://shards-test/ds", 2)
    bad: Counter = Counter()
    samples = [s for u in expand_shard_urls(d) for s in read_tar_samples(u, bad)]
    assert [s["txt"] for s in samples] == [f"caption {i}".encode() for i in range(4)] and not bad
    assert samples[0]["__key__"] == "000000" and samples[0]["__url__"] == f"{d}/shard-000000.tar"


def test_should_read_samples_through_fsspec_when_the_url_is_http(tmp_path):
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


def _raw_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_should_keep_the_first_copy_of_a_duplicate_key_and_count_each_later_copy(tmp_path):
    members = [("a.jpg", b"a1"), ("a.txt", b"first a"), ("b.jpg", b"b1"), ("b.txt", b"b"),
               ("a.jpg", b"a2"), ("a.txt", b"second a"),  # separated repeat: was trained twice
               ("c.jpg", b"c1"), ("c.txt", b"first c"), ("c.JPG", b"c2"), ("c.txt", b"second c"),  # adjacent: merged
               ("c.jpg", b"c3"),  # a third copy, adjacent to the second
               ("d.txt", b"d"), ("d.jpg", b"d1"), ("d.jpg", b"d2")]  # a partial adjacent repeat
    (tmp_path / "s.tar").write_bytes(_raw_tar(members))
    bad: Counter = Counter()
    got = [{k: v for k, v in s.items() if k != "__url__"} for s in read_tar_samples(str(tmp_path / "s.tar"), bad)]
    assert got == [{"__key__": "a", "jpg": b"a1", "txt": b"first a"}, {"__key__": "b", "jpg": b"b1", "txt": b"b"},
                   {"__key__": "c", "jpg": b"c1", "txt": b"first c"}, {"__key__": "d", "txt": b"d", "jpg": b"d1"}]
    assert bad == {"duplicate_key": 4}


def test_should_count_a_file_that_is_not_a_tar_as_unreadable(tmp_path):
    (tmp_path / "page.tar").write_bytes(b"<html><body>Access Denied</body></html>\n" * 30)
    (tmp_path / "cut.tar").write_bytes(_raw_tar([("a.jpg", b"x" * 3000), ("a.txt", b"a")])[:1500])
    for name, reason in [("page.tar", "unreadable_shard"), ("cut.tar", "truncated_shard")]:
        bad: Counter = Counter()
        assert list(read_tar_samples(str(tmp_path / name), bad)) == [] and bad == {reason: 1}


def test_should_resolve_shards_next_to_a_manifest_whatever_its_name(tmp_path):
    d = write_shards(str(tmp_path / "ds"), 2)
    (tmp_path / "ds" / "manifest.json").rename(tmp_path / "ds" / "train-v2.json")
    assert expand_shard_urls(f"{d}/train-v2.json") == [f"{d}/shard-000000.tar", f"{d}/shard-000001.tar"]
    assert manifest_sample_count(f"{d}/train-v2.json") == 4
    r = inspect_shards(f"{d}/train-v2.json")
    assert r["samples"] == 4 and r["manifest_mismatch"] == [] and r["bad"] == {"corrupt_image": 4}


def test_should_refuse_a_named_shard_that_does_not_exist_in_one_line(tmp_path):
    d = write_shards(str(tmp_path / "ds"), 2)
    with pytest.raises(ClipjobError) as e:
        parse_sources(f"{d}/shard-00001.tar", check_shards=True)  # a digit short
    assert str(e.value) == f"{d}/shard-00001.tar: shard not found; fix the URL or pattern"
    with pytest.raises(ClipjobError) as e:
        parse_sources(f"{d}/shard-{{000000..000003}}.tar@1::{d}@1", check_shards=True)
    assert str(e.value) == (f"{d}/shard-000002.tar: shard not found (2 of the 4 shards of "
                            f"{d}/shard-{{000000..000003}}.tar are missing); fix the URL or pattern")
    (tmp_path / "ds" / "shard-000001.tar").unlink()  # listed in the manifest: counted per draw, not refused
    assert len(parse_sources(d, check_shards=True)[0].urls) == 2
    assert len(parse_sources(f"{d}/shard-00001.tar")[0].urls) == 1  # unchecked unless asked


def test_should_check_named_shards_over_http_one_lookup_each(tmp_path):
    d = write_shards(str(tmp_path / "ds"), 2)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=d)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert missing_shards([f"{base}/shard-000000.tar", f"{base}/nope.tar", f"{base}/shard-000001.tar"]) == \
            [f"{base}/nope.tar"]
    finally:
        httpd.shutdown()


def test_should_name_the_missing_key_or_bucket_of_a_single_shard_on_s3(s3_bucket):
    d = write_shards(f"{s3_bucket}/ds", 1)
    with pytest.raises(ClipjobError) as e:
        parse_sources(f"{d}/shard-00000.tar", check_shards=True)
    assert str(e.value) == f"{d}/shard-00000.tar: shard not found; fix the URL or pattern"
    with pytest.raises(ClipjobError) as e:
        parse_sources("s3://no-such-bucket-q7/ds/shard-000000.tar", check_shards=True)
    assert str(e.value) == ("s3://no-such-bucket-q7/ds/shard-000000.tar: bucket does not exist "
                            "(check the URL and AWS_ENDPOINT_URL_S3)")
    assert parse_sources(f"{d}/shard-{{000000..000000}}.tar", check_shards=True)[0].urls == (f"{d}/shard-000000.tar",)


def test_should_look_shards_up_one_by_one_when_listing_is_refused_but_not_when_storage_is_down(tmp_path, monkeypatch):
    d = write_shards(str(tmp_path / "ds"), 2)
    urls = [f"{d}/shard-000000.tar", f"{d}/shard-000009.tar"]

    def refused(url):
        raise ClipjobError(f"{url}: access denied (check ...)")

    monkeypatch.setattr(fs, "ls", refused)
    assert missing_shards(urls) == [f"{d}/shard-000009.tar"]  # by per-object lookups

    def down(url):
        raise RetryableError(f"{url}: storage did not answer")

    monkeypatch.setattr(fs, "ls", down)
    with pytest.raises(RetryableError, match="did not answer"):  # an outage: retryable, not a silent skip
        missing_shards(urls)
