"""charts/train with `workload: trainJob`: a Kubeflow Trainer v2 TrainJob on the chart's TrainingRuntime (or an
existing ClusterTrainingRuntime), the same pod as the other backends, and the env the Trainer injects read by
clipjob.dist. (Schemas: test_chart_validate.py and test_chart_backends.py.)"""

from __future__ import annotations

import pytest

from clipjob import dist

from .conftest import chart_values
from .test_chart_render import arg_after

TRAINJOB = "trainjob-4x8.yaml"
CLUSTER_RUNTIME = "trainjob-cluster-runtime.yaml"
TRAINER_PORT = 29500  # the port the Trainer's torch plugin puts in PET_MASTER_PORT (its ContainerTrainerPort)
RESERVED = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def trainer_env(job: dict, node_rank: int) -> dict[str, str]:
    """What the Trainer's torch plugin adds to the "node" container of a TrainJob's pod: torchrun's PET_* with
    the node count, processes per node, the pod's completion index and node 0's address through the JobSet's
    headless Service (<trainjob>-node-0-0.<trainjob>)."""
    name, trainer = job["metadata"]["name"], job["spec"]["trainer"]
    return {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", "auto")),
            "PET_NODE_RANK": str(node_rank), "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
            "PET_MASTER_PORT": str(TRAINER_PORT)}


