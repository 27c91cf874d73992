"""What a module imports, seen from a fresh interpreter (the test process has imported everything already):
the read paths stay free of the heavy or optional packages they do not need."""

from __future__ import annotations

import subprocess
import sys

from trainrun import make_shards


def fresh_python(code: str) -> str:
    """stdout of `python -c code` in a new interpreter."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_should_read_imagenet_metadata_without_importing_open_clip_timm_or_torch():
    code = ("import sys; from clipjob.eval.imagenet_meta import *; imagenet_classnames(); imagenet_wnids(); "
            "openai_imagenet_templates(); print(sorted({'open_clip', 'timm', 'torch'} & set(sys.modules)))")
    assert fresh_python(code).strip() == "[]"


def test_should_not_import_webdataset_or_the_authoring_package_when_reading_shards(tmp_path):
    d = make_shards(tmp_path / "ds", samples=2, per_shard=2)
    code = ("import sys, collections; from clipjob.data import pipeline, shards; "
            f"n = len(list(shards.read_tar_samples({d + '/train-000000.tar'!r}, collections.Counter()))); "
            "print(n, sorted(m for m in sys.modules "
            "if m.split('.')[0] == 'webdataset' or m.startswith('clipjob.datasets')))")
    assert fresh_python(code).split() == ["2", "[]"]
