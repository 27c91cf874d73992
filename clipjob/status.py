"""`clipjob status`: where a run stands, from its run directory and (optionally) its Kubernetes job.

    clipjob status s3://bucket/runs/vitb16                    # progress, speed, ETA, checkpoint, eval
    clipjob status clip-train -n clip                         # the job, its pods, why they wait or fail
    clipjob status s3://bucket/runs/vitb16 --job clip-train -n clip --watch --interval 60

Run-dir side: `config.yaml` (train.steps), `metrics.jsonl` (the last record of each step wins: a resumed run
logs some steps again), committed checkpoints and `eval/results.jsonl`, on any fsspec URL.
Kubernetes side: all API calls go through `KubeApi`, whose methods return the API's JSON (dicts), so tests can
put recorded responses in its place; the rest reads plain dicts.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import yaml

from clipjob import fs
from clipjob.errors import ClipjobError
from clipjob.train.metrics import read_jsonl  # stdlib and fs only: status imports no torch

RECENT_LOGS = 5  # metrics records averaged for samples/s, step time and data wait
LOG_LINES = 15  # last lines shown of a failing pod's log
LOG_PODS = 2  # failing pods whose log tails are shown (32 pods tend to fail alike)
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# (kind, group, version, plural), tried in this order for a job name; batch/v1 Jobs have no group
JOB_KINDS = [("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs"),
             ("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs"),
             ("Job", "batch", "v1", "jobs")]
# pod labels the controllers set, when the job carries none of the chart's (app.kubernetes.io/*)
CONTROLLER_LABEL = {"PyTorchJob": "training.kubeflow.org/job-name", "TrainJob": "jobset.sigs.k8s.io/jobset-name",
                    "Job": "batch.kubernetes.io/job-name"}
HINTS = {"FailedScheduling": "no node fits the pod (GPUs, memory, taints, nodeSelector): see the message",
         "ErrImagePull": "check image.repository/image.tag and imagePullSecrets",
         "ImagePullBackOff": "check image.repository/image.tag and imagePullSecrets",
         "CreateContainerConfigError": "a Secret or ConfigMap the pod names is missing: create it in the namespace",
         "CrashLoopBackOff": "the container keeps failing: see its log below"}
# an eval result's numbers that status shows, when the result has them: a captions: set has recall only
EVAL_FIELDS = (("top-1", "top1"), ("top-5", "top5"), ("R@1 i2t", "i2t_r1"), ("t2i", "t2i_r1"))


# ---- run directory --------------------------------------------------------------------------------------

def check_run_dir(run_dir: str) -> None:
    if fs.bucket_missing(run_dir):
        raise ClipjobError(f"{run_dir}: bucket does not exist (check the run dir URL and AWS_ENDPOINT_URL_S3)")
    if not (fs.exists(fs.join(run_dir, "config.yaml")) or fs.exists(fs.join(run_dir, "metrics.jsonl"))):
        raise ClipjobError(f"{run_dir}: no run there (no config.yaml or metrics.jsonl): check the URL")


def last_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the last one written (a resumed run logs the steps after its checkpoint again)."""
    by_step = {r["step"]: r for r in records if isinstance(r.get("step"), int)}
    return [by_step[s] for s in sorted(by_step)]


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def total_steps(run_dir: str) -> int | None:
    url = fs.join(run_dir, "config.yaml")
    if not fs.exists(url):
        return None
    try:
        data = yaml.safe_load(fs.read_text(url))
    except yaml.YAMLError:  # a write cut short, an edit gone wrong: the rest of the status still helps
        print(f"warning: {url}: not valid YAML, so the run's total steps are unknown", file=sys.stderr, flush=True)
        return None
    train = data.get("train") if isinstance(data, dict) else None
    steps = train.get("steps") if isinstance(train, dict) else None
    return steps if isinstance(steps, int) else None


