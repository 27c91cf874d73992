"""Loading never unpickles arbitrary objects: a checkpoint whose pickle would run code is refused with a
one-line message, and the code does not run (through the real CLI: tests/integration/test_cli_errors.py)."""

import warnings

import pytest
import torch
from safetensors.torch import save_file

from clipjob.checkpoint import load_any_weights
from clipjob.config import ModelConfig
from clipjob.errors import ClipjobError
from pickle_payloads import RunsShell, evil_files


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_should_refuse_a_pickle_that_would_run_code(tmp_path, kind):
    path = evil_files(tmp_path)[kind]
    with pytest.raises(ClipjobError) as e:
        load_any_weights(str(path), ModelConfig())
    msg = str(e.value)
    assert "\n" not in msg and "refusing to unpickle" in msg and str(path) in msg, msg
    assert "weights_only=False" not in msg  # never suggest the unsafe way out
    assert not (tmp_path / "PWNED").exists()


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


def test_should_name_the_blocked_call_when_a_pickle_references_os_system(tmp_path):
    """torch 2.6+ words a blocked global as "unsupported GLOBAL posix.system whose module posix is blocked"; the
    refusal names it."""
    torch_style = tmp_path / "shell.pt"
    torch.save({"w": RunsShell()}, torch_style)
    with pytest.raises(ClipjobError, match=r"refusing to unpickle: it references (posix|os)\.system") as e:
        load_any_weights(str(torch_style), ModelConfig())
    assert "\n" not in str(e.value)
