"""charts/train rendered with helm: what the training pods get, per values file."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from .conftest import CHART, VALUES_DIR, values_files

GPU = "nvidia.com/gpu"


def arg_after(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


# ---- defaults ------------------------------------------------------------------------------------------


def test_should_render_serviceaccount_configmap_and_pytorchjob_when_values_are_defaults(render):
    assert sorted(render().kinds()) == ["ConfigMap", "PyTorchJob", "ServiceAccount"]


def test_should_name_the_training_container_pytorch_when_values_are_defaults(render):
    containers = render().pod_template()["spec"]["containers"]
    assert [c["name"] for c in containers] == ["pytorch"]


def test_should_run_clipjob_train_with_config_preset_and_run_dir_when_values_are_defaults(render):
    c = render().container()
    assert "command" not in c, "the image's ENTRYPOINT (clipjob) must run"
    args = c["args"]
    assert args[0] == "train"
    assert arg_after(args, "--config") == "/etc/clipjob/config.yaml"
    assert arg_after(args, "--preset") == "corenet-vit-b16"
    assert arg_after(args, "--run-dir") == "s3://my-bucket/runs/clip-vit-b16"
    assert arg_after(args, "--nproc-per-node") == "8"


def test_should_mount_the_configmap_rendered_from_values_config_when_values_are_defaults(render):
    r = render()
    cm = r.one("ConfigMap")
    assert yaml.safe_load(cm["data"]["config.yaml"]) == yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    pod = r.pod_template()["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    (mount,) = [m for m in r.container()["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"] == "/etc/clipjob" and mount["readOnly"] is True


def test_should_configure_elastic_policy_with_c10d_and_rdzv_id_when_values_are_defaults(render):
    job = render().one("PyTorchJob")
    policy = job["spec"]["elasticPolicy"]
    assert policy == {"minReplicas": 1, "maxReplicas": 1, "maxRestarts": 3, "rdzvBackend": "c10d",
                      "rdzvId": job["metadata"]["name"], "rdzvPort": 29400}
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert "Master" not in job["spec"]["pytorchReplicaSpecs"]


def test_should_expose_the_rendezvous_port_as_pytorchjob_port_when_values_are_defaults(render):
    (port,) = render().container()["ports"]
    assert port == {"name": "pytorchjob-port", "containerPort": 29400, "protocol": "TCP"}


def test_should_request_and_limit_eight_gpus_when_values_are_defaults(render):
    res = render().container()["resources"]
    assert res["limits"][GPU] == "8" and res["requests"][GPU] == "8"
    assert res["requests"]["cpu"] == "32" and res["limits"]["memory"] == "256Gi"


def test_should_mount_a_memory_backed_dev_shm_with_size_limit_when_values_are_defaults(render):
    r = render()
    (vol,) = [v for v in r.pod_template()["spec"]["volumes"] if v["name"] == "dshm"]
    assert vol["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in r.container()["volumeMounts"]


def test_should_take_s3_credentials_only_from_the_existing_secret_when_values_are_defaults(render):
    env = render().env()
    for name, key, optional in [("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID", None),
                                ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", None),
                                ("AWS_SESSION_TOKEN", "AWS_SESSION_TOKEN", True),
                                ("AWS_DEFAULT_REGION", "AWS_DEFAULT_REGION", True),
                                ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_S3", True)]:
        assert "value" not in env[name], f"{name} is inlined"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "clipjob-s3" and ref["key"] == key and ref.get("optional") == optional


def test_should_apply_the_restricted_security_context_when_values_are_defaults(render):
    pod = render().pod_template()["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = render().container()["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_should_give_a_writable_tmp_as_home_when_the_root_filesystem_is_read_only(render):
    r = render()
    assert r.env()["HOME"] == {"name": "HOME", "value": "/tmp"}
    (vol,) = [v for v in r.pod_template()["spec"]["volumes"] if v["name"] == "tmp"]
    assert vol["emptyDir"] == {"sizeLimit": "20Gi"}
    assert {"name": "tmp", "mountPath": "/tmp"} in r.container()["volumeMounts"]


def test_should_leave_time_to_checkpoint_on_sigterm_when_values_are_defaults(render):
    assert render().pod_template()["spec"]["terminationGracePeriodSeconds"] == 180


def test_should_disable_the_istio_sidecar_when_values_are_defaults(render):
    assert render().pod_template()["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_should_use_a_created_serviceaccount_without_api_token_when_values_are_defaults(render):
    r = render()
    sa = r.one("ServiceAccount")
    pod = r.pod_template()["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False and sa["automountServiceAccountToken"] is False


def test_should_set_run_policy_with_ttl_backoff_and_clean_pod_policy_when_values_are_defaults(render):
    policy = render().one("PyTorchJob")["spec"]["runPolicy"]
    assert policy == {"cleanPodPolicy": "None", "backoffLimit": 20, "ttlSecondsAfterFinished": 604800}


def test_should_label_every_object_with_app_kubernetes_io_labels_when_values_are_defaults(render):
    for obj in render().docs:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "train"
        assert labels["app.kubernetes.io/instance"] == "clip-train"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "clipjob"
        assert labels["helm.sh/chart"] == "train-0.1.0"


def test_should_not_pass_elastic_env_itself_when_the_training_operator_injects_it(render):
    env = render().env()
    assert not [n for n in env if n.startswith("PET_")], "the Training Operator sets PET_* for PyTorchJobs"


# ---- names ---------------------------------------------------------------------------------------------


def test_should_use_the_release_name_alone_when_it_contains_the_chart_name(render):
    assert render(release="clip-train").one("PyTorchJob")["metadata"]["name"] == "clip-train"
    assert render(release="vitb16").one("PyTorchJob")["metadata"]["name"] == "vitb16-train"


def test_should_keep_pod_and_service_names_within_63_characters_when_the_release_name_is_long(render):
    release = "a" * 53  # helm's longest release name
    r = render(release=release)
    job = r.one("PyTorchJob")["metadata"]["name"]
    assert len(f"{job}-worker-99999") <= 63
    for obj in r.docs:
        assert len(obj["metadata"]["name"]) <= 63
    for value in r.one("PyTorchJob")["metadata"]["labels"].values():
        assert len(value) <= 63


def test_should_refuse_a_job_name_starting_with_a_digit_when_the_release_name_does(render_error):
    assert "must start with a letter" in render_error(release="9lives")


# ---- values files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", values_files())
def test_should_render_a_pytorch_container_with_shm_and_grace_period_when_values_file_is_used(render, values):
    r = render(values)
    c = r.container()
    pod = r.pod_template()["spec"]
    assert c["args"][0] == "train"
    assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert r.pod_template()["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_should_express_the_corenet_vit_b16_recipe_when_32_nodes_of_8_gpus_are_used(render):
    r = render("corenet-vit-b16-32x8.yaml")
    job = r.one("PyTorchJob")
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 32
    assert job["spec"]["elasticPolicy"]["minReplicas"] == 32 and job["spec"]["elasticPolicy"]["maxReplicas"] == 32
    assert job["spec"]["nprocPerNode"] == "8"
    config = yaml.safe_load(r.one("ConfigMap")["data"]["config.yaml"])
    train = config["train"]
    assert (train["steps"], train["batch_size"], train["warmup_steps"]) == (200_000, 256, 10_000)
    assert (train["lr"], train["weight_decay"], train["ema_momentum"]) == (1e-3, 0.2, 5e-4)
    assert (train["precision"], train["ckpt_every_steps"]) == ("bf16", 5000)
    assert 32 * 8 * train["batch_size"] == 65_536  # CoreNet's global batch
    c = r.container()
    assert c["image"] == "registry.example.com/ml/clipjob:0.1.0"
    assert c["resources"]["limits"][GPU] == "8"
    assert r.env()["AWS_DEFAULT_REGION"] == {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"}
    assert r.env()["NCCL_DEBUG"]["value"] == "WARN"
    pod = r.pod_template()["spec"]
    assert pod["priorityClassName"] == "training-high"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == GPU
    assert "podAntiAffinity" in pod["affinity"]
    assert pod["terminationGracePeriodSeconds"] == 240
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 1_814_400


def test_should_request_no_gpu_and_run_two_processes_when_cpu_only(render):
    r = render("cpu-only.yaml")
    res = r.container()["resources"]
    assert GPU not in res.get("limits", {}) and GPU not in res.get("requests", {})
    assert r.one("PyTorchJob")["spec"]["nprocPerNode"] == "2"
    args = r.container()["args"]
    assert arg_after(args, "--nproc-per-node") == "2"
    assert arg_after(args, "--set") == "train.log_every=5"
    assert arg_after(args, "--preset") == "tiny-cpu"


def test_should_set_the_s3_endpoint_as_a_plain_value_when_s3_endpoint_is_set(render):
    env = render("cpu-only.yaml").env()
    assert env["AWS_ENDPOINT_URL_S3"] == {"name": "AWS_ENDPOINT_URL_S3", "value": "http://minio.minio.svc:9000"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "minio-creds"


def test_should_omit_s3_credentials_when_no_secret_is_named(render):
    env = render(sets={"s3.existingSecret": ""}).env()
    assert not [n for n in env if n.startswith("AWS_")]


def test_should_add_the_kueue_queue_label_when_kueue_queue_is_set(render):
    job = render("kueue.yaml").one("PyTorchJob")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-vision"
    assert job["spec"]["runPolicy"]["suspend"] is True  # Kueue unsuspends it on admission
    assert "schedulingPolicy" not in job["spec"]["runPolicy"]


def test_should_scale_between_min_and_max_replicas_when_elastic_bounds_are_set(render):
    job = render("kueue.yaml").one("PyTorchJob")
    assert job["spec"]["elasticPolicy"]["minReplicas"] == 2
    assert job["spec"]["elasticPolicy"]["maxReplicas"] == 4
    assert job["spec"]["elasticPolicy"]["maxRestarts"] == 10
    assert job["spec"]["elasticPolicy"]["rdzvId"] == "b32-elastic-run1"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 4
    assert job["spec"]["nprocPerNode"] == "4"


def test_should_gang_schedule_with_volcano_when_volcano_is_enabled(render):
    r = render("volcano.yaml")
    job = r.one("PyTorchJob")
    assert r.pod_template()["spec"]["schedulerName"] == "volcano"
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"queue": "research", "minAvailable": 8,
                                                           "priorityClass": "training-high"}
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    assert "ttlSecondsAfterFinished" not in job["spec"]["runPolicy"]
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "OnFailure"


# ---- indexedJob: no Training Operator ------------------------------------------------------------------


def test_should_render_an_indexed_job_and_headless_service_when_workload_is_indexed_job(render):
    r = render("indexed-job.yaml")
    assert sorted(r.kinds()) == ["ConfigMap", "Job", "Service", "ServiceAccount"]
    job, svc = r.one("Job"), r.one("Service")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"]["batch.kubernetes.io/job-name"] == job["metadata"]["name"]
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert pod["restartPolicy"] == "OnFailure"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-vision"
    assert job["spec"]["suspend"] is True


def test_should_point_the_rendezvous_at_pod_index_0_when_workload_is_indexed_job(render):
    r = render("indexed-job.yaml")
    name = r.one("Job")["metadata"]["name"]
    args = r.container()["args"]
    assert arg_after(args, "--rdzv-endpoint") == f"{name}-0.{name}:29400"
    assert arg_after(args, "--nnodes") == "4"
    assert arg_after(args, "--nproc-per-node") == "8"
    assert arg_after(args, "--rdzv-backend") == "c10d"
    assert arg_after(args, "--rdzv-id") == name
    assert arg_after(args, "--max-restarts") == "3"
    rank = r.env()["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert rank == "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def test_should_carry_run_policy_over_to_the_job_when_workload_is_indexed_job(render):
    spec = render("indexed-job.yaml").one("Job")["spec"]
    assert spec["backoffLimit"] == 20 and spec["ttlSecondsAfterFinished"] == 604800


# ---- NOTES.txt -----------------------------------------------------------------------------------------


def render_notes(helm, tmp_path, *args: str) -> str:
    """NOTES.txt as `helm install` prints it: helm template skips NOTES, so render it through tpl from a
    copy of the chart (templates/ files are not readable with .Files)."""
    chart = tmp_path / "train"
    shutil.copytree(CHART, chart)
    (chart / "notes.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n'
        'data:\n  notes: {{ tpl (.Files.Get "notes.txt") . | quote }}\n')
    cmd = [str(helm), "template", "clip-train", str(chart), "-n", "clip", "--show-only", "templates/zz-notes.yaml",
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)["data"]["notes"]


def test_should_print_commands_to_watch_the_pytorchjob_when_installed(helm, tmp_path):
    notes = render_notes(helm, tmp_path)
    assert "kubectl -n clip get pytorchjob clip-train -w" in notes
    assert "kubectl -n clip logs -f clip-train-worker-0 -c pytorch" in notes
    assert "s3://my-bucket/runs/clip-vit-b16" in notes
    assert "clipjob status s3://my-bucket/runs/clip-vit-b16 --job clip-train -n clip" in notes


def test_should_print_commands_to_watch_the_indexed_job_and_kueue_when_installed_without_operator(helm, tmp_path):
    notes = render_notes(helm, tmp_path, "-f", str(VALUES_DIR / "indexed-job.yaml"))
    assert "kubectl -n clip get job clip-train -w" in notes
    assert "batch.kubernetes.io/job-completion-index=0" in notes
    assert "kubectl -n clip get workloads" in notes


def test_should_print_commands_to_watch_the_trainjob_and_its_volcano_gang_when_installed(helm, tmp_path):
    notes = render_notes(helm, tmp_path, "-f", str(VALUES_DIR / "trainjob-4x8.yaml"),
                         "-f", str(VALUES_DIR / "gang-volcano.yaml"))
    assert "kubectl -n clip get trainjob clip-train -w" in notes
    assert "-l jobset.sigs.k8s.io/jobset-name=clip-train,batch.kubernetes.io/job-completion-index=0 -c node" in notes
    assert "kubectl -n clip get podgroups.scheduling.volcano.sh" in notes
    assert "get workloads" not in notes
