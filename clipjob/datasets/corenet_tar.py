"""Reading CoreNet's image-text tar dataset (img_text_tar_dataset.py) safely, to convert it to webdataset.

Layout: `metadata.pkl` (a pickled dict: total_tar_files, max_files_per_tar, tar_file_names) next to shards
`{k}.tar.gz`; shard k holds `{k}/{global_idx}.pkl`, each a pickled {"image": base64 JPEG, "text": str} (or
"texts": [str, ...]).

Pickles run code on load when they are allowed to name functions. These are read with an unpickler that
refuses every global (no function, no class can be named), so only the opcodes for plain values remain;
the result is then checked to be made of dict/list/str/bytes/int only.
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

from clipjob import fs
from clipjob.errors import ClipjobError

PLAIN_TYPES = (dict, list, str, bytes, int)


class UnsafePickle(Exception):
    """A pickle that names a global or holds something other than plain values."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Protocols 0-2 write bytes as _codecs.encode(text, 'latin1'); this is the only callable admitted."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickle("_codecs.encode with other than (str, 'latin1')")
    return text.encode("latin1")


class PlainUnpickler(pickle.Unpickler):
    """Admits only the opcodes for plain values: any attempt to name a global is refused before it
    resolves, so no constructor, function or reducer can ever be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise UnsafePickle(f"refers to {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("uses a persistent id")


def _check_plain(obj: Any, depth: int = 0) -> None:
    if depth > 32:
        raise UnsafePickle("nests deeper than 32 levels")
    if not isinstance(obj, PLAIN_TYPES):
        raise UnsafePickle(f"holds a {type(obj).__name__}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_plain(v, depth + 1)


def plain_unpickle(data: bytes) -> Any:
    """Unpickle data made only of dict/list/str/bytes/int; raises UnsafePickle otherwise."""
    try:
        obj = PlainUnpickler(io.BytesIO(data)).load()
    except UnsafePickle:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or malformed pickle
        raise UnsafePickle(f"is not a valid pickle ({type(e).__name__})") from None
    _check_plain(obj)
    return obj


def read_metadata(root: str) -> dict:
    """metadata.pkl of a CoreNet tar dataset, validated."""
    url = fs.join(root, "metadata.pkl")
    if not fs.exists(url):
        raise ClipjobError(f"{url}: no metadata.pkl (not a CoreNet image-text tar dataset)")
    try:
        meta = plain_unpickle(fs.read_bytes(url))
    except UnsafePickle as e:
        raise ClipjobError(f"{url}: refused: the pickle {e}; only plain dict/list/str/bytes/int are loaded") from None
    names = meta.get("tar_file_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)
            and isinstance(meta.get("max_files_per_tar"), int) and meta["max_files_per_tar"] > 0):
        raise ClipjobError(f"{url}: expected a dict with tar_file_names (list of str) and max_files_per_tar (int > 0)")
    return meta


def tar_index(name: str) -> int:
    """`12.tar.gz` -> 12 (the shard number k: it holds global indices k*max_files_per_tar ...)."""
    stem = posixpath.basename(name).split(".", 1)[0]
    if not stem.isdigit():
        raise ClipjobError(f"{name}: CoreNet tar names are '{{k}}.tar.gz' with an integer k")
    return int(stem)


def sample_fields(obj: Any) -> tuple[bytes, list[str]]:
    """A CoreNet sample dict -> (image bytes, captions); UnsafePickle for a malformed one."""
    if not isinstance(obj, dict) or "image" not in obj:
        raise UnsafePickle("is not a {'image': ..., 'text': ...} sample")
    img = obj["image"]
    try:
        data = base64.b64decode(img, validate=False) if isinstance(img, (str, bytes)) else None
    except (binascii.Error, ValueError):
        data = None
    if not data:
        raise UnsafePickle("has no base64 image")
    texts = obj.get("texts", obj.get("text"))
    captions = [texts] if isinstance(texts, str) else [t for t in texts if isinstance(t, str)] \
        if isinstance(texts, list) else []
    return data, captions


def iter_tar_samples(url: str) -> Iterator[tuple[int, Any]]:
    """(global index, unpickled sample or the UnsafePickle it raised) for each `.pkl` member of one
    `{k}.tar.gz`, streamed. A truncated tar ends the iteration with a tarfile.ReadError."""
    with fs.open_url(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if not info.isreg() or not info.name.endswith(".pkl"):
                continue
            stem = posixpath.basename(info.name)[: -len(".pkl")]
            if not stem.isdigit():
                continue
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            try:
                yield int(stem), plain_unpickle(data)
            except UnsafePickle as e:
                yield int(stem), e
