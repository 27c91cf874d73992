"""clipjob/eval/imagenet_meta.py: OpenAI ImageNet class names, prompt templates and wnids, read from packages
(without importing open_clip: tests/integration/test_import_isolation.py)."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from clipjob.errors import ClipjobError
from clipjob.eval import imagenet_meta
from clipjob.eval.imagenet_meta import imagenet_classnames, imagenet_wnids, openai_imagenet_templates


def test_classnames_are_the_openai_curated_list():
    names = imagenet_classnames()
    assert len(names) == 1000
    assert names[:3] == ["tench", "goldfish", "great white shark"]
    assert names[21] == "kite (bird of prey)"
    assert names[-1] == "toilet paper"
    assert all(isinstance(n, str) and n == n.strip() and n for n in names)
    # The OpenAI list names two pairs of classes alike (missile/projectile, sunglass/sunglasses): 998 distinct.
    assert {n: c for n, c in Counter(names).items() if c > 1} == {"missile": 2, "sunglasses": 2}


def test_templates_are_80_format_strings():
    templates = openai_imagenet_templates()
    assert len(templates) == 80 and len(set(templates)) == 80
    assert all(isinstance(t, str) and t.count("{}") == 1 for t in templates)
    assert templates[0] == "a bad photo of a {}."
    assert "itap of a {}." in templates
    assert templates[0].format("tench") == "a bad photo of a tench."


def test_wnids_are_sorted_and_start_with_tench():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert wnids == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"  # tench ... toilet tissue
    assert all(w.startswith("n") and len(w) == 9 for w in wnids)


def test_missing_package_is_a_one_line_clipjob_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real_find_spec(name))
    imagenet_meta._open_clip_metadata.cache_clear()
    try:
        with pytest.raises(ClipjobError, match=r"zero_shot_metadata\.py not found: install .*open_clip_torch"):
            imagenet_classnames()
    finally:
        imagenet_meta._open_clip_metadata.cache_clear()
