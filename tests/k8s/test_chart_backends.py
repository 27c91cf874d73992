"""charts/train: each backend (PyTorchJob, TrainJob, Indexed Job) x each queueing choice (none, Kueue, Volcano).

Every rendered object is validated against its schema (test_chart_validate.py's validators: the PyTorchJob and
Trainer CRDs, kubernetes-validate --strict for built-in kinds and the pod templates inside custom kinds, and the
hand-written Volcano PodGroup schema in tests/k8s/schemas/, written from Volcano's documented PodGroupSpec fields
because the CRD cannot be fetched here); then what each scheduler needs is checked: Kueue's label on the job
object, which is created suspended and whose pods do not bypass it; Volcano's gang of all nodes.count pods.
"""

from __future__ import annotations

import copy

import pytest

from .conftest import KUBE_VERSIONS
from .test_chart_validate import (
    CUSTOM_KINDS,
    as_pod_template,
    kubernetes_validate,
    pod_templates,
    schema_errors,
    validate_builtin,
)

BACKENDS = {"pytorchjob": "pytorchjob-4x8.yaml", "trainJob": "trainjob-4x8.yaml", "indexedJob": "indexedjob-4x8.yaml"}
SCHEDULERS = {"none": None, "kueue": "queue-kueue.yaml", "volcano": "gang-volcano.yaml"}
NODES = 4  # nodes.count of the backend files
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GROUP_ANNOTATION = "scheduling.k8s.io/group-name"


def render_case(render, backend: str, scheduler: str):
    return render(*[f for f in (BACKENDS[backend], SCHEDULERS[scheduler]) if f])


def suspended(job: dict) -> bool | None:
    """The job's own suspend flag, where its kind keeps it."""
    spec = job["spec"]
    return spec.get("runPolicy", {}).get("suspend") if job["kind"] == "PyTorchJob" else spec.get("suspend")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_should_validate_every_object_against_its_schema_when_a_backend_and_scheduler_are_combined(
        render, backend, scheduler):
    r = render_case(render, backend, scheduler)
    for obj in r.docs:  # built-in kinds and pod templates first: a missing CRD below skips only the rest
        for version in KUBE_VERSIONS:
            if obj["kind"] not in CUSTOM_KINDS:
                validate_builtin(obj, version)
            for name, template in pod_templates(obj):
                validate_builtin(as_pod_template(name, template), version)
    for obj in r.docs:
        if obj["kind"] in CUSTOM_KINDS:
            errors = schema_errors(obj)
            assert not errors, "\n".join(errors[:10])


@pytest.mark.parametrize("backend", BACKENDS)
def test_should_render_the_backends_kinds_when_workload_is_set(render, backend):
    kinds = sorted(render_case(render, backend, "none").kinds())
    assert kinds == {"pytorchjob": ["ConfigMap", "PyTorchJob", "ServiceAccount"],
                     "trainJob": ["ConfigMap", "ServiceAccount", "TrainJob", "TrainingRuntime"],
                     "indexedJob": ["ConfigMap", "Job", "Service", "ServiceAccount"]}[backend]


# ---- Kueue ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_should_label_the_job_object_and_create_it_suspended_when_kueue_is_on(render, backend):
    r = render_case(render, backend, "kueue")
    job = r.job()
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-vision"
    assert suspended(job) is True, "no pod may start before Kueue admits the whole job"
    # the pods belong to the admitted job: no queue label of their own (Kueue's pod integration would admit
    # each one apart), no other scheduler's gang
    pod = r.pod_template()
    assert QUEUE_LABEL not in pod["metadata"]["labels"]
    assert "schedulerName" not in pod["spec"]
    assert [d for d in r.docs if d["metadata"].get("labels", {}).get(QUEUE_LABEL)] == [job]


@pytest.mark.parametrize("backend", BACKENDS)
def test_should_neither_label_nor_suspend_the_job_when_no_queue_is_set(render, backend):
    job = render_case(render, backend, "none").job()
    assert QUEUE_LABEL not in job["metadata"]["labels"]
    assert not suspended(job)


# ---- Volcano -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_should_schedule_the_pods_with_volcano_and_its_priority_when_volcano_is_on(render, backend):
    pod = render_case(render, backend, "volcano").pod_template()["spec"]
    assert pod["schedulerName"] == "volcano"
    assert pod["priorityClassName"] == "training-high"


