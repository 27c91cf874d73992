"""`clipjob status` (clipjob/status.py): the run-dir arithmetic, and the Kubernetes side.

The Kubernetes side runs against recorded API responses, not a live API server (there is none on these
machines): tests/k8s/recorded/*.json hold PyTorchJob / TrainJob / batch Job objects, PodLists and EventLists in
the JSON shape the API returns (apiVersion/kind/metadata/status), and the pod logs, for one situation each.
`RecordedApi` stands in for `KubeApi` (the one object that calls the API): it answers get/list calls from
those files and applies the label and field selectors as the API server would, so pod selection is tested.
The client's own config loading and error paths run through the CLI in tests/integration/test_status_cli.py (a
missing kubeconfig, an API address nothing listens on).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipjob import status as st
from clipjob.errors import ClipjobError

RECORDED = Path(__file__).resolve().parents[1] / "k8s" / "recorded"


class RecordedApi:
    """KubeApi's methods, answered from one recorded case."""

    def __init__(self, case: str, namespace: str = "clip"):
        self.data = json.loads((RECORDED / f"{case}.json").read_text())
        self.namespace = namespace
        self.log_calls: list[tuple[str, str, bool, int]] = []
        self.event_calls: list[str] = []

    def get_job(self, kind: str, name: str) -> dict | None:
        return self.data["jobs"].get(f"{kind}/{name}")

    def list_pods(self, selector: str) -> dict:
        want = dict(kv.split("=", 1) for kv in selector.split(","))
        items = [p for p in self.data["pods"]["items"]
                 if all(p["metadata"]["labels"].get(k) == v for k, v in want.items())]
        return {**self.data["pods"], "items": items}

    def list_events(self, object_name: str) -> dict:
        self.event_calls.append(object_name)
        items = [e for e in self.data["events"]["items"] if e["involvedObject"]["name"] == object_name]
        return {**self.data["events"], "items": items}

    def pod_log(self, pod: str, container: str, previous: bool, tail_lines: int) -> str:
        self.log_calls.append((pod, container, previous, tail_lines))
        return "".join(self.data["logs"].get(pod, "").splitlines(keepends=True)[-tail_lines:])


def _job(case: str) -> tuple[dict, str]:
    s = st.job_status(RecordedApi(case), "clip-train")
    return s, st.render({"k8s": s})


def test_should_show_a_running_pytorchjob_with_its_pods_and_restarts():
    s, text = _job("running")
    assert s["job"]["kind"] == "PyTorchJob" and s["job"]["state"] == "Running" and not s["job"]["finished"]
    assert s["pod_phases"] == {"Running": 2}
    assert [(p["name"], p["restarts"]) for p in s["pods"]] == [("clip-train-worker-0", 0), ("clip-train-worker-1", 1)]
    assert s["events"] == [] and s["logs"] == {}  # nothing wrong: no warnings, no log tails
    assert "job         PyTorchJob clip/clip-train: Running (PyTorchJobRunning: PyTorchJob clip-train is running.)" in text


def test_should_explain_a_pending_pod_by_its_failedscheduling_event():
    s, text = _job("pending-unschedulable")
    assert s["pod_phases"] == {"Pending": 1, "Running": 1}
    pending = next(p for p in s["pods"] if p["phase"] == "Pending")
    assert pending["reason"] == "Unschedulable"
    [ev] = s["events"]
    assert ev["object"] == "clip-train-worker-1" and ev["reason"] == "FailedScheduling" and ev["count"] == 14
    assert "4 Insufficient nvidia.com/gpu" in ev["message"]
    assert "why         clip-train-worker-1: FailedScheduling: 0/5 nodes are available" in text
    assert "no node fits the pod" in text


def test_should_find_a_trainjob_and_its_jobset_pods_and_show_the_image_pull_error():
    s, text = _job("image-pull-error")
    assert s["job"]["kind"] == "TrainJob" and s["job"]["state"] == "Created"  # no condition yet
    # the TrainJob carries the chart's labels but its JobSet pods do not: found by the JobSet label instead
    assert [p["name"] for p in s["pods"]] == ["clip-train-node-0-0-x7k2p", "clip-train-node-0-1-q9m4d"]
    assert {p["reason"] for p in s["pods"]} == {"ImagePullBackOff"}
    reasons = [e["message"] for e in s["events"] if e["object"] == "clip-train-node-0-0-x7k2p"]
    assert "Error: ImagePullBackOff" in reasons and any("clipjob:0.1.1: not found" in m for m in reasons)
    assert all(e["also"] == 1 for e in s["events"])  # the second pod's identical events fold into the first's
    assert "check image.repository/image.tag and imagePullSecrets" in text
    assert s["logs"] == {}  # a container that never started has no log to show


