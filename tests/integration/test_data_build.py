"""`clipjob data build` and `clipjob data inspect`: folder, CSV/TSV/parquet and CoreNet inputs, shard size,
resize, dedup, resuming after a crash, and the restricted unpickler."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from clipjob.data.shards import read_tar_samples
from clipjob.datasets import build
from clipjob.datasets.build import BuildOptions, build_shards
from clipjob.datasets.corenet_tar import UnsafePickle, plain_unpickle
from clipjob.datasets.inspect import format_report, inspect_shards
from clipjob.datasets.writer import ShardWriter
from clipjob.errors import ClipjobError


def jpeg(w: int, h: int, seed: int = 0) -> bytes:
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    x = (seed * 11) % max(1, w - 8)
    ImageDraw.Draw(img).rectangle((x, 0, x + 8, 8), fill=(255, (seed * 37) % 256, seed // 256))  # distinct per seed
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def clipjob(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipjob", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def samples_of(out: str) -> list[dict]:
    m = json.loads(Path(out, "manifest.json").read_text())
    bad: Counter = Counter()
    got = [s for sh in m["shards"] for s in read_tar_samples(f"{out}/{sh['name']}", bad)]
    assert not bad and len(got) == m["total_samples"]
    return got


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """30 images with sidecar captions in nested folders, plus: a duplicate, a missing caption, a corrupt file."""
    root = tmp_path / "images"
    for i in range(30):
        d = root / f"part{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:02d}.jpg").write_bytes(jpeg(320 + i, 240, seed=i))
        (d / f"img{i:02d}.txt").write_text(f"a gradient photo number {i}")
    (root / "copy.jpg").write_bytes((root / "part0" / "img00.jpg").read_bytes())
    (root / "copy.txt").write_text("the same picture again")
    (root / "nocaption.png").write_bytes(jpeg(64, 64, seed=99))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "broken.txt").write_text("broken")
    return root


def test_should_build_shards_from_an_image_folder_with_the_cli_in_parallel(image_folder, tmp_path):
    out = tmp_path / "shards"
    p = clipjob("data", "build", str(image_folder), "--out", str(out), "--samples-per-shard", "8",
                "--max-size", "200", "--workers", "2")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 30 and summary["duplicates"] == 1 and summary["shards"] == 5  # 33 inputs
    assert summary["bad"] == {"missing_caption": 1, "corrupt_image": 1}
    assert p.stderr == ""  # no bar where stderr is no terminal (a pod's log); a line every 30 s, and this took less
    m = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in m["shards"]] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert all(s["bytes"] == (out / s["name"]).stat().st_size for s in m["shards"])
    got = samples_of(str(out))
    assert all(min(Image.open(io.BytesIO(s["jpg"])).size) == 200 for s in got)  # 240 px -> 200 px
    meta = json.loads(got[0]["json"])
    assert meta["height"] == 240 and meta["src"].endswith(".jpg")

    p = clipjob("data", "inspect", str(out), "--verify")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"{out}: 5 shards, 30 samples, 30 good, 0 bad (images decoded)")
    assert "image_shorter_side" in p.stdout and "caption_words" in p.stdout


def test_should_aim_at_the_target_shard_size_in_bytes(image_folder, tmp_path):
    out = str(tmp_path / "shards")
    summary = build_shards(str(image_folder), BuildOptions(out=out, shard_size=60_000, progress=False))
    sizes = [s["bytes"] for s in json.loads(Path(out, "manifest.json").read_text())["shards"]]
    assert summary["shards"] == len(sizes) >= 3
    assert all(30_000 < b < 90_000 for b in sizes[:-1]), sizes


def test_should_resume_after_a_crash_without_redoing_finished_shards(image_folder, tmp_path, monkeypatch):
    clean = str(tmp_path / "clean")
    build_shards(str(image_folder), BuildOptions(out=clean, samples_per_shard=10, progress=False))
    out = str(tmp_path / "crashed")
    real_prepare, seen = build.prepare, []

    def crash_in_unit_2(rec, opts, claims):
        seen.append(rec.key)
        if rec.key == "000000025":
            raise RuntimeError("simulated crash")
        return real_prepare(rec, opts, claims)

    monkeypatch.setattr(build, "prepare", crash_in_unit_2)
    with pytest.raises(RuntimeError):
        build_shards(str(image_folder), BuildOptions(out=out, samples_per_shard=10, progress=False))
    assert sorted(os.listdir(out)) == ["_build", "shard-000000.tar", "shard-000001.tar"]  # no partial shard
    seen.clear()
    monkeypatch.setattr(build, "prepare", lambda *a: seen.append(a[0].key) or real_prepare(*a))
    summary = build_shards(str(image_folder), BuildOptions(out=out, samples_per_shard=10, progress=False))
    assert summary["resumed_shards"] == 2 and min(seen) == "000000020"  # units 0 and 1 were not redone
    assert Path(out, "manifest.json").read_text() == Path(clean, "manifest.json").read_text()
    for name in ("shard-000000.tar", "shard-000002.tar", "shard-000003.tar"):
        assert Path(out, name).read_bytes() == Path(clean, name).read_bytes()


def test_should_refuse_to_mix_a_build_with_different_settings(image_folder, tmp_path):
    out = str(tmp_path / "o")
    build_shards(str(image_folder), BuildOptions(out=out, samples_per_shard=10, progress=False))
    with pytest.raises(ClipjobError, match="other settings \\(max_size\\)"):
        build_shards(str(image_folder), BuildOptions(out=out, samples_per_shard=10, max_size=64, progress=False))
    (image_folder / "new.jpg").write_bytes(jpeg(50, 50, seed=123))
    with pytest.raises(ClipjobError, match="the input files changed"):
        build_shards(str(image_folder), BuildOptions(out=out, samples_per_shard=10, progress=False))


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "web"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_should_build_from_a_csv_with_relative_paths_and_urls(tmp_path, http_dir):
    web, base = http_dir
    (tmp_path / "imgs").mkdir()
    rows = ["filepath,caption"]
    for i in range(6):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg(100, 80, seed=i))
        rows.append(f"imgs/{i}.jpg,\"a local picture, number {i}\"")
    for i in range(6, 9):
        (web / f"{i}.jpg").write_bytes(jpeg(100, 80, seed=i))
        rows.append(f"{base}/{i}.jpg,a downloaded picture {i}")
    rows += [f"{base}/gone.jpg,missing on the server", "imgs/0.jpg,", "imgs/nope.jpg,no such file"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    s = build_shards(str(tmp_path / "train.csv"), BuildOptions(out=out, samples_per_shard=4, progress=False))
    assert s["kind"] == "table" and s["samples"] == 9
    assert s["bad"] == {"missing_image": 2, "empty_caption": 1}
    caps = sorted(x["txt"].decode() for x in samples_of(out))
    assert caps[0] == "a downloaded picture 6" and "a local picture, number 5" in caps


def test_should_build_from_tsv_and_parquet_with_named_columns(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(jpeg(50, 50, seed=i))
    (tmp_path / "t.tsv").write_text("pic\ttitle\n" + "".join(f"{i}.png\tpicture {i}\n" for i in range(4)))
    pq.write_table(pa.table({"pic": [f"{i}.png" for i in range(4)], "title": [f"p {i}" for i in range(4)]}),
                   tmp_path / "t.parquet")
    for table in ("t.tsv", "t.parquet"):
        out = str(tmp_path / f"out-{table}")
        opts = BuildOptions(out=out, image_column="pic", caption_column="title", progress=False)
        assert build_shards(str(tmp_path / table), opts)["samples"] == 4
    with pytest.raises(ClipjobError, match="no column 'image_url'"):
        build_shards(str(tmp_path / "t.tsv"), BuildOptions(out=str(tmp_path / "x"), image_column="image_url"))


def test_should_count_captions_that_are_not_utf8_or_too_long_in_csv_and_tsv(tmp_path):
    """Was: a Latin-1 caption kept with replacement characters, and a traceback on a caption over csv's
    131,072-character field limit. Now both are skipped and counted; a caption of exactly the limit is kept."""
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(60, 50, seed=i))
    limit = build.MAX_CAPTION_CHARS
    caps = [b"caf\xe9 cr\xe8me br\xfbl\xe9e", b"x" * (limit + 1), b"y" * limit, "na\u00efve caf\u00e9".encode()]
    for sep, name in ((b",", "t.csv"), (b"\t", "t.tsv")):
        rows = [b"image" + sep + b"caption"] + [f"{i}.jpg".encode() + sep + c for i, c in enumerate(caps)]
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + b"\n".join(rows) + b"\n")  # with a byte-order mark
    p = clipjob("data", "build", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out-csv"), "--workers", "1",
                "--no-progress")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    summaries = [json.loads(p.stdout), build_shards(str(tmp_path / "t.tsv"),
                                                    BuildOptions(out=str(tmp_path / "out-tsv"), progress=False))]
    for s in summaries:
        assert s["samples"] == 2 and s["bad"] == {"caption_not_utf8": 1, "caption_too_long": 1}, s
        assert sorted(x["txt"].decode() for x in samples_of(s["out"])) == ["na\u00efve caf\u00e9", "y" * limit]


class Evil:
    """Pickles into a call of os.system: what a malicious dataset would ship."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def corenet_dataset(root: Path, per_tar: int = 5, tars: int = 2, evil_sample: Path | None = None) -> Path:
    root.mkdir(parents=True)
    names = [f"{k}.tar.gz" for k in range(tars)]
    (root / "metadata.pkl").write_bytes(pickle.dumps(
        {"total_tar_files": tars, "max_files_per_tar": per_tar, "tar_file_names": names}))
    for k, name in enumerate(names):
        with tarfile.open(root / name, "w:gz") as tar:
            for idx in range(k * per_tar, (k + 1) * per_tar):
                sample = {"image": base64.b64encode(jpeg(64, 48, seed=idx)), "text": f"corenet sample {idx}"}
                if idx == 3:
                    sample = {"image": base64.b64encode(jpeg(64, 48, seed=idx)), "texts": ["first", "second"]}
                if evil_sample and idx == 7:
                    sample = {"image": Evil(evil_sample), "text": "evil"}
                data = pickle.dumps(sample)
                info = tarfile.TarInfo(f"{k}/{idx}.pkl")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def test_should_convert_a_corenet_tar_dataset_and_skip_a_malicious_sample(tmp_path):
    marker = tmp_path / "pwned"
    src = corenet_dataset(tmp_path / "corenet", evil_sample=marker)
    out = str(tmp_path / "out")
    s = build_shards(str(src), BuildOptions(out=out, samples_per_shard=3, progress=False))
    assert s["kind"] == "corenet" and s["samples"] == 9 and s["bad"] == {"unsafe_pickle": 1}
    assert not marker.exists()
    got = {x["__key__"]: x["txt"].decode() for x in samples_of(out)}
    assert got["000000003"] == "first" and got["000000008"] == "corenet sample 8" and "000000007" not in got
    names = [sh["name"] for sh in json.loads(Path(out, "manifest.json").read_text())["shards"]]
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]


