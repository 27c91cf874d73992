"""A data spec that names shards which are not there is one line and exit 2 before anything happens: from
`clipjob data inspect`, and from `clipjob train` (lone process and elastic agent) before the run directory is
written to. Was: training spent ~80 s on 10,000 failed reads, config.yaml and TensorBoard files were written,
and `data inspect` exited 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainrun import free_port, make_shards, train_argv


def clipjob(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipjob", *args], capture_output=True, text=True, timeout=120)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stdout + p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and p.stderr.rstrip().splitlines()[-1] == errors[0], p.stderr
    return errors[0]


def test_should_fail_inspect_with_one_line_when_a_named_shard_is_missing(tmp_path):
    d = make_shards(tmp_path / "ds", samples=16, per_shard=8)
    assert one_error_line(clipjob("data", "inspect", f"{d}/train-00001.tar")) == \
        f"error: {d}/train-00001.tar: shard not found; fix the URL or pattern"
    assert one_error_line(clipjob("data", "inspect", f"{d}/train-{{000000..000002}}.tar")) == \
        f"error: {d}/train-000002.tar: shard not found (1 of the 3 shards of {d}/train-{{000000..000002}}.tar " \
        "are missing); fix the URL or pattern"


@pytest.mark.parametrize("bad", ["key typo", "bucket typo", "malformed manifest", "agent, key typo"])
def test_should_fail_train_with_one_line_and_write_nothing_when_the_data_spec_is_bad(tmp_path, bad, request):
    d = make_shards(tmp_path / "ds", samples=16, per_shard=8)
    spec, want = f"{d}/train-00000.tar", f"error: {d}/train-00000.tar: shard not found; fix the URL or pattern"
    if bad == "bucket typo":
        request.getfixturevalue("s3_server")  # the endpoint, so the bucket lookup gets an answer
        spec = "s3://no-such-bucket-x3/ds/train-000000.tar"
        want = f"error: {spec}: bucket does not exist (check the URL and AWS_ENDPOINT_URL_S3)"
    elif bad == "malformed manifest":
        Path(d, "manifest.json").write_text('{"format": "clipjob-shards/1"}')
        spec, want = d, f"error: {d}/manifest.json: malformed manifest: 'shards' must be a list"
    extra = ["--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"] if "agent" in bad else []
    run = tmp_path / "run"
    p = subprocess.run([*train_argv(spec, str(run), "train.steps=2"), *extra], capture_output=True, text=True,
                       timeout=120)
    assert one_error_line(p) == want
    assert not run.exists()  # no config.yaml, no tb/, no metrics.jsonl