def test_should_show_a_failed_indexed_job_with_exit_1_and_the_log_tail_of_each_failing_pod():
    api = RecordedApi("failed-exit-1")
    s = st.job_status(api, "clip-train")
    text = st.render({"k8s": s})
    assert s["job"]["kind"] == "Job" and s["job"]["state"] == "Failed" and s["job"]["finished"]
    assert [(p["phase"], p["exit_code"]) for p in s["pods"]] == [("Failed", 1), ("Failed", 1)]
    assert sorted(api.log_calls) == [("clip-train-0-8fj2l", "pytorch", False, st.LOG_LINES),
                                     ("clip-train-1-t5wq3", "pytorch", False, st.LOG_LINES)]
    tail = s["logs"]["clip-train-0-8fj2l"]
    assert tail == api.data["logs"]["clip-train-0-8fj2l"].splitlines()[-st.LOG_LINES:]
    assert tail[-1].startswith("error: worker 0 failed with exit code 1")
    assert "  | [rank0]: torch.OutOfMemoryError: CUDA out of memory." in text
    assert any(e["reason"] == "PodFailurePolicy" and e["object"] == "clip-train" for e in s["events"])


def test_should_show_a_succeeded_pytorchjob_as_finished_without_trouble():
    api = RecordedApi("succeeded")
    s = st.job_status(api, "clip-train")
    text = st.render({"k8s": s})
    assert api.event_calls == ["clip-train"]  # completed pods are no trouble: their events are not read
    assert s["job"]["state"] == "Succeeded" and s["job"]["finished"]  # the newest true condition, not Running
    assert s["pod_phases"] == {"Succeeded": 2}
    assert all(p["exit_code"] == 0 and p["reason"] == "Completed" for p in s["pods"])
    assert s["events"] == [] and s["logs"] == {} and "why" not in text and "log " not in text
    assert st.finished({"k8s": s})


def test_should_name_the_missing_secret_of_a_createcontainerconfigerror():
    s, text = _job("missing-secret")
    assert {p["reason"] for p in s["pods"]} == {"CreateContainerConfigError"}
    # both pods say the same: one line, naming the first pod and counting the other
    assert [(e["object"], e["message"], e["also"]) for e in s["events"]] == [
        ("clip-train-worker-0", 'Error: secret "clipjob-s3" not found', 1)]
    assert "clip-train-worker-0 (and 1 more): Failed: Error: secret" in text
    assert "a Secret or ConfigMap the pod names is missing" in text


def test_should_read_the_previous_log_of_a_pod_in_crashloopbackoff():
    api = RecordedApi("running")  # worker-1 of the recording, as it looks while its container backs off
    pod = api.data["pods"]["items"][1]
    pod["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message":
                                                      "back-off 20s restarting failed container=pytorch"}}
    api.data["logs"]["clip-train-worker-1"] = "error: lost peer rank 0 (gloo: connection reset); exit 203\n"
    s = st.job_status(api, "clip-train")
    p = s["pods"][1]
    assert (p["phase"], p["reason"], p["exit_code"], p["restarts"]) == ("Running", "CrashLoopBackOff", 203, 1)
    assert api.log_calls == [("clip-train-worker-1", "pytorch", True, st.LOG_LINES)]  # the container that died
    assert s["logs"] == {"clip-train-worker-1": ["error: lost peer rank 0 (gloo: connection reset); exit 203"]}


def test_should_fail_in_one_line_when_no_job_has_that_name():
    with pytest.raises(ClipjobError, match=r"^job 'other': no PyTorchJob, TrainJob or Job of that name in namespace clip"):
        st.job_status(RecordedApi("running"), "other")


