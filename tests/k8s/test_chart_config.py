"""charts/train's training config is one clipjob accepts: the rendered ConfigMap, preset and --set overrides
of every values file go through clipjob's own config loader, and the schema names only real keys."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
import yaml

from .conftest import CHART, VALUES_DIR, values_files

config_mod = pytest.importorskip("clipjob.config", reason="the clipjob package is not importable")
presets_mod = pytest.importorskip("clipjob.presets", reason="the clipjob package is not importable")


def arg_values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


@pytest.mark.parametrize("values", [None, *values_files()], ids=lambda v: v or "defaults")
def test_should_build_a_valid_clipjob_config_when_the_chart_renders_values(render, values, tmp_path):
    r = render(values) if values else render()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(r.one("ConfigMap")["data"]["config.yaml"])
    args = r.container()["args"]
    (preset,) = arg_values(args, "--preset") or [None]
    (run_dir,) = arg_values(args, "--run-dir")
    overrides = [*arg_values(args, "--set"), f"storage.run_dir={run_dir}"]
    cfg = config_mod.build_config(preset, str(config_file), overrides)
    assert cfg.storage.run_dir == run_dir and cfg.data.train


def test_should_offer_only_known_presets_when_values_files_name_one():
    files = [CHART / "values.yaml", *(VALUES_DIR / v for v in values_files())]
    for name in (yaml.safe_load(f.read_text()).get("preset") for f in files):
        if name is None:  # an overlay (queue-kueue.yaml, gang-volcano.yaml) keeps the preset it is laid over
            continue
        assert name in presets_mod.PRESETS, f"preset {name!r} is not one of {sorted(presets_mod.PRESETS)}"


def test_should_check_only_real_config_keys_and_choices_when_the_schema_names_them():
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]

    def walk(sch: dict, cls: type, path: str) -> None:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key, sub in sch.get("properties", {}).items():
            assert key in fields, f"values.schema.json checks config.{path}{key}, which clipjob does not have"
            if dataclasses.is_dataclass(hints[key]):
                walk(sub, hints[key], f"{path}{key}.")
            if "enum" in sub:  # the schema's choices are clipjob's choices
                assert set(sub["enum"]) == set(typing.get_args(hints[key])), f"config.{path}{key}"

    walk(schema, config_mod.Config, "")
