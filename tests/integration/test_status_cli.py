"""`clipjob status` on real run dirs: a tiny `clipjob train` on local disk (watched live) and on the loopback
S3 server, read through the CLI as an operator would; and a job name with no Kubernetes to ask (no kubeconfig,
an API address nothing listens on)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image
from trainrun import Run, free_port, make_shards, train_argv


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_shards(tmp_path_factory.mktemp("shards"), samples=64, per_shard=32)


def status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipjob", "status", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_should_follow_a_live_local_run_until_its_final_step(shards, tmp_path):
    run_dir = str(tmp_path / "run")
    train = Run(train_argv(shards, run_dir, "train.steps=20", "train.ckpt_every_steps=2"),
                env={"CLIPJOB_TEST_STEP_DELAY_S": "0.2"})  # the trainer's test hook: a run of a few seconds
    try:
        train.wait_for(r"checkpoint: step 2 committed")
        os.killpg(train.proc.pid, signal.SIGSTOP)  # hold the run mid-way while status reads it (a busy
        # machine can take longer to start `clipjob status` than the whole run takes)
        mid = json.loads(status(run_dir, "--json").stdout)["run"]
        assert 2 <= mid["step"] < 20 and mid["total"] == 20 and not mid["done"]
        assert mid["percent"] == round(100 * mid["step"] / 20, 1) and mid["eta_s"] > 0
        assert mid["checkpoint"]["step"] >= 2 and 0 <= mid["checkpoint"]["age_s"] < 60
        assert mid["samples_per_s"] > 0 and 0 <= mid["data_wait_frac"] <= 1 and mid["mfu"] > 0
        assert mid["bad_samples"] == 0 and mid["bad_samples_by_reason"] == {}
        watcher = subprocess.Popen([sys.executable, "-m", "clipjob", "status", run_dir, "--watch", "--interval", "0.5"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = [watcher.stdout.readline() for _ in range(2)]
        assert first[0] == f"run         {run_dir}\n" and "done" not in first[1], first
        os.killpg(train.proc.pid, signal.SIGCONT)
        assert train.wait(300) == 0, train.output
        finished_at = time.monotonic()
        out, err = watcher.communicate(timeout=60)
        assert watcher.returncode == 0, err
        assert time.monotonic() - finished_at < 30  # it stopped by itself once the final step was logged
        last = out.split("run         ")[-1]
        assert "step        20 / 20 (100.0%)  done" in last and "checkpoint  step 20, saved" in last
    finally:
        if train.proc.poll() is None:
            os.killpg(train.proc.pid, signal.SIGCONT)
        train.kill_all()


def test_should_stop_a_watch_cleanly_on_sigterm(shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train:\n  steps: 100\n")  # a run that has not logged a step yet
    p = subprocess.Popen([sys.executable, "-m", "clipjob", "status", str(run_dir), "--watch", "--interval", "0.2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()  # printed once: now it waits for the next poll
    assert first.startswith("run         ")
    time.sleep(0.5)
    assert p.poll() is None  # still watching: step 0 of 100
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and err == ""
    assert "step        0 / 100 (0.0%)" in out and "checkpoint  none committed yet" in out


def test_should_show_a_run_and_its_eval_results_on_s3(shards, s3_server, s3_bucket, tmp_path):
    run_dir = f"{s3_bucket}/runs/r1"
    r = subprocess.run(train_argv(shards, run_dir, "train.steps=4", "train.ckpt_every_steps=2"),
                       capture_output=True, text=True, env={**os.environ, **s3_server.env()}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    images = tmp_path / "eval"  # two classes of two images: the eval watcher appends eval/results.jsonl
    for c, color in (("red", (220, 30, 30)), ("blue", (40, 60, 220))):
        (images / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), color).save(images / c / f"{i}.png")
    r = subprocess.run([sys.executable, "-m", "clipjob", "eval", "zeroshot", "--watch", run_dir, "--data",
                        f"folder:{images}", "--workers", "0"], capture_output=True, text=True,
                       env={**os.environ, **s3_server.env()}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(status(run_dir, "--json", env=s3_server.env()).stdout)["run"]
    assert (got["step"], got["total"], got["percent"], got["done"]) == (4, 4, 100.0, True)
    assert got["checkpoint"]["step"] == 4 and got["checkpoint"]["url"] == f"{run_dir}/checkpoints/step-00000004"
    assert got["checkpoint"]["committed"] == 2 and got["samples_per_s"] > 0
    [ev] = got["eval"]  # the newest evaluated step only
    assert ev["step"] == 4 and ev["data"] == f"folder:{images}" and 0 <= ev["top1"] <= 100


def test_should_fail_in_one_line_for_a_run_dir_that_does_not_exist(tmp_path, s3_server, s3_bucket):
    r = status(str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr == f"error: {tmp_path / 'nope'}: no run there (no config.yaml or metrics.jsonl): check the URL\n"
    r = status("s3://no-such-bucket-b2/runs/x", env=s3_server.env())
    assert r.returncode == 2
    assert r.stderr.startswith("error: s3://no-such-bucket-b2/runs/x: bucket does not exist")
    assert len(r.stderr.splitlines()) == 1


def status_outside_a_cluster(tmp_path, kubeconfig: str, *args: str) -> subprocess.CompletedProcess:
    """`clipjob status` with this kubeconfig, an empty HOME and no KUBERNETES_* env (not "in a cluster")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    return subprocess.run([sys.executable, "-m", "clipjob", "status", *args], capture_output=True, text=True,
                          env={**env, "KUBECONFIG": kubeconfig, "HOME": str(tmp_path)}, timeout=60)


def test_should_fail_in_one_line_without_a_kubeconfig(tmp_path):
    r = status_outside_a_cluster(tmp_path, str(tmp_path / "none"), "clip-train")
    assert r.returncode == 2
    assert r.stderr.startswith("error: clip-train: no run dir at that path, and as a job name: no Kubernetes config")
    assert len(r.stderr.strip().splitlines()) == 1


def test_should_fail_in_one_line_when_the_api_server_is_unreachable(tmp_path):
    port = free_port()  # nothing listens on it
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: ctx, context: {{cluster: c, user: u, namespace: clip}}}}]
current-context: ctx
""")
    r = status_outside_a_cluster(tmp_path, str(cfg), "--job", "clip-train")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"error: Kubernetes API http://127.0.0.1:{port} unreachable (MaxRetryError): "
                                f"check the kubeconfig context or the network")
