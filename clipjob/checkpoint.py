"""Every read and write of weights and of the step-folder format, on any fsspec URL (the one module that does
checkpoint I/O; `model/convert.py` maps keys and infers architectures without touching files).

Layout: `{run}/checkpoints/step-{N:08d}/` holding `model.safetensors` (weights, RangeAugment's included),
`ema.safetensors` (EMA weights, when enabled), `train_state.pt` (optimizer, scaler, loss parameters, counters,
data RNG; tensors and plain containers only), `config.yaml`, `meta.json` (which records each file's size and
CRC-32), and finally `COMMITTED`, written last and only after every other file is listed in the folder. A step
folder without COMMITTED does not exist as far as readers are concerned, so a crash mid-save never hides or
corrupts the previous checkpoint; saving a step again first un-commits and clears its folder (the leftovers of
an interrupted save of that step). Loading never unpickles arbitrary objects.

"Committed" is a listing (cheap); "loads" is checked when a file is read: its size and CRC-32 must match
meta.json (zlib.crc32 ran at 1.5-5 GB/s here: 0.4-1.6 s per 2.2 GiB, once when saving and once when
loading, on bytes that are in memory anyway), then the format must parse. Every
reader of a run dir takes the newest committed step that loads (`load_newest`: an unloadable one is skipped
with a one-line warning naming it; a storage outage is not taken for corruption). Pruning counts only steps
up to the one just saved, so a stale unloadable step beyond the step training resumed from never displaces
the fresh ones; training rewrites it when it gets there.

Foreign weights (CoreNet .pt, OpenCLIP/OpenAI .safetensors or .pt) are read as safetensors or with
`torch.load(weights_only=True)`: nothing arbitrary is unpickled, and a pickle that would run code (or a
TorchScript archive) is refused with a one-line error. `write_step_folder` is the one writer of step folders
(training saves and `ckpt convert`); `load_meta` the one reader of meta.json.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import re
import sys
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from clipjob import fs
from clipjob.errors import ClipjobError, RetryableError

T = TypeVar("T")
MARKER = "COMMITTED"
EMA_FILE = "ema.safetensors"
STEP_RE = re.compile(r"^step-(\d{8})$")
FILE_EXTS = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")  # a single weights file, not a folder


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


def file_record(data: bytes) -> dict[str, Any]:
    """What meta.json records of each file of a step: its size and CRC-32 (verified whenever it is read)."""
    return {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}


def _clear_step(url: str) -> None:
    """Un-commit, then delete, whatever a step folder holds (an interrupted save of the same step, or a stale
    one that does not load): the marker goes first, so no reader takes the folder for a checkpoint meanwhile."""
    names = fs.ls(url)
    if not names:
        return
    if MARKER in names:
        fs.rm(fs.join(url, MARKER))
    fs.rm(url)


def write_step_folder(url: str, files: dict[str, bytes | Callable[[], bytes]], meta: dict[str, Any],
                      marker: str) -> None:
    """The one writer of step folders: clear the folder, write `files` in order, record their sizes and CRC-32s
    in meta.json, check they are all listed, then write the commit marker (holding `marker`). A file given as
    a function is serialised just before it is written, so only one file's bytes are in memory at a time."""
    _clear_step(url)
    written: dict[str, dict[str, Any]] = {}
    for name, data in files.items():
        data = data() if callable(data) else data
        fs.write_bytes(fs.join(url, name), data)
        written[name] = file_record(data)
        del data
    fs.write_text(fs.join(url, "meta.json"), json.dumps({**meta, "files": written}, indent=1))
    missing = sorted({*written, "meta.json"} - set(fs.ls(url)))
    if missing:  # e.g. the object store lost data mid-save: never commit an incomplete checkpoint
        raise ClipjobError(f"{url}: {', '.join(missing)} missing after writing them; checkpoint not committed "
                           f"(check the storage at {url})")
    fs.write_text(fs.join(url, MARKER), marker)


_last_saved: dict[str, int] = {}  # run dir -> the step this process committed last (prune's default bound)


def save_checkpoint(run_dir: str, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
                    config_yaml: str, meta: dict[str, Any],
                    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None) -> str:
    """Write and commit step N of a run: model.safetensors, `extra_weights` (file name -> state dict, e.g.
    ema.safetensors), train_state.pt, config.yaml, each serialised just before it is written. Returns the step
    URL. Runs on the training thread or on the background writer's (train/saver.py): file I/O only."""
    url = step_url(run_dir, step)
    weights = {"model.safetensors": model_state, **(extra_weights or {})}
    files: dict[str, bytes | Callable[[], bytes]] = {
        name: functools.partial(_safetensors_bytes, state, step) for name, state in weights.items()}
    files["train_state.pt"] = functools.partial(_tensor_bytes, train_state)
    files["config.yaml"] = config_yaml.encode("utf-8")
    write_step_folder(url, files, {**meta, "step": step, "saved_at": time.time()}, f"{step}\n")
    _last_saved[run_dir] = step
    return url


