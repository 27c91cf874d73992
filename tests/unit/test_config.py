import dataclasses
import re

import pytest

from clipjob.config import Config, build_config, field_docs, from_dict, parse_override, to_dict, to_yaml
from clipjob.errors import ClipjobError, ConfigError
from clipjob.presets import PRESETS


def test_should_apply_overrides_in_order_when_set_is_repeated():
    cfg = build_config("tiny-cpu", None, ["train.lr=1e-3", "train.lr=2e-3", "model.vision.layers=2"])
    assert cfg.train.lr == 2e-3 and cfg.model.vision.layers == 2
    assert cfg.model.text.kind == "minilm"  # untouched preset value survives


def test_should_parse_yaml_values_when_overriding():
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    assert parse_override("a=true") == {"a": True}
    assert parse_override("a=1e-3") == {"a": 1e-3}  # YAML 1.1 reads 1e-3 as a string; we do not
    assert parse_override("a=s3://b/x") == {"a": "s3://b/x"}


@pytest.mark.parametrize("override, fragment", [
    ("train.bogus=1", "train.bogus: unknown key"),
    ("model.vision.heads=5", "model.vision.width"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
    ("train.lr=-1", "train.lr: must be > 0"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("train.betas=[0.9]", "train.betas: expected a list of 2"),
    ("data.rrc_scale=[0.9, 2]", "data.rrc_scale"),
    ("model.vision.image_size=65", "model.vision.image_size"),
    ("eval.worker_nice=20", "eval.worker_nice: must be 0..19"),
    ("data.worker_nice=-1", "data.worker_nice: must be 0..19"),
    ("nope=1", "nope: unknown key"),
    ("train.lr", "expected key=value"),
])
def test_should_name_the_key_when_a_value_is_bad(override, fragment):
    with pytest.raises(ConfigError) as e:
        build_config("tiny-cpu", None, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, said", [
    ("train.stepz=5", "train.stepz: unknown key, did you mean train.steps? (known: "),  # a typo in its section
    ("train.num_workers=8", "train.num_workers: unknown key, did you mean data.num_workers? (known: "),  # wrong section
    ("steps=5", "steps: unknown key, did you mean train.steps? (known: "),  # no section
    ("model.vision.image_sise=96", "did you mean model.vision.image_size?"),
    ("train.bogus=1", "train.bogus: unknown key (known: "),  # nothing close: no guess
])
def test_should_suggest_the_key_meant_when_a_key_is_unknown(override, said):
    with pytest.raises(ConfigError) as e:
        build_config("tiny-cpu", None, [override])
    assert said in str(e.value), str(e.value)


def test_should_suggest_the_preset_meant_when_a_preset_is_unknown():
    with pytest.raises(ConfigError, match=r"'tiny-cpu-lite': unknown preset, did you mean tiny-cpu-lit\? \(known: "):
        build_config("tiny-cpu-lite")
    with pytest.raises(ConfigError, match=r"'nope': unknown preset \(known: "):
        build_config("nope")


def test_should_round_trip_through_yaml_when_every_preset_is_dumped(tmp_path):
    for name in PRESETS:
        cfg = build_config(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(to_yaml(cfg))
        assert build_config(None, str(path)) == cfg


def test_should_document_every_field():
    rows = field_docs()
    assert len(rows) > 40
    assert all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]
    types = {key: tp for key, tp, _ in rows}
    assert types["train.precision"] == "fp32 | bf16 | fp16 | auto" and types["model.text.kind"] == "transformer | minilm"
    assert types["train.lr"] == "float"


def test_should_be_immutable_after_build():
    cfg = build_config("tiny-cpu")
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'lr'"):
        cfg.train.lr = 1.0  # type: ignore[misc]
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_should_report_a_missing_config_file_by_name(tmp_path):
    path = str(tmp_path / "missing.yaml")
    with pytest.raises(ClipjobError, match=rf"^{re.escape(path)}: not found"):
        build_config(None, path)


def test_should_refuse_multiscale_batches_smaller_than_accum_steps_when_the_config_is_built():
    """A cross-field rule of validate: it fails at `clipjob train` start (exit 2), before any process group."""
    base = ["model.vision.image_size=32", "model.vision.patch_size=16", "train.batch_size=8", "train.accum_steps=2"]
    with pytest.raises(ConfigError, match=r"^data.multiscale_sizes: at 128 px a step gets 1 samples per rank, fewer "
                                          r"than train.accum_steps=2"):  # 8 * 32² // 128² = 0 -> at least 1
        build_config("tiny-cpu", None, base + ["data.multiscale=true", "data.multiscale_sizes=[32,128]"])
    assert build_config("tiny-cpu", None, base + ["data.multiscale=true", "data.multiscale_sizes=[32,64]"])  # 2 >= 2
    assert build_config("tiny-cpu", None, base + ["data.multiscale_sizes=[32,128]"])  # multi-scale off: not used
