"""ImageNet-1k metadata for zero-shot eval: OpenAI's curated class names, its 80 prompt templates, the wnids.

Read at run time from the installed `open_clip_torch` package (names, templates) and from `timm`, which
open_clip_torch requires (wnids); no copy of the lists lives in this repository. The two source files are
loaded as plain files, without importing open_clip or timm (that would cost seconds and pull in models).
Order: index i is the class of the i-th wnid in sorted order, i.e. the i-th folder of an ImageFolder-layout
validation set. Note the OpenAI list is not unique: 'missile' and 'sunglasses' appear twice each.
"""

from __future__ import annotations

import functools
import importlib.util
import types
from pathlib import Path

from clipjob.errors import ClipjobError

_INSTALL_HINT = "install it with `pip install open_clip_torch`"


def _package_file(package: str, relative: str) -> Path:
    """Path of a file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / relative
        if path.is_file():
            return path
    raise ClipjobError(f"ImageNet metadata file {package}/{relative} not found: {_INSTALL_HINT}")


@functools.lru_cache(maxsize=1)
def _open_clip_metadata() -> types.ModuleType:
    """open_clip/zero_shot_metadata.py, a module of plain tuples, executed on its own."""
    path = _package_file("open_clip", "zero_shot_metadata.py")
    spec = importlib.util.spec_from_file_location("_clipjob_open_clip_zero_shot_metadata", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imagenet_classnames() -> list[str]:
    """The 1000 OpenAI curated ImageNet class names ('tench', 'goldfish', ..., 'kite (bird of prey)', ...)."""
    names = list(getattr(_open_clip_metadata(), "IMAGENET_CLASSNAMES", ()))
    if len(names) != 1000:
        raise ClipjobError(f"open_clip's IMAGENET_CLASSNAMES has {len(names)} names, not 1000: {_INSTALL_HINT}")
    return names


def openai_imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates as format strings, e.g. 'a bad photo of a {}.'."""
    # open_clip stores them as lambdas `lambda c: f'...{c}...'`; calling one with "{}" gives the format string.
    templates = [t("{}") for t in getattr(_open_clip_metadata(), "OPENAI_IMAGENET_TEMPLATES", ())]
    if len(templates) != 80:
        raise ClipjobError(f"open_clip's OPENAI_IMAGENET_TEMPLATES has {len(templates)} entries, not 80: "
                           f"{_INSTALL_HINT}")
    return templates


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in sorted order ('n01440764', ...), from timm's synset list."""
    text = _package_file("timm", "data/_info/imagenet_synsets.txt").read_text(encoding="utf-8")
    wnids = text.split()
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise ClipjobError(f"timm's imagenet_synsets.txt holds {len(wnids)} wnids, not 1000 sorted: {_INSTALL_HINT}")
    return wnids
