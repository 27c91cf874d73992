"""config.json_schema: the bounds it states are validate()'s, and YAML files read floats as helm writes them."""

from __future__ import annotations

import jsonschema
import pytest

from clipjob.config import SCHEMA_BOUNDS, Config, build_config, json_schema, load_yaml, to_dict
from clipjob.errors import ConfigError


def _outside_and_edge(bound: dict[str, float], is_int: bool) -> list[tuple[float, bool]]:
    """(value, schema accepts it) pairs on both sides of each bound."""
    step = 1 if is_int else 1e-3
    pairs = []
    for kind, b in bound.items():
        if kind == "minimum":
            pairs += [(b - step, False), (b, True)]
        elif kind == "exclusiveMinimum":
            pairs += [(b, False), (b + step, True)]
        elif kind == "maximum":
            pairs += [(b + step, False), (b, True)]
        elif kind == "exclusiveMaximum":
            pairs += [(b, False), (b - step, True)]
    return pairs


@pytest.mark.parametrize("key", sorted(SCHEMA_BOUNDS))
def test_should_state_a_bound_validate_enforces_when_the_schema_bounds_a_key(key):
    """Outside a schema bound clipjob refuses the value naming the key; at the edge it does not refuse it
    for that bound (another key's rule may still apply, e.g. width % heads)."""
    section, *rest = key.split(".")
    schema = json_schema()["properties"][section]
    for part in rest:
        schema = schema["properties"][part]
    is_int = schema["type"] == "integer"
    for value, accepted in _outside_and_edge(SCHEMA_BOUNDS[key], is_int):
        value = int(value) if is_int else value
        try:
            build_config(None, None, [f"{key}={value}"])
            error = ""
        except ConfigError as e:
            error = str(e)
        bound_error = error.startswith(f"{key}: must be")
        assert bound_error != accepted, f"{key}={value}: schema {'accepts' if accepted else 'rejects'}, clipjob: {error!r}"


def test_should_accept_every_preset_and_reject_a_misspelled_key_when_validating_with_the_schema():
    from clipjob.presets import PRESETS

    schema = json_schema()
    for name in [None, *PRESETS]:
        jsonschema.validate(to_dict(build_config(name)), schema)
    with pytest.raises(jsonschema.ValidationError, match="precison"):
        jsonschema.validate({"train": {"precison": "bf16"}}, schema)
    with pytest.raises(jsonschema.ValidationError, match="'fp8' is not one of"):
        jsonschema.validate({"train": {"precision": "fp8"}}, schema)
    assert to_dict(Config())["data"]["rrc_scale"] == schema["properties"]["data"]["properties"]["rrc_scale"]["default"]


def test_should_read_floats_without_a_dot_as_numbers_when_loading_yaml_as_helm_writes_it(tmp_path):
    """helm's toYaml writes 0.00001 as 1e-05, which PyYAML's YAML 1.1 rules read as a string."""
    f = tmp_path / "config.yaml"
    f.write_text("model:\n  vision:\n    ln_eps: 1e-05\ntrain:\n  lr: 5E-4\n  warmup_init_lr: -1e+0\n  seed: 7\n"
                 "data:\n  caption_key: 1e-x\n")
    data = load_yaml(str(f))
    assert data["model"]["vision"]["ln_eps"] == 1e-05 and data["train"]["lr"] == 5e-4
    assert data["train"]["warmup_init_lr"] == -1.0 and data["train"]["seed"] == 7
    assert data["data"]["caption_key"] == "1e-x"
    f.write_text("model:\n  vision:\n    ln_eps: 1e-06\n")
    assert build_config(None, str(f)).model.vision.ln_eps == 1e-06
