"""Shared fixtures: the loopback S3 server, small datasets, the tiny model."""

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


# The one tiny model of the tests: preset tiny-cpu-scratch shrunk to towers of width 32 and one layer, 16 px
# images in 2 x 2 patches of 8, 8 text tokens, 16-d embeddings (a forward pass in milliseconds). A test that
# needs another size or setting adds its overrides after these (the last --set wins); a `clipjob train` in a
# subprocess passes them as --set (tests/integration/trainrun.py).
TINY_MODEL = ["model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2", "model.vision.image_size=16",
              "model.vision.patch_size=8", "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
              "model.text.context_length=8", "model.embed_dim=16"]


def tiny_config(*overrides: str, preset: str = "tiny-cpu-scratch"):
    """The Config of `preset` with TINY_MODEL, then `overrides`."""
    from clipjob.config import build_config

    return build_config(preset, None, [*TINY_MODEL, *overrides])


@pytest.fixture
def tiny_cfg():
    """tiny_cfg("train.loss=siglip", ...) -> the tiny model's Config with these overrides (tiny_config)."""
    return tiny_config