def progress(records: list[dict[str, Any]], total: int | None, now: float) -> dict[str, Any]:
    """Step, % done, recent speed and ETA from metrics records (already one per step)."""
    if not records:
        return {"step": 0, "total": total, "percent": 0.0 if total else None}
    last, recent = records[-1], records[-RECENT_LOGS:]
    step_time = _mean(recent, "step_time_s")
    out = {"step": last["step"], "total": total,
           "percent": round(100.0 * last["step"] / total, 1) if total else None,
           "loss": last.get("loss"), "samples_per_s": _mean(recent, "samples_per_s"), "step_time_s": step_time,
           "data_wait_frac": _mean(recent, "data_wait_frac"), "mfu": _mean(recent, "mfu"),
           "bad_samples": last.get("bad_samples", 0),
           "bad_samples_by_reason": last.get("bad_samples_by_reason") or {},
           "last_log_age_s": max(0.0, now - last["time"]) if isinstance(last.get("time"), (int, float)) else None}
    out["eta_s"] = max(0, total - last["step"]) * step_time if total and step_time is not None else None
    return out


def newest_checkpoint(run_dir: str, now: float) -> dict[str, Any] | None:
    from clipjob.checkpoint import committed_steps, load_meta, step_url

    steps = committed_steps(run_dir)
    if not steps:
        return None
    url = step_url(run_dir, steps[-1])
    try:
        saved_at = load_meta(url).get("saved_at")
    except (OSError, ValueError):
        saved_at = None
    return {"step": steps[-1], "url": url, "committed": len(steps),
            "age_s": max(0.0, now - saved_at) if isinstance(saved_at, (int, float)) else None}  # saved as we read


def latest_eval(run_dir: str) -> list[dict[str, Any]]:
    """The results of the newest evaluated step, one per (eval set, EMA or not) (the last written wins)."""
    rows = [r for r in read_jsonl(fs.join(run_dir, "eval", "results.jsonl")) if isinstance(r.get("step"), int)]
    step = max((r["step"] for r in rows), default=None)
    by_set = {(r.get("data"), bool(r.get("ema"))): r for r in rows if r["step"] == step}
    return [{k: r.get(k) for k in ("step", "data", "ema", *(f for _, f in EVAL_FIELDS))} for r in by_set.values()]


