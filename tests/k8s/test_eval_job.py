"""k8s/eval-job.yaml: a valid batch/v1 Job that runs `clipjob eval zeroshot` safely."""

from __future__ import annotations

import pytest
import yaml

from .conftest import CHART, EVAL_JOB, KUBE_VERSIONS

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")


@pytest.fixture(scope="module")
def job() -> dict:
    (doc,) = [d for d in yaml.safe_load_all(EVAL_JOB.read_text()) if d]
    return doc


@pytest.fixture(scope="module")
def container(job) -> dict:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_should_pass_kubernetes_validate_strict_when_the_eval_job_is_applied(job, version):
    try:
        kubernetes_validate.validate(job, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{'.'.join(map(str, e.caused_by.path))}: {e.caused_by.message}")


def test_should_watch_a_run_and_evaluate_imagenet_when_the_eval_job_runs(container):
    args = container["args"]
    assert args[:2] == ["eval", "zeroshot"]
    assert args[args.index("--watch") + 1].startswith("s3://")
    assert args[args.index("--data") + 1].startswith("imagenet:")
    assert "--poll-seconds" in args and "--resolution" in args and "--batch-size" in args
    assert "command" not in container, "the image's ENTRYPOINT (clipjob) must run"


def test_should_read_imagenet_from_a_read_only_pvc_when_the_data_is_a_path(job, container):
    data = container["args"][container["args"].index("--data") + 1].removeprefix("imagenet:")
    (vol,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == vol["name"]]
    assert data.startswith(mount["mountPath"] + "/") and mount["readOnly"] is True
    assert vol["persistentVolumeClaim"]["readOnly"] is True


def test_should_show_the_object_storage_alternative_when_reading_the_eval_job():
    assert "# - imagenet:s3://" in EVAL_JOB.read_text()


def test_should_take_s3_credentials_from_a_secret_when_the_eval_job_runs(container):
    env = {e["name"]: e for e in container["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_ENDPOINT_URL_S3"):
        assert "value" not in env[name], f"{name} is inlined"
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"].get("optional") is None


def test_should_run_restricted_non_root_when_the_eval_job_runs(job, container):
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert pod["automountServiceAccountToken"] is False


def test_should_run_as_the_same_user_as_the_training_pods_when_both_are_deployed(job):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == values["podSecurityContext"]["runAsUser"]


def test_should_bound_retries_and_clean_up_when_the_eval_job_finishes(job):
    assert 0 < job["spec"]["backoffLimit"] <= 10
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_should_request_one_gpu_and_memory_when_the_eval_job_runs(job, container):
    res = container["resources"]
    assert str(res["limits"]["nvidia.com/gpu"]) == "1" and res["limits"]["memory"]
    (shm,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
