"""Step-level atomic checkpoints on any fsspec URL.

Layout: `{run}/checkpoints/step-{N:08d}/` holding `model.safetensors` (weights, RangeAugment's included),
`ema.safetensors` (EMA weights, when enabled), `train_state.pt` (optimizer, scaler, loss parameters, counters,
data RNG; tensors and plain containers only), `config.yaml`, `meta.json`, and finally `COMMITTED`, written
last and only after every other file is listed in the folder. A step folder without COMMITTED does not exist
as far as readers are concerned, so a crash mid-save never hides or corrupts the previous checkpoint.
"Latest" is the newest committed step: no mutable pointer, which is safe on object stores. Loading never
unpickles arbitrary objects.

Test hook: CLIPJOB_TEST_CRASH_DURING_SAVE=K makes the K-th save of a process os._exit(1) right after
model.safetensors is written and before COMMITTED, on the first attempt only (a worker group restarted by the
elastic agent saves normally): fault-injection tests.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from typing import Any

import torch
from safetensors.torch import save as st_save

from clipjob import dist, fs
from clipjob.errors import ClipjobError

MARKER = "COMMITTED"
EMA_FILE = "ema.safetensors"
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


def _safetensors_bytes(state: dict[str, torch.Tensor], step: int) -> bytes:
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return st_save(weights, metadata={"step": str(step)})


_saves_in_process = 0


def _crash_hook() -> None:
    """Fault injection for tests: die mid-save (see the module doc)."""
    global _saves_in_process
    _saves_in_process += 1
    if os.environ.get("CLIPJOB_TEST_CRASH_DURING_SAVE") == str(_saves_in_process) and dist.restart_count() == 0:
        print(f"CLIPJOB_TEST_CRASH_DURING_SAVE: exiting during save {_saves_in_process}", flush=True)
        os._exit(1)


def save_checkpoint(run_dir: str, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
                    config_yaml: str, meta: dict[str, Any],
                    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None) -> str:
    """Write every file of step N, check they are all there, then write the commit marker. `extra_weights`
    maps file names (e.g. ema.safetensors) to further state dicts. Returns the step URL."""
    url = step_url(run_dir, step)
    files = ["model.safetensors"]
    fs.write_bytes(fs.join(url, "model.safetensors"), _safetensors_bytes(model_state, step))
    _crash_hook()
    for name, state in (extra_weights or {}).items():
        fs.write_bytes(fs.join(url, name), _safetensors_bytes(state, step))
        files.append(name)
    fs.write_bytes(fs.join(url, "train_state.pt"), _tensor_bytes(train_state))
    fs.write_text(fs.join(url, "config.yaml"), config_yaml)
    fs.write_text(fs.join(url, "meta.json"), json.dumps({**meta, "step": step, "saved_at": time.time()}, indent=1))
    files += ["train_state.pt", "config.yaml", "meta.json"]
    missing = sorted(set(files) - set(fs.ls(url)))
    if missing:  # e.g. the object store lost data mid-save: never commit an incomplete checkpoint
        raise ClipjobError(f"{url}: {', '.join(missing)} missing after writing them; checkpoint not committed "
                           f"(check the storage at {run_dir})")
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
    """Tensors-only loading (safetensors, or torch.load(weights_only=True)); one reader for every checkpoint."""
    from clipjob.model.convert import load_tensor_file

    return load_tensor_file(data, url)


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
    obj = safe_torch_load(fs.read_bytes(url), url)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClipjobError(f"{url}: expected a state dict of tensors")
    return obj


def ema_weights_url(step_dir: str) -> str:
    """The EMA weights file of a committed step folder (ClipjobError when there is none)."""
    u = fs.join(step_dir, EMA_FILE)
    if step_dir.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt")) or not fs.exists(u):
        raise ClipjobError(f"{step_dir}: no {EMA_FILE} (EMA weights exist only in step folders of runs trained "
                           f"with train.ema_momentum > 0)")
    return u


def load_ema(step_dir: str) -> dict[str, torch.Tensor] | None:
    """The EMA weights of a step folder, None when the run had no EMA."""
    u = fs.join(step_dir, EMA_FILE)
    return load_weights(u) if fs.exists(u) else None


def load_train_state(step_dir: str) -> dict[str, Any]:
    u = fs.join(step_dir, "train_state.pt")
    return safe_torch_load(fs.read_bytes(u), u)


def load_meta(step_dir: str) -> dict[str, Any]:
    return json.loads(fs.read_text(fs.join(step_dir, "meta.json")))


def load_config_yaml(step_dir: str) -> str | None:
    u = fs.join(step_dir, "config.yaml")
    return fs.read_text(u) if fs.exists(u) else None
