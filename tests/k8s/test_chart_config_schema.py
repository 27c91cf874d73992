"""charts/train's `config` schema is clipjob's config schema: misspelled or mistyped config keys fail at
`helm template` / `helm install`, naming the key, instead of at container start on every node.

`helm install --dry-run` needs an API server for discovery and its release lookup. None can run here, so
those tests point helm at a stand-in on loopback (below) that answers only those calls, with the shapes the
API returns; the values check that is tested runs in helm itself, before any object is sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from clipjob.chart_schema import chart_config_schema
from clipjob.config import Config, build_config, to_dict
from clipjob.presets import PRESETS

from .conftest import CHART, HELM, RELEASE, REPO

REGENERATE = "clipjob config schema --chart charts/train/values.schema.json"
MISSPELLED = [("config.train.precison", "bf16", "/config/train", "precison"),
              ("config.model.vision.widht", "768", "/config/model/vision", "widht")]


def cli_schema() -> dict:
    proc = subprocess.run([sys.executable, "-m", "clipjob", "config", "schema"], capture_output=True, text=True,
                          check=True, timeout=60)
    return json.loads(proc.stdout)


def test_should_equal_clipjob_config_schema_output_when_reading_the_checked_in_config_subtree():
    checked_in = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]
    assert checked_in == chart_config_schema(cli_schema()), f"charts/train/values.schema.json's config is stale: run `{REGENERATE}`"


def test_should_type_document_and_default_every_config_key_when_clipjob_prints_the_schema():
    schema = cli_schema()
    defaults = to_dict(Config())

    def walk(sch: dict, dflt: dict, path: str) -> None:
        assert sch["additionalProperties"] is False, path
        assert set(sch["properties"]) == set(dflt), path
        for key, sub in sch["properties"].items():
            assert sub["description"], f"{path}{key} has no description"
            if sub.get("type") == "object":
                walk(sub, dflt[key], f"{path}{key}.")
            else:
                assert "type" in sub and sub["default"] == dflt[key], f"{path}{key}: {sub}"

    walk(schema, defaults, "")
    train = schema["properties"]["train"]["properties"]
    from typing import get_args, get_type_hints

    from clipjob.config import TrainConfig

    assert train["precision"]["enum"] == list(get_args(get_type_hints(TrainConfig)["precision"]))  # the Literal's
    assert train["betas"]["items"] == [{"type": "number"}, {"type": "number"}] and train["betas"]["maxItems"] == 2
    assert schema["properties"]["data"]["properties"]["multiscale_sizes"]["items"] == {"type": "integer"}


def test_should_rewrite_only_the_config_subtree_when_regenerating_the_chart_schema(tmp_path):
    """A stale subtree is replaced; every byte outside it stays as written (other parts are hand-laid-out)."""
    original = (CHART / "values.schema.json").read_text()
    doc = json.loads(original)
    doc["properties"]["config"] = {"type": "object"}
    stale = tmp_path / "values.schema.json"
    stale.write_text(json.dumps(doc, indent=1))  # another layout, a stale config
    proc = subprocess.run([sys.executable, "-m", "clipjob", "config", "schema", "--chart", str(stale)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = stale.read_text()
    fresh = json.loads(text)
    assert fresh["properties"]["config"] == chart_config_schema(cli_schema())
    fresh["properties"]["config"] = {"type": "object"}
    assert fresh == doc
    start = text.index('"config": ')
    assert text[:start] == json.dumps(doc, indent=1)[:start]  # the bytes before it, untouched


def test_should_say_which_file_when_the_chart_schema_to_rewrite_is_not_json(tmp_path):
    bad = tmp_path / "values.schema.json"
    bad.write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "clipjob", "config", "schema", "--chart", str(bad)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 2 and str(bad) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("key,value,where,name", MISSPELLED, ids=[m[3] for m in MISSPELLED])
def test_should_fail_helm_template_naming_the_key_when_a_config_key_is_misspelled(render_error, key, value, where, name):
    err = render_error(sets={key: value})
    assert f"at '{where}': additional properties '{name}' not allowed" in err, err


@pytest.mark.parametrize("sets,where", [
    ({"config.model.vision.width": "wide"}, "/config/model/vision/width"),
    ({"config.data.multiscale": "yes"}, "/config/data/multiscale"),
    ({"config.eval.worker_nice": "20"}, "/config/eval/worker_nice"),
    ({"config.model.text.kind": "bert"}, "/config/model/text/kind"),
], ids=["string-for-int", "string-for-bool", "above-maximum", "not-a-choice"])
def test_should_fail_helm_template_naming_the_key_when_a_config_value_has_the_wrong_type(render_error, sets, where):
    err = render_error(sets=sets)
    assert f"at '{where}'" in err, err


@pytest.mark.parametrize("preset", [None, *PRESETS], ids=lambda p: p or "defaults")
def test_should_accept_every_key_clipjob_accepts_when_config_is_a_whole_preset(render, tmp_path, preset):
    """The schema is not stricter than clipjob: a preset's full resolved config (every key) renders, and the
    ConfigMap holds the same config."""
    cfg = build_config(preset)
    values = to_dict(cfg)
    values["storage"].pop("run_dir")
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump({"config": values}))
    rendered = tmp_path / "config.yaml"
    rendered.write_text(render(str(values_file)).one("ConfigMap")["data"]["config.yaml"])
    assert build_config(None, str(rendered)) == cfg


class _StandInApiServer(BaseHTTPRequestHandler):
    """Answers helm's discovery (/version, /api, /apis), its release lookup (an empty Secret list) and its
    existence checks (404) the way the API server does; knows the kinds the default chart renders."""

    RESOURCES: typing.ClassVar = {"/api/v1": ("v1", [("configmaps", "ConfigMap"), ("serviceaccounts", "ServiceAccount"),
                                    ("secrets", "Secret")]),
                 "/apis/kubeflow.org/v1": ("kubeflow.org/v1", [("pytorchjobs", "PyTorchJob")])}

    def do_GET(self):
        path = self.path.split("?")[0]
        body, code = self.answer(path), 200
        if body is None and "labelSelector=" in self.path:
            body = {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": []}
        elif body is None:
            body, code = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                          "code": 404}, 404
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def answer(self, path: str) -> dict | None:
        if path == "/version":
            return {"major": "1", "minor": "34", "gitVersion": "v1.34.0"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            gv = {"groupVersion": "kubeflow.org/v1", "version": "v1"}
            return {"kind": "APIGroupList", "apiVersion": "v1",
                    "groups": [{"name": "kubeflow.org", "versions": [gv], "preferredVersion": gv}]}
        if path in self.RESOURCES:
            group_version, kinds = self.RESOURCES[path]
            return {"kind": "APIResourceList", "groupVersion": group_version, "resources": [
                {"name": plural, "singularName": kind.lower(), "namespaced": True, "kind": kind,
                 "verbs": ["get", "list", "create"]} for plural, kind in kinds]}
        return None

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def helm_install(helm, tmp_path_factory):
    """helm_install(*args) -> CompletedProcess of `helm install --dry-run=client` against the stand-in."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandInApiServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path_factory.mktemp("helm")
    kubeconfig = home / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in", "users": [],
        "clusters": [{"name": "stand-in", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "namespace": "default"}}]}))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "KUBECONFIG": str(kubeconfig),
           **{f"HELM_{d}_HOME": str(home / d.lower()) for d in ("CACHE", "CONFIG", "DATA")}}

    def _install(*args: str) -> subprocess.CompletedProcess:
        # OpenAPI validation of the objects is the CRD tests' job (the stand-in serves no OpenAPI document).
        return subprocess.run([str(HELM), "install", RELEASE, str(CHART), "--dry-run=client",
                               "--disable-openapi-validation", *args], capture_output=True, text=True,
                              check=False, timeout=60, env=env, cwd=REPO)

    yield _install
    server.shutdown()


def test_should_install_with_dry_run_when_config_keys_are_right(helm_install):
    proc = helm_install("--set", "config.train.precision=bf16")
    assert proc.returncode == 0, proc.stderr
    assert "kind: PyTorchJob" in proc.stdout and "precision: bf16" in proc.stdout


@pytest.mark.parametrize("key,value,where,name", MISSPELLED, ids=[m[3] for m in MISSPELLED])
def test_should_fail_helm_install_dry_run_naming_the_key_when_a_config_key_is_misspelled(helm_install, key, value,
                                                                                         where, name):
    proc = helm_install("--set", f"{key}={value}")
    assert proc.returncode != 0
    assert "INSTALLATION FAILED" in proc.stderr and f"additional properties '{name}' not allowed" in proc.stderr, proc.stderr
