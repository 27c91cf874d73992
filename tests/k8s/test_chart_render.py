"""charts/train rendered with helm: what the training pods get, per values file."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from .conftest import CHART, VALUES_DIR, chart_values, values_files

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


def test_should_run_clipjob_train_with_the_mounted_config_when_values_are_defaults(render):
    c = render().container()
    assert "command" not in c, "the image's ENTRYPOINT (clipjob) must run"
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert c["args"][0] == "train"
    assert arg_after(c["args"], "--config") == f"{mount['mountPath']}/config.yaml"


def test_should_pass_the_preset_the_run_dir_and_one_process_per_gpu_when_they_are_set(render):
    r = render(sets={"preset": "tiny-cpu", "runDir": "s3://other-bucket/runs/r2", "gpu.perNode": "4"})
    args = r.container()["args"]
    assert arg_after(args, "--preset") == "tiny-cpu"
    assert arg_after(args, "--run-dir") == "s3://other-bucket/runs/r2"
    # nprocPerNode "" = one training process per GPU, for the agent and the Training Operator alike
    assert arg_after(args, "--nproc-per-node") == r.one("PyTorchJob")["spec"]["nprocPerNode"] == "4"


def test_should_mount_the_configmap_rendered_from_values_config_when_values_are_defaults(render):
    r = render()
    cm = r.one("ConfigMap")
    assert yaml.safe_load(cm["data"]["config.yaml"]) == chart_values()["config"]
    pod = r.pod_template()["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    (mount,) = [m for m in r.container()["volumeMounts"] if m["name"] == "config"]
    assert mount["readOnly"] is True


def test_should_rendezvous_on_the_operators_port_under_the_job_name_when_values_are_defaults(render):
    """nodes.min/max and elastic.rdzvId are left empty: a fixed-size job (min = max = the workers) whose
    rendezvous id is the job name; the Training Operator takes the rendezvous port from the container port named
    pytorchjob-port, so the two must agree. Workers only: no Master replica."""
    r = render()
    job = r.one("PyTorchJob")
    policy, replicas = job["spec"]["elasticPolicy"], job["spec"]["pytorchReplicaSpecs"]
    assert policy["minReplicas"] == policy["maxReplicas"] == replicas["Worker"]["replicas"]
    assert policy["rdzvId"] == job["metadata"]["name"]
    (port,) = r.container()["ports"]
    assert port == {"name": "pytorchjob-port", "containerPort": policy["rdzvPort"], "protocol": "TCP"}
    assert list(replicas) == ["Worker"]


def test_should_add_gpu_per_node_to_the_requests_and_limits_of_resources_when_gpu_per_node_is_set(render):
    res = render(sets={"gpu.perNode": "4"}).container()["resources"]
    assert res["limits"][GPU] == res["requests"][GPU] == "4"
    values = chart_values()["resources"]
    for part in ("requests", "limits"):
        assert {k: v for k, v in res[part].items() if k != GPU} == values[part], part


def test_should_mount_a_memory_backed_dev_shm_of_the_size_limit_only_when_shm_is_enabled(render):
    r = render(sets={"shm.sizeLimit": "8Gi"})
    (vol,) = [v for v in r.pod_template()["spec"]["volumes"] if v["name"] == "dshm"]
    assert vol["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in r.container()["volumeMounts"]
    off = render(sets={"shm.enabled": "false"})
    assert "dshm" not in [v["name"] for v in off.pod_template()["spec"]["volumes"]]
    assert "/dev/shm" not in [m["mountPath"] for m in off.container()["volumeMounts"]]


def resolved_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: plain values, and secretKeyRefs looked up in
    `secrets` (a missing optional key leaves the variable unset; a missing required one stops the pod)."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"]["secretKeyRef"]
        value = secrets.get(ref["name"], {}).get(ref["key"])
        assert value is not None or ref.get("optional"), f"CreateContainerConfigError: {ref} not found"
        if value is not None:
            env[e["name"]] = value
    return env


@pytest.mark.parametrize("keys", ["default", "renamed"])
def test_should_hand_the_secrets_s3_keys_to_clipjobs_s3_client_when_a_secret_is_named(render, monkeypatch, keys):
    """The S3 client (clipjob.fs: the endpoint and credentials from the environment, the region through its
    aiobotocore session) gets what the Secret holds under the keys s3.secretKeys names; nothing is inlined, and
    the optional keys may be missing from the Secret."""
    from clipjob import fs

    names = {"accessKeyId": "ak", "secretAccessKey": "sk", "sessionToken": "st", "region": "rg", "endpoint": "ep"}
    sets = {"s3.existingSecret": "store-creds"}
    if keys == "renamed":
        sets.update({f"s3.secretKeys.{field}": key for field, key in names.items()})
    else:
        names = chart_values()["s3"]["secretKeys"]
    c = render(sets=sets).container()
    assert not [e["name"] for e in c["env"] if e["name"].startswith("AWS_") and "value" in e], "inlined"
    secret = {names["accessKeyId"]: "AKIDEXAMPLE", names["secretAccessKey"]: "wJalr/EXAMPLEKEY",
              names["region"]: "eu-west-3", names["endpoint"]: "http://minio.minio.svc:9000"}  # no session token
    env = resolved_env(c, {"store-creds": secret})
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    opts = fs.storage_options("s3://bucket/run")
    assert (opts["key"], opts["secret"], "token" in opts) == ("AKIDEXAMPLE", "wJalr/EXAMPLEKEY", False)
    assert opts["client_kwargs"] == {"endpoint_url": "http://minio.minio.svc:9000"}
    assert opts["session"].get_config_variable("region") == "eu-west-3"
    with pytest.raises(AssertionError, match="CreateContainerConfigError"):
        resolved_env(c, {"store-creds": {k: v for k, v in secret.items() if k != names["secretAccessKey"]}})


def restricted_violations(pod: dict) -> list[str]:
    """What the restricted Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards)
    refuses in a pod spec, for the fields the chart renders."""
    found = []
    psc = pod.get("securityContext", {})
    allowed_volumes = {"name", "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
    found += [f"volume {v['name']}: {sorted(set(v) - allowed_volumes)}" for v in pod.get("volumes", [])
              if set(v) - allowed_volumes]
    found += [f"host namespace {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = {**{k: psc[k] for k in ("runAsNonRoot", "runAsUser", "seccompProfile") if k in psc},
              **c.get("securityContext", {})}
        if sc.get("runAsNonRoot") is not True:
            found.append(f"{c['name']}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            found.append(f"{c['name']}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            found.append(f"{c['name']}: privileged")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{c['name']}: capabilities {caps}")
        if sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccompProfile {sc.get('seccompProfile')}")
    return found


@pytest.mark.parametrize("workload", ["pytorchjob", "trainJob", "indexedJob"])
def test_should_meet_the_restricted_pod_security_standard_when_values_are_defaults(render, workload):
    r = render(sets={"workload": workload})
    assert restricted_violations(r.pod_template()["spec"]) == []
    escalating = render(sets={"workload": workload, "securityContext.allowPrivilegeEscalation": "true"})
    assert restricted_violations(escalating.pod_template()["spec"]) == \
        [f"{r.container()['name']}: allowPrivilegeEscalation is not false"]


def test_should_give_a_writable_tmp_as_home_when_the_root_filesystem_is_read_only(render):
    r = render(sets={"tmpSizeLimit": "5Gi"})
    c = r.container()
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    home = r.env()["HOME"]["value"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == home]
    assert not mount.get("readOnly")
    (vol,) = [v for v in r.pod_template()["spec"]["volumes"] if v["name"] == mount["name"]]
    assert vol["emptyDir"] == {"sizeLimit": "5Gi"}


def test_should_disable_the_istio_sidecar_when_values_are_defaults(render):
    assert render().pod_template()["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_should_use_a_created_serviceaccount_without_api_token_when_values_are_defaults(render):
    r = render()
    sa = r.one("ServiceAccount")
    pod = r.pod_template()["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False and sa["automountServiceAccountToken"] is False


def test_should_carry_the_run_policy_over_leaving_out_the_null_limits_when_values_are_defaults(render):
    policy = render().one("PyTorchJob")["spec"]["runPolicy"]
    assert policy == {k: v for k, v in chart_values()["runPolicy"].items() if v is not None}  # null: no limit


def test_should_label_every_object_with_app_kubernetes_io_labels_when_values_are_defaults(render):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for obj in render(release="run-7").docs:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == chart["name"]
        assert labels["app.kubernetes.io/instance"] == "run-7"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "clipjob"
        assert labels["helm.sh/chart"] == f"{chart['name']}-{chart['version']}"


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


def test_should_train_corenets_recipe_at_its_global_batch_when_32_nodes_of_8_gpus_are_used(render, tmp_path):
    """The config clipjob resolves from the rendered ConfigMap, preset and overrides trains the corenet-vit-b16
    preset's schedule, on 32 pods x 8 processes x its batch: CoreNet's global batch of 65,536."""
    from clipjob.config import build_config

    r = render("corenet-vit-b16-32x8.yaml")
    job, args = r.one("PyTorchJob"), r.container()["args"]
    (tmp_path / "config.yaml").write_text(r.one("ConfigMap")["data"]["config.yaml"])
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = build_config(arg_after(args, "--preset"), str(tmp_path / "config.yaml"), overrides)
    recipe = build_config("corenet-vit-b16").train
    for key in ("steps", "batch_size", "warmup_steps", "lr", "weight_decay", "ema_momentum", "precision"):
        assert getattr(cfg.train, key) == getattr(recipe, key), key
    pods = job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]
    assert job["spec"]["elasticPolicy"]["minReplicas"] == pods  # the global batch needs every pod
    assert pods * int(job["spec"]["nprocPerNode"]) * cfg.train.batch_size == 65_536


def test_should_carry_the_image_env_placement_and_limits_over_when_a_values_file_sets_them(render):
    values = yaml.safe_load((VALUES_DIR / "corenet-vit-b16-32x8.yaml").read_text())
    r = render("corenet-vit-b16-32x8.yaml")
    c, pod = r.container(), r.pod_template()["spec"]
    assert c["image"] == f"{values['image']['repository']}:{values['image']['tag']}"
    assert c["resources"]["limits"][GPU] == str(values["gpu"]["perNode"])
    assert r.env()["AWS_DEFAULT_REGION"] == {"name": "AWS_DEFAULT_REGION", "value": values["s3"]["region"]}
    assert all(e in c["env"] for e in values["env"])
    for key in ("priorityClassName", "nodeSelector", "tolerations", "affinity"):
        assert pod[key] == values["scheduling"][key], key
    assert pod["terminationGracePeriodSeconds"] == values["terminationGracePeriodSeconds"]
    run_policy = r.one("PyTorchJob")["spec"]["runPolicy"]
    assert run_policy["activeDeadlineSeconds"] == values["runPolicy"]["activeDeadlineSeconds"]


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
    elastic = chart_values()["elastic"]
    assert arg_after(args, "--rdzv-endpoint") == f"{name}-0.{name}:{elastic['rdzvPort']}"
    assert arg_after(args, "--nnodes") == "4"
    assert arg_after(args, "--nproc-per-node") == "8"
    assert arg_after(args, "--rdzv-backend") == "c10d"
    assert arg_after(args, "--rdzv-id") == name
    assert arg_after(args, "--max-restarts") == str(elastic["maxRestarts"])
    rank = r.env()["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert rank == "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def test_should_carry_run_policy_over_to_the_job_when_workload_is_indexed_job(render):
    spec = render("indexed-job.yaml").one("Job")["spec"]
    policy = chart_values()["runPolicy"]
    assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"]) == (policy["backoffLimit"],
                                                                       policy["ttlSecondsAfterFinished"])


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