def write_converted(dst: str, sd: dict[str, torch.Tensor], config_yaml: str, meta: dict[str, Any]) -> None:
    """Converted weights: a `.safetensors` file (config, source and layout in its metadata) or a committed step
    folder (model.safetensors + config.yaml), usable anywhere a checkpoint is."""
    if dst.endswith(".safetensors"):
        fs.write_bytes(dst, st_save(sd, metadata={"clipjob_config": config_yaml, "source": meta["source"],
                                                  "layout": meta["layout"]}))
        return
    files = {"model.safetensors": st_save(sd, metadata={"source": meta["source"]}),
             "config.yaml": config_yaml.encode("utf-8")}
    write_step_folder(dst, files, meta, "converted\n")


def prune_checkpoints(run_dir: str, keep: int, upto: int | None = None) -> list[int]:
    """Delete all but the newest `keep` committed steps up to `upto` (default: the step this process committed
    last, else the newest committed), and uncommitted leftovers older than it (crashed saves). Committed steps
    beyond `upto` are stale ones of an earlier attempt, past the step training resumed from (they did not
    load): they are neither counted nor deleted; readers skip them and training rewrites each when it gets
    there. Only rank 0 calls this, after its own save committed."""
    committed = committed_steps(run_dir)
    if upto is None:
        upto = _last_saved.get(run_dir, committed[-1] if committed else -1)
    current = [s for s in committed if s <= upto]
    doomed = current[:-keep] if keep > 0 else []
    doomed += [s for s in _steps_present(run_dir) if s < upto and s not in committed]
    for s in sorted(set(doomed)):
        _clear_step(step_url(run_dir, s))  # un-commits first: a half-deleted folder is never taken for a checkpoint
    return sorted(set(doomed))


def _refusal(e: Exception) -> str:
    # torch <= 2.5: "GLOBAL os.system was not an allowed global"; torch 2.6+: "Trying to load unsupported GLOBAL
    # posix.system whose module posix is blocked"
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    what = f"it references {m[1]}" if m else "it holds objects other than tensors and plain containers"
    return f"refusing to unpickle: {what}, which could run code; clipjob loads only tensors (safetensors, " \
           f"or torch.load with weights_only=True)"


def load_tensor_file(data: bytes, url: str) -> object:
    """Safetensors bytes, or a torch pickle restricted to tensors and plain containers."""
    if url.endswith(".safetensors"):
        try:
            return st_load(data)
        except Exception as e:  # noqa: BLE001
            raise ClipjobError(f"{url}: corrupt safetensors file ({str(e).splitlines()[0][:160]})") from None
    if data[:4] == b"PK\x03\x04":
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile:
            raise ClipjobError(f"{url}: not a readable checkpoint (a truncated or corrupt zip file)") from None
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            raise ClipjobError(f"{url}: a TorchScript archive (e.g. OpenAI's original ViT-B-32.pt); clipjob does "
                               "not load TorchScript: use the OpenCLIP state dict of the same weights "
                               "(open_clip_model.safetensors) instead")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the one-line outcome says enough
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ClipjobError(f"{url}: {_refusal(e)}") from None
    except Exception as e:  # noqa: BLE001 - corrupt/truncated file
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise ClipjobError(f"{url}: not a readable checkpoint ({type(e).__name__}: {first})") from None


def is_run_dir(url: str) -> bool:
    """A run directory (its checkpoints/ hold step folders), as opposed to one step folder or a weights file."""
    if url.endswith(FILE_EXTS) or STEP_RE.match(url.rstrip("/").rsplit("/", 1)[-1]):
        return False
    return not fs.exists(fs.join(url, "model.safetensors"))


def resolve_checkpoint(url: str) -> str:
    """A run directory -> its newest committed step (not checked to load: readers use `load_newest`); a step
    folder -> itself (if committed); a file -> itself."""
    if url.endswith(FILE_EXTS):
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


def load_newest(run_dir: str, load: Callable[[str], T], warn: bool = True) -> tuple[str, T]:
    """(step URL, load(step URL)) of the newest committed step of a run that loads. A step whose load raises a
    ClipjobError (corrupt, truncated, does not fit) is skipped with a one-line warning on stderr naming it (unless
    not `warn`: the trainer's ranks but the first); a RetryableError (storage outage) propagates: an unreachable
    checkpoint is not a corrupt one."""
    steps = committed_steps(run_dir)
    for step in reversed(steps):
        url = step_url(run_dir, step)
        try:
            return url, load(url)
        except RetryableError:
            raise
        except ClipjobError as e:
            if warn:
                print(f"warning: skipping checkpoint step {step}, it does not load: {e}", file=sys.stderr,
                      flush=True)
    if steps:
        raise ClipjobError(f"{run_dir}: none of the committed checkpoints (steps {', '.join(map(str, steps))}) "
                           f"loads (see the warnings above)")
    raise ClipjobError(f"{run_dir}: no committed checkpoint found (expected a run dir, a step-N folder or a file)")