def test_should_refuse_a_malicious_corenet_metadata_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    src = corenet_dataset(tmp_path / "corenet")
    (src / "metadata.pkl").write_bytes(pickle.dumps({"tar_file_names": ["0.tar.gz"], "x": Evil(marker)}))
    p = clipjob("data", "build", str(src), "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and not marker.exists()
    assert p.stderr.strip().count("\n") == 0 and "metadata.pkl: refused: the pickle refers to posix.system" in p.stderr


def test_should_admit_only_plain_values_when_unpickling():
    plain = {"a": [1, "x", b"y", {"n": 2}], "tar_file_names": ["0.tar.gz"]}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert plain_unpickle(pickle.dumps(plain, protocol=protocol)) == plain
    for bad in (pickle.dumps({"f": 1.5}), pickle.dumps((1, 2)), pickle.dumps(Evil(Path("/nonexistent/x"))),
                pickle.dumps(set()), pickle.dumps({"c": Counter()}), b"not a pickle"):
        with pytest.raises(UnsafePickle):
            plain_unpickle(bad)


def test_should_find_corrupt_pixel_data_only_when_verifying(tmp_path):
    out = str(tmp_path / "ds")
    with ShardWriter(out, prefix="s") as w:
        w.write("a", {"jpg": jpeg(400, 300), "txt": "fine"})
        w.write("b", {"jpg": jpeg(400, 300, seed=1)[:1500], "txt": "cut short"})
        w.write("c", {"jpg": jpeg(400, 300, seed=2), "txt": b"\xff\xfe"})
    quick, full = inspect_shards(out), inspect_shards(out, verify=True)
    assert quick["samples"] == full["samples"] == 3 and quick["bad"] == {"caption_not_utf8": 1}
    assert full["bad"] == {"caption_not_utf8": 1, "corrupt_image": 1} and full["good"] == 1
    assert quick["image_width"]["max"] == 400 and quick["caption_chars"]["median"] == 6.5
    assert re.search(r"^ +min +p5 +median +mean +p95 +max$", format_report(full), re.M), format_report(full)
    (tmp_path / "noise.tar").write_bytes(random.Random(0).randbytes(5000))  # nothing readable: no empty table
    noise = inspect_shards(str(tmp_path / "noise.tar"))
    assert noise["good"] == 0 and format_report(noise).splitlines()[1:] == ["  bad  unreadable_shard     1"]
