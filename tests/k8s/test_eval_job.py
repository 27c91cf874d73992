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


def test_should_fail_at_once_on_exit_2_and_not_count_sigterm_when_the_eval_job_ends(job):
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    rules = {r["action"]: r for r in spec["podFailurePolicy"]["rules"] if "onExitCodes" in r}
    assert rules["FailJob"]["onExitCodes"] == {"containerName": "eval", "operator": "In", "values": [2]}
    assert rules["Ignore"]["onExitCodes"]["values"] == [143]
    assert {"type": "DisruptionTarget", "status": "True"} in [c for r in spec["podFailurePolicy"]["rules"]
                                            for c in r.get("onPodConditions", [])]


def test_should_complete_after_the_runs_final_step_when_the_eval_job_runs_its_args(container, tmp_path):
    """The Job's own arguments, with its EDIT values pointed at a tiny local run (train.steps=4, steps 2 and 4
    committed) and image folder, through the real CLI: it must exit 0 (the Job completes) instead of polling
    forever."""
    import subprocess
    import sys

    from PIL import Image

    from clipjob.config import build_config, to_yaml
    from clipjob.model import build_model
    from clipjob.train import checkpoint as ckpt

    run = str(tmp_path / "run")
    cfg = build_config("tiny-cpu-scratch", None, [
        "model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2", "model.vision.image_size=16",
        "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "model.text.context_length=8",
        "model.embed_dim=16", "train.steps=4", f"storage.run_dir={run}"])
    for step in (2, 4):
        ckpt.save_checkpoint(run, step, build_model(cfg.model, pretrained_text=False).state_dict(), {}, to_yaml(cfg), {})
    for c in ("cat", "dog"):
        (tmp_path / "val" / c).mkdir(parents=True)
        Image.new("RGB", (20, 20), (200, 20, 20) if c == "cat" else (20, 20, 200)).save(tmp_path / "val" / c / "0.png")
    args = list(container["args"])
    args[args.index("--watch") + 1] = run
    args[args.index("--data") + 1] = f"folder:{tmp_path / 'val'}"  # imagenet: needs the 1000 wnid folders
    args[args.index("--resolution") + 1] = "16"
    assert 0 < float(args[args.index("--wait-for-run") + 1]) <= 3600 and "--max-polls" not in args
    p = subprocess.run([sys.executable, "-m", "clipjob", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "step 4 is the run's final step (train.steps=4) and is evaluated: done" in p.stdout
    assert len((tmp_path / "run" / "eval" / "results.jsonl").read_text().splitlines()) == 2
