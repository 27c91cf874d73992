"""Step-level atomic checkpoints on any fsspec URL.

Layout: `{run}/checkpoints/step-{N:08d}/` holding `model.safetensors` (weights), `train_state.pt` (optimizer,
scaler, EMA, RNG, counters; tensors and plain containers only), `config.yaml`, `meta.json`, and finally
`COMMITTED`, written last. A step folder without COMMITTED does not exist as far as readers are concerned,
so a crash mid-save never hides or corrupts the previous checkpoint. "Latest" is the newest committed step:
no mutable pointer, which is safe on object stores. Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import time
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from clipjob import fs
from clipjob.errors import ClipjobError

MARKER = "COMMITTED"
STEP_RE = re.compile(r"^step-(\d{8})$")


def checkpoints_url(run_dir: str) -> str:
    return fs.join(run_dir, "checkpoints")


def step_url(run_dir: str, step: int) -> str:
    return fs.join(checkpoints_url(run_dir), f"step-{step:08d}")


def _steps_present(run_dir: str) -> list[int]:
    return sorted(int(m.group(1)) for n in fs.ls(checkpoints_url(run_dir)) if (m := STEP_RE.match(n)))


def committed_steps(run_dir: str) -> list[int]:
    return [s for s in _steps_present(run_dir) if fs.exists(fs.join(step_url(run_dir, s), MARKER))]


def latest_checkpoint(run_dir: str) -> str | None:
    steps = committed_steps(run_dir)
    return step_url(run_dir, steps[-1]) if steps else None


def _tensor_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(run_dir: str, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
                    config_yaml: str, meta: dict[str, Any]) -> str:
    """Write every file of step N, then the commit marker. Returns the step URL."""
    url = step_url(run_dir, step)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    fs.write_bytes(fs.join(url, "model.safetensors"), st_save(weights, metadata={"step": str(step)}))
    fs.write_bytes(fs.join(url, "train_state.pt"), _tensor_bytes(train_state))
    fs.write_text(fs.join(url, "config.yaml"), config_yaml)
    fs.write_text(fs.join(url, "meta.json"), json.dumps({**meta, "step": step, "saved_at": time.time()}, indent=1))
    fs.write_text(fs.join(url, MARKER), f"{step}\n")
    return url


def prune_checkpoints(run_dir: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` committed steps, and uncommitted leftovers older than the newest
    committed one (crashed saves). Only rank 0 calls this, after its own save committed."""
    committed = committed_steps(run_dir)
    doomed = committed[:-keep] if keep > 0 else []
    newest = committed[-1] if committed else -1
    doomed += [s for s in _steps_present(run_dir) if s < newest and s not in committed]
    for s in sorted(set(doomed)):
        marker = fs.join(step_url(run_dir, s), MARKER)
        if fs.exists(marker):
            fs.rm(marker)  # un-commit first so a half-deleted folder is never taken for a checkpoint
        fs.rm(step_url(run_dir, s))
    return sorted(set(doomed))


def safe_torch_load(data: bytes, url: str) -> Any:
    """torch.load restricted to tensors and plain containers: a pickle that would run code is refused."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ClipjobError(f"{url}: refusing to load: the file contains objects that are not plain tensors or "
                           f"containers (possibly code). {first[:160]}") from None
    except Exception as e:  # noqa: BLE001 - corrupt/truncated file
        raise ClipjobError(f"{url}: not a readable checkpoint ({type(e).__name__}: {str(e)[:160]})") from None


def resolve_checkpoint(url: str) -> str:
    """A run directory -> its newest committed step; a step folder -> itself (if committed); a file -> itself."""
    if url.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt")):
        if not fs.exists(url):
            raise ClipjobError(f"{url}: checkpoint file not found")
        return url
    if fs.exists(fs.join(url, "model.safetensors")):
        if not fs.exists(fs.join(url, MARKER)):
            raise ClipjobError(f"{url}: checkpoint is not committed (an interrupted save); use an earlier step")
        return url
    latest = latest_checkpoint(url)
    if latest is None:
        raise ClipjobError(f"{url}: no committed checkpoint found (expected a run dir, a step-N folder or a file)")
    return latest


def load_weights(url: str) -> dict[str, torch.Tensor]:
    """Weights of a committed step folder or a single file (safetensors, or a tensors-only torch pickle)."""
    if not url.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt")):
        url = fs.join(url, "model.safetensors")
    data = fs.read_bytes(url)
    if url.endswith(".safetensors"):
        try:
            return st_load(data)
        except Exception as e:  # noqa: BLE001
            raise ClipjobError(f"{url}: corrupt safetensors file ({str(e)[:160]})") from None
    obj = safe_torch_load(data, url)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClipjobError(f"{url}: expected a state dict of tensors")
    return obj


def load_train_state(step_dir: str) -> dict[str, Any]:
    u = fs.join(step_dir, "train_state.pt")
    return safe_torch_load(fs.read_bytes(u), u)


def load_meta(step_dir: str) -> dict[str, Any]:
    return json.loads(fs.read_text(fs.join(step_dir, "meta.json")))


def load_config_yaml(step_dir: str) -> str | None:
    u = fs.join(step_dir, "config.yaml")
    return fs.read_text(u) if fs.exists(u) else None