def test_should_tell_a_job_name_from_a_run_dir(tmp_path):
    assert st.targets("clip-train", None) == (None, "clip-train")
    assert st.targets("s3://b/runs/r1", None) == ("s3://b/runs/r1", None)
    (tmp_path / "clip-train").mkdir()
    assert st.looks_like_job_name("clip-train") and not st.looks_like_job_name(str(tmp_path / "clip-train"))
    assert st.targets("s3://b/r", "clip-train") == ("s3://b/r", "clip-train")
    with pytest.raises(ClipjobError, match="give a run dir"):
        st.targets(None, None)


# ---- run-dir arithmetic -----------------------------------------------------------------------------------

def test_should_keep_the_last_record_of_a_step_logged_again_after_a_resume():
    recs = [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}, {"step": 3, "loss": 7.0},
            {"step": 2, "loss": 8.5}, {"step": 3, "loss": 7.5}, {"step": 4, "loss": 6.0}]
    assert [(r["step"], r["loss"]) for r in st.last_per_step(recs)] == [(1, 9.0), (2, 8.5), (3, 7.5), (4, 6.0)]


def test_should_read_the_total_steps_or_say_why_not_when_the_runs_config_is_broken(tmp_path, capsys):
    from clipjob.status import total_steps

    (tmp_path / "config.yaml").write_text("train:\n  steps: 500\n")
    assert total_steps(str(tmp_path)) == 500
    for broken in ("model:\n  embed_dim: [256\n", "- a list\n", "train: 7\n"):  # cut short, not a mapping
        (tmp_path / "config.yaml").write_text(broken)
        assert total_steps(str(tmp_path)) is None
    assert capsys.readouterr().err.count("not valid YAML, so the run's total steps are unknown") == 1


def test_should_estimate_eta_from_the_recent_step_time():
    recs = [{"step": s, "step_time_s": 2.0 if s <= 5 else 1.0, "samples_per_s": 100.0 * s, "time": 1000.0 + s}
            for s in range(1, 11)]
    p = st.progress(recs, total=100, now=1015.0)
    assert p["step"] == 10 and p["percent"] == 10.0
    assert p["step_time_s"] == 1.0 and p["eta_s"] == 90.0  # only the last RECENT_LOGS (5) records count
    assert p["samples_per_s"] == 800.0 and p["last_log_age_s"] == 5.0
    assert st.progress([], total=None, now=0.0) == {"step": 0, "total": None, "percent": None}


def test_should_format_durations_compactly():
    assert [st.duration(s) for s in (None, 7, 75, 3725, 90000)] == ["?", "7s", "1m15s", "1h02m", "1d1h"]


def test_should_report_the_latest_eval_step_one_line_per_data_set(tmp_path):
    rows = [{"step": 2, "data": "imagenet", "top1": 1.0, "top5": 5.0},
            {"step": 4, "data": "imagenet", "top1": 2.0, "top5": 6.0},
            {"step": 4, "data": "emoji-heldout", "top1": 30.0, "top5": 70.0, "ema": True}]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = st.latest_eval(str(tmp_path))
    assert [(e["data"], e["top1"]) for e in got] == [("imagenet", 2.0), ("emoji-heldout", 30.0)]


def test_should_show_recall_when_an_eval_result_is_retrieval_only_or_has_both(tmp_path):
    rows = [{"step": 4, "data": "captions:s3://b/cc", "images": 50, "captions": 48, "i2t_r1": 12.0, "i2t_r5": 30.0,
             "i2t_r10": 41.0, "t2i_r1": 10.5, "t2i_r5": 28.0, "t2i_r10": 40.0},
            {"step": 4, "data": "emoji-heldout:/e", "top1": 30.0, "top5": 70.0, "i2t_r1": 40.0, "t2i_r1": 38.25},
            {"step": 4, "data": "emoji-heldout:/e", "top1": 33.0, "top5": 72.0, "ema": True}]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = {"run_dir": str(tmp_path), "step": 4, "total": 4, "percent": 100.0, "done": True, "checkpoint": None,
         "eval": st.latest_eval(str(tmp_path))}  # EMA and raw results of one set are two lines
    assert st.render_run(r)[-3:] == [
        "eval        step 4 captions:s3://b/cc: R@1 i2t 12.00  t2i 10.50",
        "eval        step 4 emoji-heldout:/e: top-1 30.00  top-5 70.00  R@1 i2t 40.00  t2i 38.25",
        "eval        step 4 emoji-heldout:/e: top-1 33.00  top-5 72.00  (EMA)"]