def test_should_gang_all_nodes_through_the_operator_when_a_pytorchjob_uses_volcano(render):
    policy = render_case(render, "pytorchjob", "volcano").one("PyTorchJob")["spec"]["runPolicy"]["schedulingPolicy"]
    assert policy == {"queue": "research", "minAvailable": NODES, "priorityClass": "training-high"}


def test_should_render_a_podgroup_of_all_pods_and_name_it_on_them_when_an_indexed_job_uses_volcano(render):
    r = render_case(render, "indexedJob", "volcano")
    group, job = r.one("PodGroup"), r.one("Job")
    assert group["spec"] == {"minMember": NODES, "queue": "research", "priorityClassName": "training-high"}
    assert group["spec"]["minMember"] == job["spec"]["completions"] == job["spec"]["parallelism"]
    assert r.pod_template()["metadata"]["annotations"][GROUP_ANNOTATION] == group["metadata"]["name"]
    assert GROUP_ANNOTATION not in render_case(render, "indexedJob", "none").pod_template()["metadata"]["annotations"]


def test_should_ask_the_trainer_for_a_volcano_podgroup_of_all_nodes_when_a_trainjob_uses_volcano(render):
    r = render_case(render, "trainJob", "volcano")
    runtime, job = r.one("TrainingRuntime"), r.one("TrainJob")
    assert runtime["spec"]["podGroupPolicy"] == {"volcano": {}}
    # the Trainer's Volcano plugin reads the queue from the runtime's JobSet annotations and sizes the PodGroup
    # as the sum of the pods: numNodes of the one replicated job
    assert runtime["spec"]["template"]["metadata"]["annotations"] == {"scheduling.volcano.sh/queue-name": "research"}
    assert job["spec"]["trainer"]["numNodes"] == runtime["spec"]["mlPolicy"]["numNodes"] == NODES
    assert [j["name"] for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]] == ["node"]
    assert "podGroupPolicy" not in render_case(render, "trainJob", "none").one("TrainingRuntime")["spec"]


def test_should_pass_min_resources_to_the_gang_when_set(render):
    sets = {"scheduling.volcano.minResources.nvidia\\.com/gpu": "32"}
    group = render(BACKENDS["indexedJob"], SCHEDULERS["volcano"], sets=sets).one("PodGroup")
    assert group["spec"]["minResources"] == {"nvidia.com/gpu": 32}
    job = render(BACKENDS["pytorchjob"], SCHEDULERS["volcano"], sets=sets).one("PyTorchJob")
    assert job["spec"]["runPolicy"]["schedulingPolicy"]["minResources"] == {"nvidia.com/gpu": 32}


@pytest.mark.parametrize("backend,sets,message", [
    ("indexedJob", {"scheduling.volcano.minAvailable": "2"}, "places all nodes.count (4) pods together"),
    ("trainJob", {"scheduling.volcano.minAvailable": "2"}, "places all nodes.count (4) pods together"),
    ("trainJob", {"scheduling.volcano.minResources.cpu": "8"}, "the Trainer computes"),
], ids=["indexed-job-min-available", "trainjob-min-available", "trainjob-min-resources"])
def test_should_refuse_gang_settings_the_backend_cannot_apply_when_volcano_is_on(render_error, backend, sets, message):
    err = render_error(BACKENDS[backend], SCHEDULERS["volcano"], sets=sets)
    assert message in err.splitlines()[0], err  # the one line helm prints


# ---- each schema refuses a misspelled field --------------------------------------------------------------


@pytest.mark.parametrize("backend,kind,path,typo", [
    ("trainJob", "TrainJob", ("spec", "trainer"), ("numNodes", "numNode")),
    ("trainJob", "TrainingRuntime", ("spec",), ("podGroupPolicy", "podgroupPolicy")),
    ("indexedJob", "PodGroup", ("spec",), ("minMember", "minMembers")),
], ids=["trainjob", "trainingruntime", "podgroup"])
def test_should_fail_the_schema_when_a_field_of_a_custom_kind_is_misspelled(render, backend, kind, path, typo):
    obj = copy.deepcopy(render_case(render, backend, "volcano").one(kind))
    assert not schema_errors(obj)
    node = obj
    for key in path:
        node = node[key]
    right, wrong = typo
    node[wrong] = node.pop(right)
    errors = schema_errors(obj)
    assert any(wrong in e for e in errors), errors


def test_should_fail_kubernetes_validate_when_a_field_of_the_indexed_job_is_misspelled(render):
    job = copy.deepcopy(render_case(render, "indexedJob", "kueue").one("Job"))
    job["spec"]["completionmode"] = job["spec"].pop("completionMode")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBE_VERSIONS[-1], strict=True)