def run_status(run_dir: str, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    check_run_dir(run_dir)
    total = total_steps(run_dir)
    p = progress(last_per_step(read_jsonl(fs.join(run_dir, "metrics.jsonl"))), total, now)
    c = newest_checkpoint(run_dir, now)
    # done once the final step is committed (the trainer always saves it): its metrics line comes first
    return {"run_dir": run_dir, **p, "done": bool(total and c and c["step"] >= total), "checkpoint": c,
            "eval": latest_eval(run_dir)}


# ---- Kubernetes -----------------------------------------------------------------------------------------

class KubeApi:
    """The one touchpoint of the `kubernetes` client. Config as kubectl finds it: in-cluster (service
    account), else $KUBECONFIG / ~/.kube/config. Every method returns the API's JSON as dicts."""

    def __init__(self, namespace: str | None = None, timeout_s: float = 10.0):
        from kubernetes import client, config

        try:
            config.load_incluster_config()
            default_ns = _incluster_namespace()
        except config.ConfigException:
            kubeconfig = os.environ.get("KUBECONFIG") or None  # read now, as kubectl does (the client reads
            try:                                                # it once, when first imported)
                config.load_kube_config(config_file=kubeconfig)
            except (config.ConfigException, OSError, TypeError) as e:
                raise ClipjobError(f"no Kubernetes config: not inside a cluster and no usable kubeconfig "
                                   f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); set KUBECONFIG "
                                   f"or run where kubectl works") from None
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            default_ns = (active or {}).get("context", {}).get("namespace")
        self.namespace = namespace or default_ns or "default"
        self.timeout = timeout_s
        self.server = client.Configuration.get_default_copy().host
        self.core, self.batch, self.custom = client.CoreV1Api(), client.BatchV1Api(), client.CustomObjectsApi()

    def _call(self, fn: Callable[..., Any], *args: Any, raw: bool = False, **kw: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            resp = fn(*args, _preload_content=False, _request_timeout=self.timeout, **kw)
        except ApiException as e:
            if e.status == 404:
                return None
            raise ClipjobError(f"Kubernetes API {self.server}: {e.status} {e.reason} (check your access to "
                               f"namespace {self.namespace})") from None
        except (HTTPError, OSError) as e:
            raise ClipjobError(f"Kubernetes API {self.server} unreachable ({type(e).__name__}): check the "
                               f"kubeconfig context or the network") from None
        text = resp.data.decode("utf-8", "replace")
        return text if raw else json.loads(text)

    def get_job(self, kind: str, name: str) -> dict | None:
        if kind == "Job":
            return self._call(self.batch.read_namespaced_job, name, self.namespace)
        _, group, version, plural = next(k for k in JOB_KINDS if k[0] == kind)
        return self._call(self.custom.get_namespaced_custom_object, group, version, self.namespace, plural, name)

    def list_pods(self, selector: str) -> dict:
        return self._call(self.core.list_namespaced_pod, self.namespace, label_selector=selector) or {"items": []}

    def list_events(self, object_name: str) -> dict:
        return self._call(self.core.list_namespaced_event, self.namespace,
                          field_selector=f"involvedObject.name={object_name}") or {"items": []}

    def pod_log(self, pod: str, container: str, previous: bool, tail_lines: int) -> str:
        return self._call(self.core.read_namespaced_pod_log, pod, self.namespace, container=container,
                          previous=previous, tail_lines=tail_lines, raw=True) or ""


def _incluster_namespace() -> str | None:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def looks_like_job_name(target: str) -> bool:
    return "://" not in target and len(target) <= 63 and bool(K8S_NAME.match(target)) and not fs.exists(target)


def find_job(api: Any, name: str) -> dict:
    for kind, *_ in JOB_KINDS:
        obj = api.get_job(kind, name)
        if obj is not None:
            return obj
    raise ClipjobError(f"job {name!r}: no PyTorchJob, TrainJob or Job of that name in namespace {api.namespace} "
                       f"(check --namespace)")


def pod_selectors(job: dict) -> list[str]:
    """Label selectors for the job's pods, in order: the chart's pod labels when the job carries the chart's
    labels (charts/train/templates/_helpers.tpl), then the label the job's controller puts on its pods."""
    labels = job["metadata"].get("labels") or {}
    chart = [k for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance") if k in labels]
    own = f"{CONTROLLER_LABEL[job['kind']]}={job['metadata']['name']}"
    if len(chart) == 2:
        return [",".join(f"{k}={labels[k]}" for k in chart) + ",app.kubernetes.io/component=train", own]
    return [own]


def job_pods(api: Any, job: dict) -> list[dict]:
    for selector in pod_selectors(job):
        items = api.list_pods(selector)["items"]
        if items:
            return items
    return []


def job_state(job: dict) -> dict[str, Any]:
    """The newest condition that holds (Running, Succeeded/Complete, Failed, Suspended, ...)."""
    held = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    held.sort(key=lambda c: c.get("lastTransitionTime") or "")
    cond = held[-1] if held else {}
    state = cond.get("type") or ("Suspended" if (job.get("spec") or {}).get("suspend") else "Created")
    return {"kind": job["kind"], "name": job["metadata"]["name"], "namespace": job["metadata"].get("namespace"),
            "state": state, "reason": cond.get("reason"), "message": cond.get("message"),
            "since": cond.get("lastTransitionTime"), "finished": state in ("Succeeded", "Complete", "Failed")}


def pod_summary(pod: dict) -> dict[str, Any]:
    """Phase, restarts and the most telling container state (waiting reason, or exit code)."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    reason, exit_code, previous = None, None, False
    for c in statuses:
        state, last = c.get("state") or {}, c.get("lastState") or {}
        if "waiting" in state:
            reason = state["waiting"].get("reason")
            term = last.get("terminated") or {}
            previous = bool(term)
            exit_code = term.get("exitCode", exit_code)
        elif "terminated" in state:
            reason, exit_code = state["terminated"].get("reason"), state["terminated"].get("exitCode")
    phase = (pod.get("status") or {}).get("phase", "Unknown")
    if phase == "Pending" and reason is None:
        sched = [c for c in (pod.get("status") or {}).get("conditions") or []
                 if c.get("type") == "PodScheduled" and c.get("status") == "False"]
        reason = sched[0].get("reason") if sched else None
    return {"name": pod["metadata"]["name"], "phase": phase, "node": (pod.get("spec") or {}).get("nodeName"),
            "restarts": sum(c.get("restartCount", 0) for c in statuses), "reason": reason, "exit_code": exit_code,
            "container": statuses[0]["name"] if statuses else pod["spec"]["containers"][0]["name"],
            "previous_log": previous}


def failing(p: dict[str, Any]) -> bool:
    return p["phase"] == "Failed" or (p["exit_code"] not in (None, 0))


def warning_events(api: Any, name: str, limit: int = 3) -> list[dict[str, Any]]:
    """The newest distinct Warning events of one object (why a pod is Pending, why a job fails)."""
    items = [e for e in api.list_events(name)["items"] if e.get("type") == "Warning"]
    items.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    seen, out = set(), []
    for e in reversed(items):
        if (e.get("reason"), e.get("message")) not in seen:
            seen.add((e.get("reason"), e.get("message")))
            out.append({"object": name, "reason": e.get("reason"), "message": (e.get("message") or "").strip(),
                        "count": e.get("count") or 1, "hint": HINTS.get(e.get("reason") or "")})
    return out[:limit][::-1]


def job_status(api: Any, name: str, max_pods: int = 8) -> dict[str, Any]:
    """The job's state, its pods, events that explain Pending/failures, and the log tails of failing pods."""
    job = find_job(api, name)
    pods = sorted((pod_summary(p) for p in job_pods(api, job)), key=lambda p: p["name"])
    events = warning_events(api, name)
    trouble = [p for p in pods if p["phase"] == "Pending" or p["reason"] in HINTS or failing(p)][:max_pods]
    for p in trouble:
        own = warning_events(api, p["name"]) or [{"object": p["name"], "reason": p["reason"], "message": "",
                                                  "count": 1, "hint": None}] * (p["reason"] in HINTS)
        if own and p["reason"] in HINTS and not any(e["hint"] for e in own):
            own[-1] = {**own[-1], "hint": HINTS[p["reason"]]}  # the pod's own state says what to do
        events += own
    logs = {p["name"]: api.pod_log(p["name"], p["container"], p["previous_log"], LOG_LINES).splitlines()
            for p in [p for p in trouble if failing(p)][:LOG_PODS]}
    phases = dict(Counter(p["phase"] for p in pods))
    return {"job": job_state(job), "pod_phases": phases, "pods": pods, "events": same_once(events), "logs": logs}


def same_once(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per distinct (reason, message): 32 pods that wait for GPUs tell the same story."""
    out: dict[tuple, dict[str, Any]] = {}
    for e in events:
        key = (e["reason"], e["message"])
        if key in out:
            out[key]["also"] += 1
        else:
            out[key] = {**e, "also": 0}
    return list(out.values())


# ---- output ---------------------------------------------------------------------------------------------

def duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(max(0, s))
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    return f"{d}d{h}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.1f}%"


def render_run(r: dict[str, Any]) -> list[str]:
    total = r["total"] if r["total"] is not None else "?"
    pct = f" ({r['percent']:.1f}%)" if r["percent"] is not None else ""
    lines = [f"run         {r['run_dir']}",
             f"step        {r['step']} / {total}{pct}" + ("  done" if r["done"] else f"  ETA {duration(r.get('eta_s'))}")]
    if r.get("samples_per_s") is not None:
        loss = f"  loss {r['loss']:.4g}" if r.get("loss") is not None else ""
        lines.append(f"speed       {r['samples_per_s']:.1f} samples/s  data wait {_pct(r['data_wait_frac'])}  "
                     f"MFU {_pct(r['mfu'])}{loss}  (last log {duration(r['last_log_age_s'])} ago)")
        by = ", ".join(f"{k} {v}" for k, v in r["bad_samples_by_reason"].items())
        lines.append(f"bad samples {r['bad_samples']}" + (f" ({by})" if by else ""))
    c = r["checkpoint"]
    lines.append(f"checkpoint  step {c['step']}, saved {duration(c['age_s'])} ago  {c['url']}" if c
                 else "checkpoint  none committed yet")
    return lines + ([f"eval        {eval_line(e)}" for e in r["eval"]] or ["eval        no results yet"])


def eval_line(e: dict[str, Any]) -> str:
    """`step N SET: top-1 a  top-5 b  R@1 i2t c  t2i d  (EMA)`, each number only where the result has it."""
    shown = "  ".join(f"{name} {e[k]:.2f}" for name, k in EVAL_FIELDS if isinstance(e.get(k), (int, float)))
    return f"step {e['step']} {e['data']}: {shown or 'no top-1 or recall'}" + ("  (EMA)" if e.get("ema") else "")


def render_job(j: dict[str, Any]) -> list[str]:
    s = j["job"]
    why = f" ({s['reason']}: {s['message']})" if s.get("reason") else ""
    lines = [f"job         {s['kind']} {s['namespace']}/{s['name']}: {s['state']}{why}",
             "pods        " + (", ".join(f"{n} {ph}" for ph, n in sorted(j["pod_phases"].items())) or "none")]
    for p in j["pods"]:
        extra = " ".join(x for x in (p["reason"], f"exit {p['exit_code']}" if p["exit_code"] is not None else "") if x)
        lines.append(f"  {p['name']:40s} {p['phase']:9s} restarts {p['restarts']:<3d} {p['node'] or '-'}  {extra}".rstrip())
    for e in j["events"]:
        hint = f"  -> {e['hint']}" if e.get("hint") else ""
        also = f" (and {e['also']} more)" if e.get("also") else ""
        lines.append(f"why         {e['object']}{also}: {e['reason']}: {e['message']}{hint}".replace(": : ", ": "))
    for pod, tail in j["logs"].items():
        lines.append(f"log         {pod} (last {len(tail)} lines):")
        lines += [f"  | {line}" for line in tail]
    return lines


def render(status: dict[str, Any]) -> str:
    parts = ([render_run(status["run"])] if "run" in status else []) + ([render_job(status["k8s"])] if "k8s" in status else [])
    return "\n".join(line for p in parts for line in p) + "\n"


def finished(status: dict[str, Any]) -> bool:
    """--watch stops here: the run committed its final step, or (job only) the job finished."""
    if "run" in status:
        return status["run"]["done"] or ("k8s" in status and status["k8s"]["job"]["state"] == "Failed")
    return status["k8s"]["job"]["finished"]


# ---- the command ----------------------------------------------------------------------------------------

def targets(target: str | None, job: str | None) -> tuple[str | None, str | None]:
    """(run dir, job name): a URL or existing path is a run dir; else a k8s-style name is a job."""
    if target is None and job is None:
        raise ClipjobError("status: give a run dir (path or URL) or --job NAME")
    if target is not None and job is None and looks_like_job_name(target):
        return None, target
    return target, job


def collector(target: str | None, job: str | None, namespace: str | None,
              api_factory: Callable[[str | None], Any] = KubeApi) -> Callable[[], dict[str, Any]]:
    """A function that reads the status once (the Kubernetes client is set up once, on first use)."""
    run_dir, job_name = targets(target, job)
    try:
        api = api_factory(namespace) if job_name else None
    except ClipjobError as e:
        if job is None:  # the argument was taken for a job name: say it is not a run dir either
            raise ClipjobError(f"{target}: no run dir at that path, and as a job name: {e}") from None
        raise

    def collect() -> dict[str, Any]:
        out: dict[str, Any] = {}
        if run_dir is not None:
            out["run"] = run_status(run_dir)
        if api is not None:
            out["k8s"] = job_status(api, job_name)
        return out

    return collect


def watch(collect: Callable[[], dict[str, Any]], show: Callable[[dict[str, Any]], None], interval_s: float,
          max_polls: int | None = None) -> int:
    """Show the status every `interval_s` until finished (or Ctrl-C / SIGTERM: a clean stop). Returns polls."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    polls = 0
    try:
        while True:
            status = collect()
            show(status)
            polls += 1
            if finished(status) or (max_polls is not None and polls >= max_polls):
                return polls
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return polls
    finally:
        signal.signal(signal.SIGTERM, old)
