import io
import json
import os
import tarfile
import uuid

import pytest
import webdataset as wds

from clipjob import fs
from clipjob.data.manifest import MANIFEST_FORMAT, read_manifest
from clipjob.datasets.writer import ShardWriter, _member
from clipjob.errors import ClipjobError


def sample(i: int, png_size: int = 1000) -> tuple[str, dict]:
    return f"s{i:05d}", {"png": bytes([i % 256]) * png_size, "txt": f"caption {i} é", "json": {"i": i, "x": "ü"}}


def write_all(url: str, n: int, png_size: int = 1000, **kw) -> dict:
    with ShardWriter(url, **kw) as w:
        for i in range(n):
            w.write(*sample(i, png_size))
    return read_manifest(url)


def tar_members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return t.getmembers()


def test_should_round_trip_through_webdataset_and_tarfile(tmp_path):
    m = write_all(str(tmp_path), 5)
    urls = [str(tmp_path / s["name"]) for s in m["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in got] == [f"s{i:05d}" for i in range(5)]
    for i, s in enumerate(got):
        _, fields = sample(i)
        assert s["png"] == fields["png"]
        assert s["txt"].decode("utf-8") == fields["txt"]
        assert json.loads(s["json"]) == fields["json"]
    members = tar_members((tmp_path / "shard-000000.tar").read_bytes())
    assert [x.name for x in members][:3] == ["s00000.png", "s00000.txt", "s00000.json"]
    assert all(x.mtime == 0 and x.uid == 0 and x.gid == 0 and x.mode == 0o444 and x.uname == "" for x in members)


def test_should_roll_shards_when_max_samples_is_reached(tmp_path):
    m = write_all(str(tmp_path), 7, prefix="train", max_samples=3)
    assert [(s["name"], s["samples"]) for s in m["shards"]] == [
        ("train-000000.tar", 3), ("train-000001.tar", 3), ("train-000002.tar", 1)]
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".tar")) == [s["name"] for s in m["shards"]]


def test_should_roll_shards_when_max_bytes_would_be_exceeded(tmp_path):
    # one sample = 3 headers (1536) + 3072 + 512 + 512 bytes of data = 5632; 3 of them + end blocks fit 20480
    m = write_all(str(tmp_path), 10, max_bytes=20480, png_size=3000)
    assert [s["samples"] for s in m["shards"]] == [3, 3, 3, 1]
    for s in m["shards"]:
        assert s["bytes"] == os.path.getsize(tmp_path / s["name"]) <= 20480


def test_should_give_an_oversized_sample_a_shard_of_its_own(tmp_path):
    with ShardWriter(str(tmp_path), max_bytes=20480) as w:
        w.write("small", {"txt": "a"})
        w.write("big", {"bin": b"x" * 50000})
        w.write("after", {"txt": "b"})
    assert [s["samples"] for s in read_manifest(str(tmp_path))["shards"]] == [1, 1, 1]


def test_should_describe_every_shard_in_the_manifest(tmp_path):
    m = write_all(str(tmp_path), 25, max_samples=10)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw == m
    assert m["format"] == MANIFEST_FORMAT and m["total_samples"] == 25
    assert [s["samples"] for s in m["shards"]] == [10, 10, 5]
    for s in m["shards"]:
        data = (tmp_path / s["name"]).read_bytes()
        assert s["bytes"] == len(data)
        assert len(tar_members(data)) == 3 * s["samples"]


def test_should_write_identical_bytes_when_input_is_identical(tmp_path):
    write_all(str(tmp_path / "a"), 12, max_samples=5)
    write_all(str(tmp_path / "b"), 12, max_samples=5)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    # and the bytes are what tarfile itself writes for the same members
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as t:
        for i in range(5):
            key, fields = sample(i)
            for ext, v in fields.items():
                data = v if isinstance(v, bytes) else (json.dumps(v, ensure_ascii=False, sort_keys=True)
                                                        if isinstance(v, dict) else v).encode("utf-8")
                t.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() == buf.getvalue()


