"""charts/train rendered objects validated offline, as an API server would:

- built-in kinds with kubernetes-validate --strict (unknown fields and wrong types fail);
- the PyTorchJob against the Training Operator v1.9 CRD's openAPIV3Schema, the TrainJob and TrainingRuntime
  against Kubeflow Trainer v2's (jsonschema; unknown fields fail as they would under kubectl's strict field
  validation), the PyTorchJob also through the Training SDK's model classes;
- the Volcano PodGroup against a hand-written schema of its documented fields (tests/k8s/schemas/: the CRD
  cannot be fetched here);
- the pod templates inside the PyTorchJob and the TrainingRuntime as v1 PodTemplates.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import yaml

from .conftest import (
    KUBE_VERSIONS,
    PODGROUP_SCHEMA,
    PYTORCHJOB_CRD,
    TRAININGRUNTIME_CRD,
    TRAINJOB_CRD,
    values_files,
)

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

CASES = [None, *values_files()]  # None = the chart's defaults
# kind -> (the CRD file, its version) of the custom kinds the chart renders; PodGroup has its own schema file
CRDS = {"PyTorchJob": (PYTORCHJOB_CRD, "v1"), "TrainJob": (TRAINJOB_CRD, "v1alpha1"),
        "TrainingRuntime": (TRAININGRUNTIME_CRD, "v1alpha1")}
CUSTOM_KINDS = {*CRDS, "PodGroup"}


def rendered(render, values):
    return render(values) if values else render()


def validate_builtin(obj: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{obj['kind']} {obj['metadata'].get('name')} invalid for Kubernetes {version}: "
                    f"{'.'.join(map(str, e.caused_by.path))}: {e.caused_by.message}")


def as_pod_template(name: str, template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(name, pod template) inside a PyTorchJob's replicas or a TrainingRuntime's replicated jobs."""
    name = obj["metadata"]["name"]
    if obj["kind"] == "PyTorchJob":
        return [(f"{name}-{r.lower()}", s["template"]) for r, s in obj["spec"]["pytorchReplicaSpecs"].items()]
    if obj["kind"] == "TrainingRuntime":
        return [(f"{name}-{j['name']}", j["template"]["spec"]["template"])
                for j in obj["spec"]["template"]["spec"]["replicatedJobs"]]
    return []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", CASES, ids=lambda v: v or "defaults")
def test_should_pass_kubernetes_validate_strict_when_built_in_kinds_are_rendered(render, values, version):
    for obj in rendered(render, values).docs:
        if obj["kind"] not in CUSTOM_KINDS:
            validate_builtin(obj, version)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", CASES, ids=lambda v: v or "defaults")
def test_should_pass_kubernetes_validate_strict_when_pod_templates_of_custom_kinds_are_wrapped(render, values, version):
    for obj in rendered(render, values).docs:
        for name, template in pod_templates(obj):
            validate_builtin(as_pod_template(name, template), version)


# ---- the CRDs (and the PodGroup's hand-written schema) ---------------------------------------------------


@functools.cache
def schema_validator(kind: str):
    """A jsonschema validator for a custom kind; skips (saying why) when its CRD is not beside this checkout."""
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema")
    if kind == "PodGroup":
        return jsonschema.Draft7Validator(json.loads(PODGROUP_SCHEMA.read_text()))
    path, name = CRDS[kind]
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == name]
    return jsonschema.Draft7Validator(strict_structural(version["schema"]["openAPIV3Schema"]))


def strict_structural(schema: dict) -> dict:
    """A structural schema prunes unknown fields silently; make them errors so typos are caught here."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(schema)
    return schema


def needs_schema(kind: str) -> None:
    if kind in CRDS and not CRDS[kind][0].exists():
        pytest.skip(f"the {kind} CRD is not beside this checkout ({CRDS[kind][0]})")


def schema_errors(obj: dict) -> list[str]:
    """What the kind's schema says about `obj`, one line per error ([] = valid)."""
    needs_schema(obj["kind"])
    errors = sorted(schema_validator(obj["kind"]).iter_errors(obj), key=lambda e: list(e.path))
    return [f"{obj['kind']} {'.'.join(map(str, e.path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("values", CASES, ids=lambda v: v or "defaults")
def test_should_match_their_crd_schemas_when_custom_kinds_are_rendered(render, values):
    for obj in rendered(render, values).docs:
        if obj["kind"] in CUSTOM_KINDS:
            errors = schema_errors(obj)
            assert not errors, "\n".join(errors[:10])


def test_should_fail_the_crd_schema_when_a_pytorchjob_field_is_misspelled(render):
    job = copy.deepcopy(render().one("PyTorchJob"))
    job["spec"]["elasticPolicy"]["rdzvBackEnd"] = job["spec"]["elasticPolicy"].pop("rdzvBackend")
    assert schema_errors(job), "a misspelled field must not pass"


# ---- the Training Operator's Python SDK -----------------------------------------------------------------


@pytest.mark.parametrize("values", CASES, ids=lambda v: v or "defaults")
def test_should_deserialize_into_the_kubeflow_sdk_model_when_the_pytorchjob_is_rendered(render, values):
    training = pytest.importorskip("kubeflow.training", reason="pip install kubeflow-training")
    for job in rendered(render, values).all("PyTorchJob"):

        class Response:  # what ApiClient.deserialize reads
            data = json.dumps(job)

        model = training.ApiClient().deserialize(Response(), "KubeflowOrgV1PyTorchJob")
        assert isinstance(model, training.KubeflowOrgV1PyTorchJob)
        spec = model.spec
        assert spec.run_policy is not None
        assert spec.elastic_policy.rdzv_backend == "c10d"
        assert spec.elastic_policy.min_replicas <= spec.pytorch_replica_specs["Worker"].replicas
        assert spec.pytorch_replica_specs["Worker"].replicas <= spec.elastic_policy.max_replicas
        assert spec.nproc_per_node == job["spec"]["nprocPerNode"]
        (container,) = spec.pytorch_replica_specs["Worker"].template.spec.containers
        assert container.name == "pytorch"
        # Nothing of the rendered object was dropped by the model (it silently ignores unknown fields).
        assert training.ApiClient().sanitize_for_serialization(model) == quantities_as_strings(job)


def quantities_as_strings(node, in_resources: bool = False):
    """The SDK models resource quantities as strings, as the API server returns them."""
    if isinstance(node, dict):
        return {k: quantities_as_strings(v, in_resources or k == "resources") for k, v in node.items()}
    if isinstance(node, list):
        return [quantities_as_strings(v, in_resources) for v in node]
    if in_resources and isinstance(node, (int, float)) and not isinstance(node, bool):
        return str(node)
    return node
