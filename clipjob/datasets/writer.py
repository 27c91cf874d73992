"""Writing webdataset tar shards (+ manifest.json) to any fsspec URL directory.

    with ShardWriter("s3://bucket/ds", prefix="train", max_samples=10000) as w:
        w.write("000001", {"png": png_bytes, "txt": "a red apple", "json": {"concept": "red apple"}})

Shards are `{prefix}-{i:06d}.tar`; one sample = tar members `{key}.{ext}`. Tar headers are deterministic
(mtime 0, uid/gid 0, no owner names, mode 0o444), so identical input gives identical bytes: exactly what
`tarfile` (PAX format) writes, produced directly so that a shard's final size is known before each sample.
A shard becomes visible under its final name only when complete: locally it is written to a hidden temp name
in the same directory and renamed; for other URLs it is spooled to a local temp file and uploaded in one go at
shard end. `close()` writes `manifest.json` (format: clipjob.data.manifest) last; leaving the `with` block by
an exception discards the unfinished shard and writes no manifest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tarfile
import tempfile
from typing import IO, Any

from clipjob import fs
from clipjob.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME
from clipjob.errors import ClipjobError

_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive to a multiple of this
_FORMAT = tarfile.PAX_FORMAT


def _encode(key: str, ext: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
    raise ClipjobError(f"sample {key!r} field {ext!r}: expected bytes, str or dict, got {type(value).__name__}")


def check_key(key: str) -> None:
    """webdataset splits member names at the first dot, so a key must be non-empty and dot/slash-free."""
    if not isinstance(key, str) or not key or "." in key or "/" in key or "\\" in key or "\0" in key:
        raise ClipjobError(f"sample key {key!r}: must be a non-empty string without '.', '/' or '\\' "
                           "(webdataset splits member names at the first dot)")


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _header(name: str, size: int) -> bytes:
    """The header block(s) tarfile writes for a regular file; short ASCII names (the common case) take a fast
    path that builds the ustar block directly (tarfile's own code costs ~0.1 ms per member). Owner names and
    device numbers are left empty, as current tarfile versions do for regular files."""
    raw = name.encode("ascii") if name.isascii() else b""
    if not raw or len(raw) > 100 or size >= 8**11:
        return _member(name, size).tobuf(_FORMAT, "utf-8", "surrogateescape")
    block = b"".join((raw.ljust(100, b"\0"), b"0000444\0", b"0000000\0", b"0000000\0", b"%011o\0" % size,
                      b"00000000000\0", b" " * 8, b"0", bytes(100), b"ustar\x0000", bytes(64 + 16 + 167)))
    return block[:148] + b"%06o\0" % sum(block) + block[155:]


def _padded(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


class ShardWriter:
    """Writes samples into size- and count-limited tar shards under `out_url`, then a manifest.

    A shard is closed before a sample that would take it past `max_samples` samples or `max_bytes` bytes
    (the exact final file size, tar padding included); a single sample larger than `max_bytes` gets a shard
    of its own. Keys must be unique per writer; a repeat within one shard is refused (a reader keeps the first
    copy of a key in a shard and counts the others as `duplicate_key`), one across shards is not detected.
    """

    def __init__(self, out_url: str, prefix: str = "shard", max_samples: int = 10000, max_bytes: int = 1 << 30,
                 first_index: int = 0, write_manifest: bool = True):
        """`first_index`: number of the first shard (parallel writers of one dataset use disjoint ranges);
        `write_manifest=False`: close() only returns the manifest (the caller merges several)."""
        if max_samples < 1:
            raise ClipjobError(f"ShardWriter max_samples={max_samples}: must be >= 1")
        if max_bytes < _RECORD:
            raise ClipjobError(f"ShardWriter max_bytes={max_bytes}: must be >= {_RECORD} (one tar record)")
        if not prefix or "/" in prefix or "." in prefix:
            raise ClipjobError(f"ShardWriter prefix {prefix!r}: must be a non-empty name without '/' or '.'")
        self.out_url, self.prefix = out_url.rstrip("/") or out_url, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.first_index, self.write_manifest = first_index, write_manifest
        self.shards: list[dict] = []
        self._file: IO[bytes] | None = None
        self._tmp_path: str | None = None
        self._samples = 0
        self._content = 0  # bytes of headers + data written to the current shard, before end-of-archive
        self._keys: set[str] = set()  # keys of the current shard
        self._closed = False

    # -- public API -----------------------------------------------------------------------------------------

    def write(self, key: str, fields: dict[str, bytes | str | dict]) -> None:
        """Add one sample: `fields` maps extension (png, txt, json, ...) to its payload."""
        if self._closed:
            raise ClipjobError(f"{self.out_url}: ShardWriter is closed")
        check_key(key)
        if not fields:
            raise ClipjobError(f"sample {key!r}: no fields")
        members = []
        for ext, value in fields.items():
            if not isinstance(ext, str) or not ext or "/" in ext or ext.startswith("."):
                raise ClipjobError(f"sample {key!r}: bad field name {ext!r} (an extension such as 'png' or 'txt')")
            data = _encode(key, ext, value)
            members.append((_header(f"{key}.{ext}", len(data)), data))
        size = sum(len(header) + _padded(len(data)) for header, data in members)
        if self._file is not None and (self._samples >= self.max_samples
                                       or self._final_size(self._content + size) > self.max_bytes):
            self._finish_shard()
        if key in self._keys:  # the keys of the shard this sample goes into
            raise ClipjobError(f"sample key {key!r}: repeated (keys must be unique)")
        if self._file is None:
            self._start_shard()
        assert self._file is not None
        for header, data in members:  # what tarfile.addfile writes: header blocks, data, zero padding
            self._file.write(header)
            self._file.write(data)
            self._file.write(b"\0" * (_padded(len(data)) - len(data)))
        self._content += size
        self._samples += 1
        self._keys.add(key)

    def close(self) -> dict:
        """Finish the open shard and write manifest.json; returns the manifest."""
        if self._closed:
            return self.manifest()
        self._finish_shard()
        self._closed = True
        manifest = self.manifest()
        if self.write_manifest:
            fs.write_text(fs.join(self.out_url, MANIFEST_NAME), json.dumps(manifest, indent=1) + "\n")
        return manifest

    def abort(self) -> None:
        """Discard the unfinished shard (finished shards stay) and write no manifest."""
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._tmp_path and os.path.exists(self._tmp_path):
            os.remove(self._tmp_path)
        self._file = self._tmp_path = None

    def manifest(self) -> dict:
        return {"format": MANIFEST_FORMAT, "shards": list(self.shards),
                "total_samples": sum(s["samples"] for s in self.shards)}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- shards ---------------------------------------------------------------------------------------------

    @staticmethod
    def _final_size(content: int) -> int:
        """Archive size once closed: content + two zero blocks, padded to a whole record."""
        return -(-(content + 2 * _BLOCK) // _RECORD) * _RECORD

    def _shard_name(self) -> str:
        return f"{self.prefix}-{self.first_index + len(self.shards):06d}.tar"

    def _start_shard(self) -> None:
        name = self._shard_name()
        if fs.is_local(self.out_url):
            final = self._local_path(fs.join(self.out_url, name))
            os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
            # hidden and not ending in .tar: never picked up by globs or mistaken for a finished shard
            self._tmp_path = os.path.join(os.path.dirname(final),
                                          f".{name}.tmp-{os.getpid()}-{random.randrange(1 << 30)}")
            self._file = open(self._tmp_path, "wb")  # noqa: SIM115 - closed in _finish_shard/abort
        else:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 - spool; uploaded in _finish_shard
        self._samples = self._content = 0

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        name, url = self._shard_name(), fs.join(self.out_url, self._shard_name())
        nbytes = self._final_size(self._content)
        self._file.write(b"\0" * (nbytes - self._content))  # end-of-archive blocks + record padding
        assert self._file.tell() == nbytes
        if self._tmp_path is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp_path, self._local_path(url))
        else:
            self._file.seek(0)
            with fs.open_url(url, "wb") as out:
                shutil.copyfileobj(self._file, out, 8 << 20)
            self._file.close()
        self.shards.append({"name": name, "samples": self._samples, "bytes": nbytes})
        self._file = self._tmp_path = None
        self._keys = set()

    @staticmethod
    def _local_path(url: str) -> str:
        return url[len("file://"):] if url.startswith("file://") else url