def _recorded(folder: str) -> dict[str, Any]:
    """The per-file records in a folder's meta.json ({} without one, or for steps saved before they existed)."""
    if not fs.exists(fs.join(folder, "meta.json")):
        return {}
    files = load_meta(folder).get("files")
    return files if isinstance(files, dict) else {}


def read_checkpoint_file(url: str) -> bytes:
    """A file's bytes, verified against the size and CRC-32 its folder's meta.json recorded at save time."""
    data = fs.read_bytes(url)
    folder, name = url.rstrip("/").rsplit("/", 1) if "/" in url else (".", url)
    rec = _recorded(folder).get(name)
    if rec:
        if len(data) != rec["bytes"]:
            raise ClipjobError(f"{url}: {len(data)} bytes, but {rec['bytes']} were written at save time "
                               f"(truncated or overwritten after the commit)")
        crc = f"{zlib.crc32(data):08x}"
        if crc != rec["crc32"]:
            raise ClipjobError(f"{url}: crc32 {crc} differs from the {rec['crc32']} recorded at save time "
                               f"(corrupted after the commit)")
    return data


def load_weights(url: str) -> dict[str, torch.Tensor]:
    """The raw state dict of a committed step folder or a single weights file (safetensors, or a tensors-only
    torch pickle; other frameworks' training checkpoints are unwrapped from their state_dict/model key)."""
    if not url.endswith(FILE_EXTS):
        url = fs.join(url, "model.safetensors")
    obj = load_tensor_file(read_checkpoint_file(url), url)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClipjobError(f"{url}: expected a state dict of tensors")
    return obj


def read_state_dict(url: str) -> tuple[dict[str, torch.Tensor], str]:
    """(raw state dict, resolved URL) of a run dir (its newest committed step that loads), step folder or
    weights file."""
    if is_run_dir(url):
        resolved, sd = load_newest(url, load_weights)
        return sd, resolved
    resolved = resolve_checkpoint(url)
    return load_weights(resolved), resolved


def load_any_weights(url: str, model_cfg, layout: str = "auto") -> dict[str, torch.Tensor]:
    """clipjob run dirs, step folders and files, CoreNet and OpenCLIP/OpenAI state dicts, from any fsspec
    URL -> a state dict that `CLIP(model_cfg).load_state_dict` accepts strictly."""
    from clipjob.model.convert import fit_to_config, to_clipjob

    raw, resolved = read_state_dict(url)
    try:
        sd = to_clipjob(raw, layout)
    except ClipjobError as e:
        raise ClipjobError(f"{resolved}: {e}") from None
    return fit_to_config(sd, model_cfg, resolved, hint=", or convert with `clipjob ckpt convert` to keep its config")


def ema_weights_url(step_dir: str) -> str:
    """The EMA weights file of a committed step folder (ClipjobError when there is none)."""
    u = fs.join(step_dir, EMA_FILE)
    if step_dir.endswith(FILE_EXTS) or not fs.exists(u):
        raise ClipjobError(f"{step_dir}: no {EMA_FILE} (EMA weights exist only in step folders of runs trained "
                           f"with train.ema_momentum > 0)")
    return u


def load_ema(step_dir: str) -> dict[str, torch.Tensor] | None:
    """The EMA weights of a step folder, None when the run had no EMA."""
    u = fs.join(step_dir, EMA_FILE)
    return load_weights(u) if fs.exists(u) else None


def load_train_state(step_dir: str) -> dict[str, Any]:
    u = fs.join(step_dir, "train_state.pt")
    return load_tensor_file(read_checkpoint_file(u), u)


def load_meta(step_dir: str) -> dict[str, Any]:
    """A step folder's meta.json (the one reader of it)."""
    u = fs.join(step_dir, "meta.json")
    try:
        meta = json.loads(fs.read_text(u))
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise ClipjobError(f"{u}: not a JSON object (corrupt); the checkpoint does not load")
    return meta


def safetensors_metadata(url: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, reading only its header."""
    import struct

    with fs.open_url(url, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise ClipjobError(f"{url}: corrupt safetensors header")
        return json.loads(f.read(n)).get("__metadata__") or {}


def stored_config_yaml(resolved: str) -> str | None:
    """The clipjob config saved with a checkpoint: a step folder's config.yaml or a converted .safetensors
    file's metadata; None for foreign weights."""
    if resolved.endswith(".safetensors"):
        return safetensors_metadata(resolved).get("clipjob_config")
    if resolved.endswith(FILE_EXTS):
        return None
    return load_config_yaml(resolved)


def stored_step(resolved: str) -> int | None:
    """The training step a checkpoint was saved at (None for converted or foreign weights)."""
    if resolved.endswith(".safetensors"):
        step = safetensors_metadata(resolved).get("step")
    elif not resolved.endswith(FILE_EXTS) and fs.exists(fs.join(resolved, "meta.json")):
        step = load_meta(resolved).get("step")
    else:
        step = None
    return None if step is None else int(step)


def load_config_yaml(step_dir: str) -> str | None:
    u = fs.join(step_dir, "config.yaml")
    return read_checkpoint_file(u).decode("utf-8") if fs.exists(u) else None
