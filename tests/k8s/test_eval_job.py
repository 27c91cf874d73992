"""k8s/eval-job.yaml: a valid batch/v1 Job that runs `clipjob eval zeroshot` safely."""

from __future__ import annotations

import re

import pytest
import yaml

from .conftest import EVAL_JOB, KUBE_VERSIONS

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


def test_should_read_imagenet_shards_from_object_storage_when_the_alternative_data_line_is_used(s3_bucket):
    """The commented-out alternative to the PVC (`# - imagenet:s3://...`), pointed at a bucket that holds ImageNet
    validation samples as webdataset shards ({key}.jpg + {key}.cls), is a --data that `eval zeroshot` reads:
    OpenAI's 1000 class names and the samples' labels."""
    import io

    from PIL import Image

    from clipjob.datasets.writer import ShardWriter
    from clipjob.eval.zeroshot import build_eval_set

    (alternative,) = re.findall(r"^\s*# - (imagenet:s3://\S+)", EVAL_JOB.read_text(), re.M)
    root = f"{s3_bucket}/{alternative.removeprefix('imagenet:s3://').split('/', 1)[1]}"  # same path, test bucket
    jpeg = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 20, 20)).save(jpeg, "JPEG")
    with ShardWriter(root, prefix="val", max_samples=2) as w:
        for i, label in enumerate((0, 999)):
            w.write(f"ILSVRC2012_val_{i:08d}", {"jpg": jpeg.getvalue(), "cls": str(label)})
    es = build_eval_set(f"imagenet:{root}", 16, "openai")
    assert es.name == f"imagenet:{root}" and len(es.classnames) == 1000
    assert [label for _, label in es.dataset] == [0, 999]


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


def test_should_run_as_the_same_user_and_group_as_the_training_pods_when_both_are_deployed(job, render):
    """The eval Job reads what training writes to the run dir (and writes eval/ beside it): same uid and gid."""
    ours = job["spec"]["template"]["spec"]["securityContext"]
    training = render().pod_template()["spec"]["securityContext"]
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        assert ours[key] == training[key], key


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


def _tiny_run(tmp_path, ema_momentum: float, run_config: bool = True) -> str:
    """A tiny local run (train.steps=4, steps 2 and 4 committed, EMA weights saved when ema_momentum > 0, the
    run dir's config.yaml as training writes it when it starts) with an image folder of two classes beside it."""
    from PIL import Image

    from clipjob.config import to_yaml
    from clipjob.model import build_model
    from clipjob import checkpoint as ckpt
    from conftest import tiny_config

    run = str(tmp_path / "run")
    cfg = tiny_config("train.steps=4", f"train.ema_momentum={ema_momentum}", f"storage.run_dir={run}")
    for step in (2, 4):
        weights = build_model(cfg.model, pretrained=False).state_dict()
        ckpt.save_checkpoint(run, step, weights, {}, to_yaml(cfg), {},
                             {ckpt.EMA_FILE: weights} if ema_momentum > 0 else None)
    if run_config:
        (tmp_path / "run" / "config.yaml").write_text(to_yaml(cfg))
    for c in ("cat", "dog"):
        (tmp_path / "val" / c).mkdir(parents=True)
        Image.new("RGB", (20, 20), (200, 20, 20) if c == "cat" else (20, 20, 200)).save(tmp_path / "val" / c / "0.png")
    return run


def _run_job_args(container, run: str, tmp_path, *extra: str):
    """The Job's own arguments through the real CLI, with its EDIT values pointed at a local run and folder."""
    import subprocess
    import sys

    args = list(container["args"])
    args[args.index("--watch") + 1] = run
    args[args.index("--data") + 1] = f"folder:{tmp_path / 'val'}"  # imagenet: needs the 1000 wnid folders
    args[args.index("--resolution") + 1] = "16"
    args[args.index("--workers") + 1] = "1"  # 2 cores here
    return subprocess.run([sys.executable, "-m", "clipjob", *args, *extra], capture_output=True, text=True,
                          timeout=120, check=False)


