"""docs/kubernetes.md stays true to what CI checks."""

from __future__ import annotations

import re

import yaml

from .conftest import REPO, VALUES_DIR

GUIDE = REPO / "docs" / "kubernetes.md"


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)


def test_should_show_the_tested_corenet_recipe_values_when_reading_the_kubernetes_guide():
    (block,) = [b for b in yaml_blocks() if b.startswith("# vit-b16-32x8.yaml")]
    assert yaml.safe_load(block) == yaml.safe_load((VALUES_DIR / "corenet-vit-b16-32x8.yaml").read_text())


def test_should_name_only_files_that_exist_when_the_guide_points_at_the_repository():
    for path in set(re.findall(r"`((?:charts|k8s|tests|scripts|docs)/[\w./-]+)`", GUIDE.read_text())):
        assert (REPO / path).exists(), f"docs/kubernetes.md names {path}, which does not exist"