def test_should_say_no_results_yet_when_a_run_has_no_eval_results(tmp_path):
    r = {"run_dir": str(tmp_path), "step": 0, "total": 4, "percent": 0.0, "done": False, "checkpoint": None,
         "eval": st.latest_eval(str(tmp_path))}  # no eval/results.jsonl
    assert r["eval"] == [] and st.render_run(r)[-1] == "eval        no results yet"


def test_should_print_a_run_in_aligned_lines():
    r = {"run_dir": "s3://b/runs/r1", "step": 50, "total": 200, "percent": 25.0, "done": False, "eta_s": 750.0,
         "samples_per_s": 812.4, "data_wait_frac": 0.031, "mfu": 0.412, "loss": 3.2101, "last_log_age_s": 4.0,
         "bad_samples": 12, "bad_samples_by_reason": {"decode": 10, "missing_text": 2},
         "checkpoint": {"step": 50, "url": "s3://b/runs/r1/checkpoints/step-00000050", "age_s": 130.0},
         "eval": [{"step": 50, "data": "imagenet", "top1": 12.345, "top5": 30.1, "ema": True}]}
    assert st.render({"run": r}).splitlines() == [
        "run         s3://b/runs/r1",
        "step        50 / 200 (25.0%)  ETA 12m30s",
        "speed       812.4 samples/s  data wait 3.1%  MFU 41.2%  loss 3.21  (last log 4s ago)",
        "bad samples 12 (decode 10, missing_text 2)",
        "checkpoint  step 50, saved 2m10s ago  s3://b/runs/r1/checkpoints/step-00000050",
        "eval        step 50 imagenet: top-1 12.35  top-5 30.10  (EMA)"]


# ---- KubeApi through the real client, against the recordings served on loopback --------------------------

class _Replay:
    """An HTTP server on loopback that answers the kubernetes client's GETs from one recorded case (the paths
    and query parameters of the real API; not an API server: no auth, no watch, GET only)."""

    def __init__(self, case: str):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlparse

        api, self.paths = RecordedApi(case), []
        plural = {"pytorchjobs": "PyTorchJob", "trainjobs": "TrainJob", "jobs": "Job"}

        def answer(path: str, q: dict[str, str]) -> tuple[int, str]:
            parts = path.strip("/").split("/")
            if parts[-1] == "log":
                return 200, api.pod_log(parts[-2], q["container"], q.get("previous") == "true", int(q["tailLines"]))
            if parts[-1] == "pods":
                return 200, json.dumps(api.list_pods(q["labelSelector"]))
            if parts[-1] == "events":
                return 200, json.dumps(api.list_events(q["fieldSelector"].removeprefix("involvedObject.name=")))
            obj = api.get_job(plural[parts[-2]], parts[-1])
            return (200, json.dumps(obj)) if obj else (404, json.dumps({"kind": "Status", "code": 404}))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                self.server.paths.append(self.path)
                code, body = answer(url.path, {k: v[0] for k, v in parse_qs(url.query).items()})
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *a) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.paths = self.paths
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_should_read_jobs_pods_events_and_logs_through_the_kubernetes_client(tmp_path, monkeypatch):
    replay = _Replay("failed-exit-1")
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{replay.url}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: ctx, context: {{cluster: c, user: u, namespace: clip}}}}]
current-context: ctx
""")
    monkeypatch.setenv("KUBECONFIG", str(cfg))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    try:
        api = st.KubeApi()
        assert api.namespace == "clip"  # the kubeconfig context's namespace, as kubectl takes it
        s = st.job_status(api, "clip-train")
    finally:
        replay.server.shutdown()
    assert s == st.job_status(RecordedApi("failed-exit-1"), "clip-train")  # same answer over HTTP
    paths = [p.split("?")[0] for p in replay.paths]
    assert paths[:3] == ["/apis/kubeflow.org/v1/namespaces/clip/pytorchjobs/clip-train",  # 404: not this kind
                         "/apis/trainer.kubeflow.org/v1alpha1/namespaces/clip/trainjobs/clip-train",
                         "/apis/batch/v1/namespaces/clip/jobs/clip-train"]
    assert "/api/v1/namespaces/clip/pods/clip-train-0-8fj2l/log" in paths