def test_should_complete_after_the_runs_final_step_when_the_eval_job_runs_its_args(container, tmp_path):
    """The Job's arguments on a run with EMA weights (as the CoreNet recipe trains): it must exit 0 (the Job
    completes) instead of polling forever, and record that the EMA weights were evaluated."""
    import json

    assert 0 < float(container["args"][container["args"].index("--wait-for-run") + 1]) <= 3600
    assert "--max-polls" not in container["args"]
    p = _run_job_args(container, _tiny_run(tmp_path, ema_momentum=0.001), tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "step 4 is the run's final step (train.steps=4) and is evaluated: done" in p.stdout
    lines = (tmp_path / "run" / "eval" / "results.jsonl").read_text().splitlines()
    assert [json.loads(ln)["ema"] for ln in lines] == [True, True]


def test_should_evaluate_the_ema_weights_when_the_eval_job_runs(container):
    assert "--ema" in container["args"]


def test_should_fail_at_once_in_one_line_when_the_eval_job_watches_a_run_without_ema(container, tmp_path):
    """`--ema` on a run trained with train.ema_momentum 0: exit 2 (the Job's FailJob rule) with one line naming
    the run and what to do, before any step is evaluated; it used to warn per step and fail only at the end."""
    p = _run_job_args(container, _tiny_run(tmp_path, ema_momentum=0.0), tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("error: --ema: the run at " + str(tmp_path / "run") + " keeps no EMA weights"), line
    assert "drop --ema" in line, line
    assert "warning" not in p.stderr and not (tmp_path / "run" / "eval").exists()


def test_should_fail_at_once_when_ema_is_asked_of_a_run_whose_steps_have_none(container, tmp_path):
    """The same when the run dir has no config.yaml of its own yet (only committed steps): the first step's
    config says there is no EMA, so the watcher stops there instead of skipping every step."""
    run = _tiny_run(tmp_path, ema_momentum=0.0, run_config=False)
    p = _run_job_args(container, run, tmp_path)
    assert p.returncode == 2 and "step-00000002" in p.stderr and "drop --ema" in p.stderr, p.stdout + p.stderr


def test_should_request_a_cpu_per_decode_worker_and_one_for_the_main_process_when_the_eval_job_runs(container):
    args = container["args"]
    workers = int(args[args.index("--workers") + 1])
    assert workers >= 1
    assert float(container["resources"]["requests"]["cpu"]) >= workers + 1
    assert "cpu" not in container["resources"].get("limits", {}), "a CPU limit throttles the decoders"


def test_should_tolerate_the_gpu_taint_when_gpu_nodes_are_tainted(job, container):
    """A toleration matches a taint when key and effect match and the operator is Exists (any value) or
    Equal with the same value: check it against the taints GPU node pools carry."""
    assert "nvidia.com/gpu" in container["resources"]["limits"]
    tolerations = job["spec"]["template"]["spec"]["tolerations"]
    for taint in ({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},  # GKE
                  {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"},
                  {"key": "nvidia.com/gpu", "effect": "NoSchedule"}):
        assert any(_tolerates(t, taint) for t in tolerations), taint
    assert not any(_tolerates(t, {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"})
                   for t in tolerations), "tolerates more than GPU taints"


def _tolerates(t: dict, taint: dict) -> bool:
    if t.get("effect") and t["effect"] != taint["effect"]:
        return False
    if not t.get("key"):
        return t.get("operator") == "Exists"
    if t["key"] != taint["key"]:
        return False
    return t.get("operator", "Equal") == "Exists" or t.get("value", "") == taint.get("value", "")


def _uncomment(text: str, first: str) -> str:
    """The manifest with the commented-out block starting at the line `# {first}` uncommented: that line and the
    following `# ` lines indented deeper than it, as a user would by removing `# `."""
    lines, out, indent = text.splitlines(), [], None
    for line in lines:
        stripped = line.lstrip(" ")
        here = len(line) - len(stripped)
        if indent is None and stripped == f"# {first}":
            indent = here
            out.append(" " * here + stripped[2:])
            continue
        if indent is not None and indent >= 0:
            body = line[indent:]
            if line[:indent].strip() == "" and body.startswith("#   "):
                out.append(" " * indent + body[2:])
                continue
            indent = -1
        out.append(line)
    assert indent is not None, f"no commented-out `{first}` in the manifest"
    return "\n".join(out) + "\n"


def _with(*firsts: str) -> dict:
    text = EVAL_JOB.read_text()
    for first in firsts:
        text = _uncomment(text, first)
    (doc,) = [d for d in yaml.safe_load_all(text) if d]
    return doc


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_should_stay_valid_when_the_cluster_lines_are_uncommented(version):
    job = _with("kueue.x-k8s.io/queue-name: team-vision", "scheduling.volcano.sh/queue-name: default",
                "schedulerName: volcano", "nodeSelector:")
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["schedulerName"] == "volcano"
    try:
        kubernetes_validate.validate(job, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{'.'.join(map(str, e.caused_by.path))}: {e.caused_by.message}")


def test_should_carry_the_same_kueue_label_as_training_when_the_queue_line_is_uncommented(job, render):
    """Kueue reads the queue-name label from the Job object itself (not its pod template), where the chart puts
    it on the training job: same key, same place. It ships commented out: with Kueue installed, a queue that
    does not exist would keep the Job suspended."""
    uncommented = _with("kueue.x-k8s.io/queue-name: team-vision")
    queue = uncommented["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert "kueue.x-k8s.io/queue-name" not in uncommented["spec"]["template"]["metadata"]["labels"]
    training = [d for d in render(sets={"scheduling.kueueQueue": queue}).docs
                if d["kind"] in ("PyTorchJob", "TrainJob", "Job")]
    assert training and all(d["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue for d in training)
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_should_use_the_volcano_queue_annotation_and_scheduler_together_when_uncommented(job):
    pod = _with("scheduling.volcano.sh/queue-name: default", "schedulerName: volcano")["spec"]["template"]
    assert pod["metadata"]["annotations"]["scheduling.volcano.sh/queue-name"] == "default"
    assert pod["spec"]["schedulerName"] == "volcano"
    assert "schedulerName" not in job["spec"]["template"]["spec"], "Volcano ships commented out"
