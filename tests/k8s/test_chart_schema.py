"""charts/train: helm lint, values documentation, and values.schema.json rejecting bad values."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from .conftest import CHART, VALUES_DIR, values_files


def lint(helm, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm), "lint", "--strict", str(CHART), *args],
                          capture_output=True, text=True, check=False, timeout=60)


def test_should_pass_helm_lint_strict_when_values_are_defaults(helm):
    proc = lint(helm)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values", values_files())
def test_should_pass_helm_lint_strict_when_values_file_is_used(helm, values):
    proc = lint(helm, "-f", str(VALUES_DIR / values))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_should_document_every_value_with_a_dash_dash_comment_when_reading_values_yaml():
    """helm-docs style: each key has a `# --` comment block above it, or sits inside a documented value,
    or is a section whose keys all do. The example under `config:` is content, not values to document."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w./-]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j, block = i - 1, []
        while j >= 0 and lines[j].lstrip().startswith("#"):
            block.append(lines[j])
            j -= 1
        documented = any("# --" in b for b in block) or any(d for _, d in stack)
        is_section = line.rstrip().endswith(":")
        if not documented and not is_section:
            undocumented.append(line.strip())
        stack.append((indent, documented))
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_should_describe_every_value_in_the_schema_when_values_yaml_has_it():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict, sch: dict, path: str) -> None:
        for key, value in node.items():
            props = sch.get("properties", {})
            assert key in props, f"{path}{key} is in values.yaml but not in values.schema.json"
            sub = props[key]
            if isinstance(value, dict) and "properties" in sub and value:
                walk(value, sub, f"{path}{key}.")

    walk(values, schema, "")


def test_should_forbid_unknown_keys_in_every_schema_object_when_reading_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_by_design: set[str] = set()  # none: the config sections are generated closed (clipjob config schema)

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and path not in open_by_design and not path.endswith("/not"):
                assert node.get("additionalProperties") is False, f"{path or '/'} allows unknown keys"
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}/{i}")

    walk({k: v for k, v in schema.items() if k != "definitions"}, "")


BAD_VALUES = [
    ("nodes.count=-1", "/nodes/count"),
    ("nodes.count=0", "/nodes/count"),
    ("nodes.min=0", "/nodes/min"),
    ("unknownKey=1", "additional properties 'unknownKey'"),
    ("image.unknown=1", "additional properties 'unknown'"),
    ("config.train.precision=fp8", "/config/train/precision"),
    ("config.train.batch_size=0", "/config/train/batch_size"),
    ("config.storage.run_dir=s3://x/y", "additional properties 'run_dir'"),
    ("workload=mpijob", "/workload"),
    ("restartPolicy=Sometimes", "/restartPolicy"),
    ("runPolicy.cleanPodPolicy=Some", "/runPolicy/cleanPodPolicy"),
    ("runPolicy.backoffLimit=-1", "/runPolicy/backoffLimit"),
    ("elastic.rdzvBackend=zookeeper", "/elastic/rdzvBackend"),
    ("elastic.rdzvPort=80", "/elastic/rdzvPort"),
    ("nprocPerNode=many", "/nprocPerNode"),
    ("gpu.perNode=-8", "/gpu/perNode"),
    ("terminationGracePeriodSeconds=5", "/terminationGracePeriodSeconds"),
    ("shm.sizeLimit=lots", "/shm/sizeLimit"),
    ("runDir=my-bucket/runs", "/runDir"),
    ("runDir=", "/runDir"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ("s3.existingSecret=Not_A_Name", "/s3/existingSecret"),
    ("scheduling.kueueQueue=Team A", "/scheduling/kueueQueue"),
    ("workload=trainjob", "/workload"),
    ("trainJob.runtime=torch-distributed", "additional properties 'runtime'"),
    ("trainJob.clusterTrainingRuntime=Torch_Distributed", "/trainJob/clusterTrainingRuntime"),
    ("scheduling.volcano.minResources.cpu=lots", "/scheduling/volcano/minResources/cpu"),
    ("scheduling.volcano.minAvailabe=4", "additional properties 'minAvailabe'"),
]


@pytest.mark.parametrize("assignment,where", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_should_reject_values_when_they_break_the_schema(render_error, assignment, where):
    key, value = assignment.split("=", 1)
    err = render_error(sets={key: value})
    assert "schema" in err and where in err, err


def test_should_reject_inline_aws_credentials_when_given_as_env_values(render_error):
    err = render_error(sets={"env[0].name": "AWS_SECRET_ACCESS_KEY", "env[0].value": "hunter2"})
    assert "/env/0" in err


@pytest.mark.parametrize("sets,message", [
    ({"nodes.count": "4", "nodes.min": "5", "nodes.max": "8"}, "min <= count <= max"),
    ({"nodes.count": "4", "nodes.min": "2", "nodes.max": "3"}, "min <= count <= max"),
    ({"nodes.count": "4", "nodes.min": "2", "workload": "indexedJob"}, "fixed size"),
    ({"nodes.count": "4", "nodes.max": "8", "workload": "trainJob"}, "fixed size"),
], ids=["min-above-count", "max-below-count", "indexed-job-elastic", "trainjob-elastic"])
def test_should_reject_node_bounds_when_min_count_max_are_inconsistent(render_error, sets, message):
    assert message in render_error(sets=sets)
