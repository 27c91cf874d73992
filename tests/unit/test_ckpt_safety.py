"""Loading never unpickles arbitrary objects: a checkpoint whose pickle would run code is refused with a
one-line message, and the code does not run (in-process and through the real CLI)."""

import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipjob.config import ModelConfig
from clipjob.errors import ClipjobError
from clipjob.checkpoint import load_any_weights

REPO = Path(__file__).resolve().parents[2]


class MakesMarker:
    """Unpickling this calls open(marker, "w"): the file appears iff the pickle's code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_files(tmp_path: Path) -> dict[str, Path]:
    marker = str(tmp_path / "PWNED")
    payload = {"state_dict": {"visual.cls_token": torch.zeros(4)}, "x": MakesMarker(marker)}
    buf = io.BytesIO()
    torch.save(payload, buf)  # zip-format torch checkpoint
    (tmp_path / "evil_zip.pt").write_bytes(buf.getvalue())
    (tmp_path / "evil_legacy.pth").write_bytes(pickle.dumps(payload, protocol=2))  # plain pickle file
    with pytest.raises(FileNotFoundError):
        Path(marker).stat()  # nothing ran while building them
    return {"zip": tmp_path / "evil_zip.pt", "legacy": tmp_path / "evil_legacy.pth"}


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_should_refuse_a_pickle_that_would_run_code(tmp_path, kind):
    path = evil_files(tmp_path)[kind]
    with pytest.raises(ClipjobError) as e:
        load_any_weights(str(path), ModelConfig())
    msg = str(e.value)
    assert "\n" not in msg and "refusing to unpickle" in msg and str(path) in msg, msg
    assert "weights_only=False" not in msg  # never suggest the unsafe way out
    assert not (tmp_path / "PWNED").exists()


def test_should_refuse_through_the_cli_with_one_line_and_exit_code_2(tmp_path):
    path = evil_files(tmp_path)["zip"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["ckpt", "convert", str(path), str(tmp_path / "out")],
                 ["eval", "zeroshot", "--checkpoint", str(path), "--preset", "tiny-cpu-scratch", "--data", "folder:/nope"]):
        r = subprocess.run([sys.executable, "-m", "clipjob", *args], capture_output=True, text=True, env=env, timeout=300)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert "refusing to unpickle: it references" in lines[0] and "open" in lines[0], lines
        assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "out").exists()


def test_should_refuse_torchscript_archives(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(torch.nn.Linear(2, 2))
        torch.jit.save(scripted, str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(ClipjobError, match="TorchScript archive .*open_clip_model.safetensors") as e:
        load_any_weights(str(tmp_path / "ViT-B-32.pt"), ModelConfig())
    assert "\n" not in str(e.value)


def test_should_explain_corrupt_and_non_tensor_files_in_one_line(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04garbage")
    torch.save({"step": 3, "note": "no tensors"}, tmp_path / "plain.pt")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    for name, pattern in [("broken.safetensors", "corrupt safetensors"), ("truncated.pt", "not a readable checkpoint"),
                          ("plain.pt", "expected a state dict of tensors"), ("other.safetensors", "unrecognised checkpoint layout"),
                          ("missing.pt", "not found")]:
        with pytest.raises(ClipjobError, match=pattern) as e:
            load_any_weights(str(tmp_path / name), ModelConfig())
        assert "\n" not in str(e.value), name


class RunsShell:
    def __reduce__(self):
        return (os.system, ("true",))


def test_should_name_the_blocked_call_and_print_nothing_else_for_a_raw_pickle(tmp_path):
    """torch 2.6+ words a blocked global as "unsupported GLOBAL posix.system whose module posix is blocked"; the
    refusal names it. A raw pickle (protocol 4) made torch warn on stderr before the one line: not any more."""
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"w": RunsShell()}, protocol=4))
    torch_style = tmp_path / "shell.pt"
    torch.save({"w": RunsShell()}, torch_style)
    with pytest.raises(ClipjobError, match=r"refusing to unpickle: it references (posix|os)\.system") as e:
        load_any_weights(str(torch_style), ModelConfig())
    assert "\n" not in str(e.value)
    r = subprocess.run([sys.executable, "-m", "clipjob", "ckpt", "convert", str(path), str(tmp_path / "out")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "refusing to unpickle" in lines[0], r.stderr
