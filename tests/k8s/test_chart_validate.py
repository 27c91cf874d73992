"""charts/train rendered objects validated offline, as an API server would:

- built-in kinds with kubernetes-validate --strict (unknown fields and wrong types fail);
- the PyTorchJob against the Training Operator v1.9 CRD's openAPIV3Schema (jsonschema, unknown fields
  fail as they would under kubectl's strict field validation), through the Training SDK's model classes,
  and its pod templates as v1 PodTemplates.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import yaml

from .conftest import KUBE_VERSIONS, PYTORCHJOB_CRD, values_files

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

CASES = [None, *values_files()]  # None = the chart's defaults


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


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", CASES, ids=lambda v: v or "defaults")
def test_should_pass_kubernetes_validate_strict_when_built_in_kinds_are_rendered(render, values, version):
    for obj in rendered(render, values).docs:
        if obj["apiVersion"].startswith("kubeflow.org/"):
            continue
        validate_builtin(obj, version)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", CASES, ids=lambda v: v or "defaults")
def test_should_pass_kubernetes_validate_strict_when_pytorchjob_pod_templates_are_wrapped(render, values, version):
    for job in rendered(render, values).all("PyTorchJob"):
        for replica, spec in job["spec"]["pytorchReplicaSpecs"].items():
            validate_builtin(as_pod_template(f"{job['metadata']['name']}-{replica.lower()}", spec["template"]),
                             version)


# ---- the Training Operator's CRD ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def crd_validator():
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema")
    crd = yaml.safe_load(PYTORCHJOB_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_structural(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


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


def needs_crd():
    if not PYTORCHJOB_CRD.exists():
        pytest.skip(f"the PyTorchJob CRD is not beside this checkout ({PYTORCHJOB_CRD})")


@pytest.mark.parametrize("values", CASES, ids=lambda v: v or "defaults")
def test_should_match_the_pytorchjob_crd_schema_when_the_pytorchjob_is_rendered(render, values):
    needs_crd()
    for job in rendered(render, values).all("PyTorchJob"):
        errors = sorted(crd_validator().iter_errors(job), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def test_should_fail_the_crd_schema_when_a_pytorchjob_field_is_misspelled(render):
    needs_crd()
    job = copy.deepcopy(render().one("PyTorchJob"))
    job["spec"]["elasticPolicy"]["rdzvBackEnd"] = job["spec"]["elasticPolicy"].pop("rdzvBackend")
    assert list(crd_validator().iter_errors(job)), "a misspelled field must not pass"


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
