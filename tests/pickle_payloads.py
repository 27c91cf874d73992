"""Checkpoint files whose pickle runs code when loaded unsafely: loading them must be refused (in-process in
tests/unit/test_ckpt_safety.py, through the CLI in tests/integration/test_cli_errors.py)."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch


class MakesMarker:
    """Unpickling this calls open(marker, "w"): the file appears iff the pickle's code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunsShell:
    """Unpickling this calls os.system("true")."""

    def __reduce__(self):
        return (os.system, ("true",))


def evil_files(tmp_path: Path) -> dict[str, Path]:
    """A zip-format torch checkpoint and a plain pickle file, both holding a MakesMarker for tmp_path/PWNED."""
    marker = tmp_path / "PWNED"
    payload = {"state_dict": {"visual.cls_token": torch.zeros(4)}, "x": MakesMarker(str(marker))}
    buf = io.BytesIO()
    torch.save(payload, buf)  # zip-format torch checkpoint
    (tmp_path / "evil_zip.pt").write_bytes(buf.getvalue())
    (tmp_path / "evil_legacy.pth").write_bytes(pickle.dumps(payload, protocol=2))  # plain pickle file
    assert not marker.exists()  # nothing ran while building them
    return {"zip": tmp_path / "evil_zip.pt", "legacy": tmp_path / "evil_legacy.pth"}