def test_should_run_the_trainjob_on_the_charts_torch_runtime_when_workload_is_trainjob(render):
    r = render(TRAINJOB)
    job, runtime = r.one("TrainJob"), r.one("TrainingRuntime")
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": runtime["metadata"]["name"]}
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 4, "torch": {}}
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    # the Trainer finds the trainer's pods by this label and its container by the name "node"
    assert node["name"] == "node"
    assert node["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    assert [c["name"] for c in r.pod_template()["spec"]["containers"]] == ["node"]
    assert node["template"]["spec"]["backoffLimit"] == chart_values()["runPolicy"]["backoffLimit"]
    assert r.pod_template()["spec"]["restartPolicy"] == "OnFailure"
    assert "ports" not in r.container(), "the Trainer adds its own port (29500) to the node container"


def test_should_give_the_trainer_the_runtime_containers_image_args_env_and_resources_when_workload_is_trainjob(render):
    r = render(TRAINJOB)
    trainer, c = r.one("TrainJob")["spec"]["trainer"], r.container()
    assert (trainer["image"], trainer["args"], trainer["env"]) == (c["image"], c["args"], c["env"])
    assert trainer["resourcesPerNode"] == c["resources"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert "command" not in trainer and "command" not in c, "the image's ENTRYPOINT (clipjob) must run"


def test_should_keep_the_pod_contract_of_the_other_backends_when_workload_is_trainjob(render):
    """Same container command and env, volumes, mounts, security contexts, pod labels and grace period as the
    Indexed Job renders from the same values; only the launch flags the runtime's env replaces differ."""
    trainjob, indexed = render(TRAINJOB).pod_template(), render("indexedjob-4x8.yaml").pod_template()
    for key in ("volumes", "securityContext", "serviceAccountName", "automountServiceAccountToken",
                "enableServiceLinks", "terminationGracePeriodSeconds", "restartPolicy"):
        assert trainjob["spec"].get(key) == indexed["spec"].get(key), key
    assert trainjob["metadata"] == indexed["metadata"]
    (a,), (b,) = trainjob["spec"]["containers"], indexed["spec"]["containers"]
    for key in ("image", "imagePullPolicy", "resources", "securityContext", "volumeMounts"):
        assert a[key] == b[key], key
    assert a["env"] == [e for e in b["env"] if e["name"] != "PET_NODE_RANK"]  # the Trainer injects it
    common = b["args"][:b["args"].index("--nnodes")]
    assert a["args"][:len(common)] == common and common[0] == "train"


def test_should_leave_torchruns_node_variables_to_the_trainer_when_workload_is_trainjob(render):
    """The Trainer rejects a TrainJob whose trainer.env sets PET_NNODES/.../PET_MASTER_PORT and injects them
    itself; so the chart passes neither them nor the flags that would override them (--nnodes,
    --rdzv-endpoint), only what the runtime does not give: the rendezvous id and backend and the restarts."""
    r = render(TRAINJOB)
    trainer = r.one("TrainJob")["spec"]["trainer"]
    assert not [e["name"] for e in trainer["env"] if e["name"].startswith("PET_")]
    assert "--nnodes" not in trainer["args"] and "--rdzv-endpoint" not in trainer["args"]
    assert arg_after(trainer["args"], "--rdzv-id") == r.one("TrainJob")["metadata"]["name"]
    assert arg_after(trainer["args"], "--rdzv-backend") == "c10d"
    assert arg_after(trainer["args"], "--max-restarts") == str(chart_values()["elastic"]["maxRestarts"])


@pytest.mark.parametrize("node_rank", [0, 3])
def test_should_rendezvous_every_node_at_node_0_when_clipjob_reads_the_trainers_env(render, monkeypatch, node_rank):
    """The rendered trainer arguments plus the env the Trainer injects, through clipjob.dist as `clipjob train`
    calls it: a 4-node c10d launch at node 0's address on the Trainer's port, the same on every node."""
    job = render(TRAINJOB).one("TrainJob")
    for name in (*RESERVED, "PET_RDZV_ENDPOINT", "PET_RDZV_ID", "PET_MAX_RESTARTS", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in trainer_env(job, node_rank).items():
        monkeypatch.setenv(name, value)
    args = job["spec"]["trainer"]["args"]
    spec = dist.launch_spec(nproc_per_node=arg_after(args, "--nproc-per-node"), rdzv_id=arg_after(args, "--rdzv-id"),
                            rdzv_backend=arg_after(args, "--rdzv-backend"),
                            max_restarts=int(arg_after(args, "--max-restarts")),
                            shutdown_timeout=int(arg_after(args, "--shutdown-timeout")))
    name = job["metadata"]["name"]
    assert (spec.nnodes, spec.nproc_per_node, spec.rdzv_backend, spec.rdzv_endpoint, spec.rdzv_id) == \
        ("4", "8", "c10d", f"{name}-node-0-0.{name}:{TRAINER_PORT}", name)


def test_should_omit_num_proc_per_node_and_pass_the_choice_as_a_flag_when_nproc_per_node_is_auto(render):
    trainer = render(CLUSTER_RUNTIME).one("TrainJob")["spec"]["trainer"]
    assert "numProcPerNode" not in trainer  # the CRD takes integers only
    assert arg_after(trainer["args"], "--nproc-per-node") == "auto"


# ---- an existing ClusterTrainingRuntime ------------------------------------------------------------------


def test_should_patch_the_charts_pod_into_a_cluster_training_runtime_when_one_is_named(render):
    r = render(CLUSTER_RUNTIME)
    assert sorted(r.kinds()) == ["ConfigMap", "ServiceAccount", "TrainJob"]
    job = r.one("TrainJob")
    assert job["spec"]["runtimeRef"]["kind"] == "ClusterTrainingRuntime"
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]
    # what the chart's own runtime would have: same volumes and mounts (config, /tmp, /dev/shm, the PVC)
    own = render(CLUSTER_RUNTIME, sets={"trainJob.clusterTrainingRuntime": ""})
    assert pod["spec"]["volumes"] == own.pod_template()["spec"]["volumes"]
    assert pod["spec"]["containers"] == [{"name": "node", "volumeMounts": own.container()["volumeMounts"]}]
    for key in ("serviceAccountName", "terminationGracePeriodSeconds", "nodeSelector", "tolerations",
                "imagePullSecrets"):
        assert pod["spec"][key] == own.pod_template()["spec"][key], key
    assert pod["metadata"]["labels"] == own.pod_template()["metadata"]["labels"]
    assert job["spec"]["trainer"] == own.one("TrainJob")["spec"]["trainer"]
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-vision"


@pytest.mark.parametrize("sets,message", [
    ({"scheduling.affinity.nodeAffinity.x": "y"}, "scheduling.affinity: the pod template of ClusterTrainingRuntime"),
    ({"scheduling.priorityClassName": "high"}, "scheduling.priorityClassName: the pod template of"),
    ({"scheduling.volcano.enabled": "true"}, "gang scheduling is the podGroupPolicy of ClusterTrainingRuntime"),
], ids=["affinity", "priority", "volcano"])
def test_should_refuse_what_runtime_patches_cannot_set_when_a_cluster_training_runtime_is_named(
        render_error, sets, message):
    assert message in render_error(CLUSTER_RUNTIME, sets=sets).splitlines()[0]


@pytest.mark.parametrize("sets,message", [
    ({"nodes.min": "2"}, "workload trainJob has a fixed size"),
    ({"env[0].name": "PET_NNODES", "env[0].value": "eight"}, "env: PET_NNODES is set by the Kubeflow Trainer"),
], ids=["elastic", "reserved-env"])
def test_should_refuse_values_a_trainjob_cannot_take_when_workload_is_trainjob(render_error, sets, message):
    assert message in render_error(TRAINJOB, sets=sets).splitlines()[0]
