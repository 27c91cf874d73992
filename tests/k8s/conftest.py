"""Helpers for the Kubernetes tests: render the chart with the real helm binary, load manifests.

helm comes from scripts/install_tools.sh (.tools/bin/helm); without it the chart tests skip and say so.
"""

from __future__ import annotations

import copy
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "train"
VALUES_DIR = Path(__file__).resolve().parent / "values"
HELM = REPO / ".tools" / "bin" / "helm"
EVAL_JOB = REPO / "k8s" / "eval-job.yaml"
# The Training Operator's and Kubeflow Trainer's CRDs live in the steering repo's shared/ folder, beside this
# checkout; Volcano's PodGroup CRD is not there: tests/k8s/schemas/ holds a hand-written schema of its fields.
PYTORCHJOB_CRD = REPO.parent / "shared" / "reference" / "kubeflow" / "kubeflow.org_pytorchjobs.yaml"
TRAINER_CRDS = REPO.parent / "shared" / "reference" / "kubeflow-trainer"
TRAINJOB_CRD = TRAINER_CRDS / "trainer.kubeflow.org_trainjobs.yaml"
TRAININGRUNTIME_CRD = TRAINER_CRDS / "trainer.kubeflow.org_trainingruntimes.yaml"
PODGROUP_SCHEMA = Path(__file__).resolve().parent / "schemas" / "volcano-podgroup-v1beta1.json"
RELEASE = "clip-train"
# Validate against the oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a current one.
KUBE_VERSIONS = ("1.27", "1.34")


@dataclass
class Rendered:
    """The objects of one `helm template`, addressable by kind."""

    docs: list[dict]

    def kinds(self) -> list[str]:
        return [d["kind"] for d in self.docs]

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> dict:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, got {self.kinds()}"
        return found[0]

    def job(self) -> dict:
        """The job object: PyTorchJob, TrainJob or batch Job."""
        (job,) = [d for d in self.docs if d["kind"] in ("PyTorchJob", "TrainJob", "Job")]
        return job

    def pod_template(self) -> dict:
        """The pod template of the training workload, whichever kind renders it."""
        if self.all("PyTorchJob"):
            return self.one("PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
        if self.all("TrainingRuntime"):
            (node,) = self.one("TrainingRuntime")["spec"]["template"]["spec"]["replicatedJobs"]
            return node["template"]["spec"]["template"]
        if self.all("TrainJob"):  # on an existing ClusterTrainingRuntime: the chart's part of the pod
            spec = self.one("TrainJob")["spec"]
            (patch,) = spec["runtimePatches"]
            (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
            pod = copy.deepcopy(node["template"]["spec"]["template"])
            trainer = spec["trainer"]
            (c,) = pod["spec"]["containers"]
            c.update(image=trainer["image"], args=trainer["args"], env=trainer["env"],
                     resources=trainer["resourcesPerNode"])
            return pod
        return self.one("Job")["spec"]["template"]

    def container(self) -> dict:
        """The training container: `pytorch` (PyTorchJob, Job) or `node` (the Trainer's name for it)."""
        (c,) = [c for c in self.pod_template()["spec"]["containers"] if c["name"] in ("pytorch", "node")]
        return c

    def env(self) -> dict[str, dict]:
        return {e["name"]: e for e in self.container().get("env", [])}


def helm_template(*args: str, release: str = RELEASE) -> subprocess.CompletedProcess:
    return subprocess.run([str(HELM), "template", release, str(CHART), *args],
                          capture_output=True, text=True, check=False, timeout=60)


def values_args(values_files: tuple[str, ...], sets: dict[str, str] | None) -> list[str]:
    args = []
    for name in values_files:
        args += ["-f", str(VALUES_DIR / name)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture(scope="session")
def helm() -> Path:
    if not HELM.exists():
        pytest.skip(f"helm is not installed at {HELM.relative_to(REPO)}: run scripts/install_tools.sh (make tools)")
    return HELM


@pytest.fixture(scope="session")
def render(helm):
    """render('values.yaml', ..., sets={'a.b': 'v'}) -> Rendered; fails the test with helm's message."""
    cache: dict[tuple, Rendered] = {}

    def _render(*values_files: str, sets: dict[str, str] | None = None, release: str = RELEASE) -> Rendered:
        key = (values_files, tuple(sorted((sets or {}).items())), release)
        if key not in cache:
            proc = helm_template(*values_args(values_files, sets), release=release)
            assert proc.returncode == 0, proc.stderr
            cache[key] = Rendered([d for d in yaml.safe_load_all(proc.stdout) if d])
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def render_error(helm):
    """render_error(..., sets=...) -> helm's error text; fails the test if the values are accepted."""

    def _render_error(*values_files: str, sets: dict[str, str] | None = None, release: str = RELEASE) -> str:
        proc = helm_template(*values_args(values_files, sets), release=release)
        assert proc.returncode != 0, f"helm accepted {values_files} {sets}"
        return proc.stderr

    return _render_error


def values_files() -> list[str]:
    return sorted(p.name for p in VALUES_DIR.glob("*.yaml"))


def chart_values() -> dict:
    """charts/train/values.yaml: the defaults that a rendered object carries over (compare with these, not with
    the literals written there)."""
    return yaml.safe_load((CHART / "values.yaml").read_text())

