"""Shared fixtures: the loopback S3 server, small datasets."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# Processes the tests start import tests/hooks/sitecustomize.py: the fault-injection hooks (CLIPJOB_TEST_*).
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.join(os.path.dirname(__file__), "hooks"), *filter(None, [os.environ.get("PYTHONPATH")])])

from s3server import S3Server, apply_env  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the session; tests get their own bucket via `s3_bucket`."""
    server = S3Server().start()
    old = {k: os.environ.get(k) for k in server.env()}
    apply_env(server.env())
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket URL, e.g. s3://test-1a2b3c4d."""
    return s3_server.make_bucket(f"test-{uuid.uuid4().hex[:8]}")