@pytest.mark.parametrize("key", ["plain", "ümlaut", "k" * 97, "k" * 120, "k" * 300])
def test_should_write_the_headers_tarfile_writes_when_names_are_long_or_unicode(tmp_path, key):
    with ShardWriter(str(tmp_path)) as w:
        w.write(key, {"txt": "x", "bin": b"\0" * 700})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as t:
        for ext, data in (("txt", b"x"), ("bin", b"\0" * 700)):
            t.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
    assert (tmp_path / "shard-000000.tar").read_bytes() == buf.getvalue()
    assert [s["__key__"] for s in wds.WebDataset([str(tmp_path / "shard-000000.tar")], shardshuffle=False)] == [key]


def test_should_write_to_memory_urls():
    url = f"memory://writer-{uuid.uuid4().hex[:8]}/ds"
    try:
        m = write_all(url, 7, max_samples=4)
        assert [s["samples"] for s in m["shards"]] == [4, 3]
        assert fs.ls(url) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]
        data = fs.read_bytes(fs.join(url, "shard-000001.tar"))
        assert len(data) == m["shards"][1]["bytes"]
        assert [x.name for x in tar_members(data)][0] == "s00004.png"
    finally:
        fs.rm(url)


def test_should_write_to_s3(s3_bucket):
    url = f"{s3_bucket}/shards"
    m = write_all(url, 5, max_samples=2)
    assert fs.ls(url) == ["manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert len(fs.read_bytes(fs.join(url, "shard-000002.tar"))) == m["shards"][2]["bytes"]


def test_should_leave_no_partial_shard_when_writing_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path), max_samples=3) as w:
            for i in range(5):
                w.write(*sample(i))
            visible = sorted(n for n in os.listdir(tmp_path) if not n.startswith("."))
            assert visible == ["shard-000000.tar"]  # the shard in progress has a hidden temp name
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == ["shard-000000.tar"]  # the finished shard; no manifest, no temp file


@pytest.mark.parametrize("key", ["a.b", "", "dir/x", "x\\y", ".hidden"])
def test_should_reject_keys_webdataset_would_split(tmp_path, key):
    with ShardWriter(str(tmp_path)) as w:
        with pytest.raises(ClipjobError, match="sample key"):
            w.write(key, {"txt": "x"})


def test_should_reject_repeated_keys_and_bad_fields(tmp_path):
    with ShardWriter(str(tmp_path)) as w:
        w.write("a", {"txt": "x"})
        with pytest.raises(ClipjobError, match="repeated"):
            w.write("a", {"txt": "y"})
        with pytest.raises(ClipjobError, match="expected bytes, str or dict"):
            w.write("b", {"txt": 3})
        with pytest.raises(ClipjobError, match="no fields"):
            w.write("c", {})


def test_should_reject_a_key_repeated_anywhere_in_a_shard_but_not_in_the_next_shard(tmp_path):
    with ShardWriter(str(tmp_path), max_samples=3) as w:
        w.write("a", {"txt": "x"})
        w.write("b", {"txt": "x"})
        with pytest.raises(ClipjobError, match="^sample key 'a': repeated"):
            w.write("a", {"txt": "y"})  # not adjacent: a reader would keep only the first copy
        w.write("c", {"txt": "x"})
        w.write("a", {"txt": "z"})  # shard 2
    assert [s["samples"] for s in w.shards] == [3, 1]


def test_should_explain_missing_or_malformed_manifests(tmp_path):
    with pytest.raises(ClipjobError, match="no manifest.json"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ClipjobError, match="not valid JSON"):
        read_manifest(str(tmp_path))
    bad = {"format": MANIFEST_FORMAT, "shards": [{"name": "a.tar", "samples": 2, "bytes": 10}], "total_samples": 3}
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ClipjobError, match="total_samples"):
        read_manifest(str(tmp_path / "manifest.json"))
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(ClipjobError, match="format"):
        read_manifest(str(tmp_path))
