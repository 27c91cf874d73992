"""`clipjob data build`: image-caption inputs -> webdataset shards + manifest.json, at any fsspec URL.

Inputs: a folder of images with sidecar captions (`a/b.jpg` + `a/b.txt`), a CSV/TSV/parquet table with an
image column (path relative to the table, absolute path or URL) and a caption column, or CoreNet's
image-text tar dataset (metadata.pkl + {k}.tar.gz of pickled samples, read with a restricted unpickler).

How a build survives a crash: the input is listed in a fixed order and cut into units (folder/table:
`samples_per_shard` records -> one shard; CoreNet: one {k}.tar.gz -> its shards), so unit u always writes
the same shard names. A unit that finishes writes `_build/unit-{u:06d}.json` (its shards, counts, image
hashes) after its shards; a rerun skips the units that have one. `_build/plan.json` pins the options and
the shard size chosen on the first run. manifest.json is written last, from the unit parts.

Duplicates (identical image bytes, blake2b) are kept once, build-wide: workers claim each hash in a shared
table seeded from finished units, so which copy survives may vary between runs but never more than one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import queue
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from clipjob import fs
from clipjob.data.decode import BadSample, decode_caption, decode_image, open_image
from clipjob.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME
from clipjob.datasets import corenet_tar
from clipjob.datasets.writer import ShardWriter
from clipjob.errors import ClipjobError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
STORED_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats the training pipeline reads
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "path", "url", "image_url")
CAPTION_COLUMNS = ("caption", "text", "title", "txt")
ESTIMATE_RECORDS = 32  # records encoded on a first run to turn a byte target into samples per shard
TAR_OVERHEAD = 3 * 768  # per sample: three members, a 512-byte header and ~256 bytes of padding each
MAX_CAPTION_CHARS = 131_072  # longer captions are skipped (caption_too_long): csv's old field limit, any input
CSV_FIELD_LIMIT = 2**31 - 1  # csv refuses longer fields; the caption limit above decides, not the parser


@dataclass(frozen=True)
class BuildOptions:
    out: str
    kind: str = "auto"  # auto | folder | table | corenet
    prefix: str = "shard"
    shard_size: int = 256 << 20  # target bytes per shard
    samples_per_shard: int = 0  # 0 = derived from shard_size
    max_size: int = 0  # downscale images whose shorter side exceeds this (0 = keep)
    dedup: bool = True
    workers: int = 1
    jpeg_quality: int = 90
    image_column: str = ""
    caption_column: str = ""
    progress: bool = True


@dataclass
class Record:
    key: str
    src: str  # where it came from, for the sample's json
    image: str | bytes | None  # URL/path, or the bytes themselves
    caption: str | bytes | None = None  # bytes: checked as UTF-8 when the sample is prepared
    caption_url: str | None = None  # sidecar caption file (read in the worker)
    bad: str = ""  # a reason known while listing (e.g. a refused pickle)


@dataclass
class Unit:
    index: int
    first_shard: int
    max_shards: int
    records: list[Record] | None = None  # folder/table
    tar_url: str | None = None  # CoreNet: one {k}.tar.gz


@dataclass
class Claims:
    """Image hash -> key of the sample that kept it; a dict, or a multiprocessing.Manager dict proxy."""

    table: Any = field(default_factory=dict)

    def claim(self, digest: str, key: str) -> bool:
        return self.table.setdefault(digest, key) == key


# -- inputs --------------------------------------------------------------------------------------------------


def detect_kind(src: str) -> str:
    low = src.lower()
    if low.endswith((".csv", ".tsv", ".parquet", ".pq")):
        return "table"
    if fs.exists(fs.join(src, "metadata.pkl")):
        return "corenet"
    return "folder"


def folder_records(root: str) -> list[Record]:
    files = fs.find(root)
    if not files:
        raise ClipjobError(f"{root}: no files found (expected images with sidecar .txt captions)")
    present = set(files)
    base = root.rstrip("/") + "/"
    out = []
    for url in files:
        stem, ext = posixpath.splitext(url)
        if ext.lower() in IMAGE_EXTS:
            cap = stem + ".txt"
            out.append(Record(f"{len(out):09d}", url[len(base):] if url.startswith(base) else url, url,
                              caption_url=cap if cap in present else None))
    if not out:
        raise ClipjobError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) found")
    return out


def _read_rows(table: str) -> list[dict]:
    if table.lower().endswith((".parquet", ".pq")):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ClipjobError(f"{table}: reading parquet needs pyarrow (pip install 'clipjob[parquet]')") from None
        with fs.open_url(table, "rb") as f:
            return pq.read_table(f).to_pylist()
    delimiter = "\t" if table.lower().endswith(".tsv") else ","
    with fs.open_url(table, "rb") as f:
        # bytes that are not UTF-8 survive as surrogates, so such a caption is counted (caption_not_utf8), not
        # kept with replacement characters; a leading byte-order mark is dropped
        text = f.read().decode("utf-8-sig", errors="surrogateescape")
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    return list(csv.DictReader(io.StringIO(text), delimiter=delimiter))


def _cell_bytes(value: Any) -> str | bytes | None:
    """A caption cell as bytes (a CSV cell's undecodable bytes restored), so UTF-8 is checked like a .txt."""
    if value is None or isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else str(value)


def _pick_column(table: str, names: list[str], given: str, candidates: tuple[str, ...], what: str) -> str:
    if given:
        if given not in names:
            raise ClipjobError(f"{table}: no column {given!r} ({what}); columns are {names}")
        return given
    lower = {n.lower(): n for n in names}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise ClipjobError(f"{table}: no {what} column among {names}; name it with --{what}-column")


def table_records(table: str, image_column: str = "", caption_column: str = "") -> list[Record]:
    rows = _read_rows(table)
    if not rows:
        raise ClipjobError(f"{table}: the table has no rows")
    names = list(rows[0].keys())
    icol = _pick_column(table, names, image_column, IMAGE_COLUMNS, "image")
    ccol = _pick_column(table, names, caption_column, CAPTION_COLUMNS, "caption")
    here = posixpath.dirname(table) if "://" in table else os.path.dirname(os.path.abspath(table))
    out = []
    for i, row in enumerate(rows):
        ref = str(row.get(icol) or "").strip()
        url = ref if ("://" in ref or os.path.isabs(ref) or not ref) else fs.join(here, ref)
        src = ref.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # printable in the sample's json
        out.append(Record(f"{i:09d}", src, url or None, caption=_cell_bytes(row.get(ccol))))
    return out


def corenet_records(tar_url: str) -> Iterator[Record]:
    for idx, sample in corenet_tar.iter_tar_samples(tar_url):
        src = f"{posixpath.basename(tar_url)}:{idx}"
        if isinstance(sample, corenet_tar.UnsafePickle):
            yield Record(f"{idx:09d}", src, None, bad="unsafe_pickle")
            continue
        try:
            data, captions = corenet_tar.sample_fields(sample)
        except corenet_tar.UnsafePickle:
            yield Record(f"{idx:09d}", src, None, bad="malformed_sample")
            continue
        yield Record(f"{idx:09d}", src, data, caption=captions[0] if captions else None)


def unit_records(unit: Unit, bad: Counter) -> Iterator[Record]:
    """The records of a unit. A CoreNet tar.gz that is missing or breaks off counts once in `bad`; the
    records read before the break are kept."""
    if unit.records is not None:
        yield from unit.records
        return
    assert unit.tar_url is not None
    try:
        yield from corenet_records(unit.tar_url)
    except ClipjobError as e:
        if not isinstance(e.__cause__, FileNotFoundError):
            raise
        bad["missing_input"] += 1
    except (EOFError, OSError, tarfile.TarError):
        bad["truncated_input"] += 1


# -- one sample ----------------------------------------------------------------------------------------------


def prepare(rec: Record, opts: BuildOptions, claims: Claims | None) -> tuple[dict[str, Any] | None, str]:
    """Record -> (the sample's fields or None for a duplicate, hash of the image bytes); BadSample when it
    is unusable."""
    if rec.bad:
        raise BadSample(rec.bad)
    raw: bytes | str | None = rec.caption
    if rec.caption_url is not None:
        raw = _read(rec.caption_url, "missing_caption")
    caption = decode_caption({"txt": raw})
    if len(caption) > MAX_CAPTION_CHARS:
        raise BadSample("caption_too_long")
    if rec.image is None:
        raise BadSample("missing_image")
    data = rec.image if isinstance(rec.image, bytes) else _read(rec.image, "missing_image")
    img = open_image(data)
    width, height = img.size
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if claims is not None and not claims.claim(digest, rec.key):
        return None, digest
    shorter = min(width, height)
    if (opts.max_size and shorter > opts.max_size) or img.format not in STORED_AS_IS:
        target = opts.max_size if opts.max_size and shorter > opts.max_size else shorter
        ext, data = "jpg", _reencode(data, target, opts.jpeg_quality)
    else:
        _check_pixels(img)
        ext = STORED_AS_IS[img.format]
    return {ext: data, "txt": caption, "json": {"src": rec.src, "width": width, "height": height}}, digest


def _read(url: str, missing_reason: str) -> bytes:
    try:
        return fs.read_bytes(url)
    except ClipjobError as e:
        raise BadSample(missing_reason if isinstance(e.__cause__, FileNotFoundError) else "unreadable_input") from None


def _check_pixels(img: Image.Image) -> None:
    """Catch truncated/corrupt payloads cheaply: JPEGs are decoded at 1/8 scale (DC coefficients only)."""
    try:
        if img.format == "JPEG":
            img.draft("RGB", (1, 1))
        img.load()
    except Exception:  # noqa: BLE001
        raise BadSample("corrupt_image") from None


def _reencode(data: bytes, shorter: int, quality: int) -> bytes:
    img = decode_image({"jpg": data}, shorter)  # draft-decodes JPEGs to >= target; RGB on white
    scale = shorter / min(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS, reducing_gap=2.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=False)
    return buf.getvalue()


# -- one unit (runs in a worker process) ---------------------------------------------------------------------


def _part_url(out: str, unit: int) -> str:
    return fs.join(out, "_build", f"unit-{unit:06d}.json")


def run_unit(unit: Unit, opts: BuildOptions, spp: int, claims: Claims | None,
             progress: Callable[[int], None] | None = None) -> dict:
    """Write one unit's shards, then its part file (the done marker). Returns the part."""
    bad: Counter = Counter()
    hashes, duplicates, done = [], 0, 0
    writer = ShardWriter(opts.out, prefix=opts.prefix, max_samples=spp, max_bytes=1 << 62,
                         first_index=unit.first_shard, write_manifest=False)
    try:
        for rec in unit_records(unit, bad):
            try:
                fields, digest = prepare(rec, opts, claims)
            except BadSample as e:
                bad[e.reason] += 1
                fields, digest = {}, ""
            if fields is None:
                duplicates += 1
            elif fields:
                writer.write(rec.key, fields)
                hashes.append(digest)
            done += 1
            if progress and done % 16 == 0:
                progress(16)
    except BaseException:
        writer.abort()
        raise
    shards = writer.close()["shards"]
    if progress:
        progress(done % 16)
    for j in range(len(shards), unit.max_shards):  # a crashed earlier try may have left more shards
        fs.rm(fs.join(opts.out, f"{opts.prefix}-{unit.first_shard + j:06d}.tar"))
    part = {"unit": unit.index, "shards": shards, "bad": dict(bad), "duplicates": duplicates,
            "hashes": hashes if opts.dedup else []}
    fs.write_text(_part_url(opts.out, unit.index), json.dumps(part))
    return part


# -- the build -----------------------------------------------------------------------------------------------


def _plan_units(src: str, kind: str, opts: BuildOptions) -> tuple[Callable[[int], list[Unit]], int, str]:
    """(samples per shard -> units, number of input records (CoreNet: an upper bound), fingerprint of the
    input listing)."""
    if kind == "corenet":
        meta = corenet_tar.read_metadata(src)
        names = sorted(meta["tar_file_names"], key=corenet_tar.tar_index)
        per_tar = meta["max_files_per_tar"]

        def corenet_units(spp: int) -> list[Unit]:
            n = math.ceil(per_tar / spp)
            return [Unit(i, i * n, n, tar_url=fs.join(src, name)) for i, name in enumerate(names)]

        return corenet_units, per_tar * len(names), _fingerprint([str(per_tar), *names])
    records = folder_records(src) if kind == "folder" else table_records(src, opts.image_column, opts.caption_column)

    def chunk_units(spp: int) -> list[Unit]:
        return [Unit(i, i, 1, records=records[i * spp:(i + 1) * spp]) for i in range(math.ceil(len(records) / spp))]

    return chunk_units, len(records), _fingerprint([r.src for r in records])


def _fingerprint(items: list[str]) -> str:
    return f"{len(items)}:{hashlib.blake2b(chr(0).join(items).encode(), digest_size=8).hexdigest()}"


def _estimate_spp(units: list[Unit], opts: BuildOptions) -> int:
    """Samples per shard that make shards of about opts.shard_size bytes, from a few encoded records."""
    sizes = []
    for rec in unit_records(units[0], Counter()):
        try:
            fields, _ = prepare(rec, opts, None)
        except BadSample:
            fields = None
        if fields:
            sizes.append(sum(len(v) if isinstance(v, (bytes, str)) else 64 for v in fields.values()) + TAR_OVERHEAD)
        if len(sizes) >= ESTIMATE_RECORDS:
            break
    return max(1, opts.shard_size // (sum(sizes) // len(sizes))) if sizes else 1000


def _load_plan(opts: BuildOptions, src: str, kind: str, fingerprint: str) -> dict:
    """The pinned settings of a build in progress, or (first run) the settings to pin."""
    want = {"input": src, "kind": kind, "listing": fingerprint, "prefix": opts.prefix, "max_size": opts.max_size,
            "dedup": opts.dedup, "jpeg_quality": opts.jpeg_quality, "image_column": opts.image_column,
            "caption_column": opts.caption_column}
    url = fs.join(opts.out, "_build", "plan.json")
    if fs.exists(url):
        plan = json.loads(fs.read_text(url))
        diff = [k for k, v in want.items() if plan.get(k) != v]
        if opts.samples_per_shard and plan.get("samples_per_shard") != opts.samples_per_shard:
            diff.append("samples_per_shard")
        if diff:
            what = "the input files changed" if diff == ["listing"] else f"other settings ({', '.join(diff)})"
            raise ClipjobError(f"{opts.out}: holds a build with {what}; use another --out or delete it")
        return plan
    return want


def build_shards(src: str, opts: BuildOptions) -> dict:
    """Build (or finish building) webdataset shards + manifest.json under opts.out; returns a summary."""
    src = os.path.abspath(src) if fs.is_local(src) and "://" not in src else src
    kind = detect_kind(src) if opts.kind == "auto" else opts.kind
    if kind not in ("folder", "table", "corenet"):
        raise ClipjobError(f"--from {kind!r}: expected auto, folder, table or corenet")
    make_units, n_inputs, fingerprint = _plan_units(src, kind, opts)
    plan = _load_plan(opts, src, kind, fingerprint)
    if "samples_per_shard" not in plan:
        spp = opts.samples_per_shard or _estimate_spp(make_units(ESTIMATE_RECORDS), opts)
        plan = {**plan, "samples_per_shard": spp}
        fs.write_text(fs.join(opts.out, "_build", "plan.json"), json.dumps(plan, indent=1))
    spp = plan["samples_per_shard"]
    units = make_units(spp)
    done = {p["unit"]: p for p in _read_parts(opts.out, len(units))}
    todo = [u for u in units if u.index not in done]
    seed = {h: "" for p in done.values() for h in p["hashes"]} if opts.dedup else {}
    resumed = sum(len(p["shards"]) for p in done.values())
    for part in _run_units(todo, opts, spp, seed, n_inputs - sum(_records_in(p) for p in done.values())):
        done[part["unit"]] = part
    return _write_manifest(opts, src, kind, [done[u.index] for u in units], resumed)


def _records_in(part: dict) -> int:
    return sum(s["samples"] for s in part["shards"]) + sum(part["bad"].values()) + part["duplicates"]


def _read_parts(out: str, n: int) -> list[dict]:
    names = set(fs.ls(fs.join(out, "_build")))
    return [json.loads(fs.read_text(_part_url(out, i))) for i in range(n) if f"unit-{i:06d}.json" in names]


def _run_units(todo: list[Unit], opts: BuildOptions, spp: int, seen: dict, total: int) -> Iterator[dict]:
    from clipjob.train.metrics import Ticker

    bar = Ticker(max(total, 0), "data build", "sample", opts.progress)
    try:
        if opts.workers <= 1 or len(todo) <= 1:
            claims = Claims(seen) if opts.dedup else None
            for unit in todo:
                yield run_unit(unit, opts, spp, claims, bar.update)
            return
        yield from _run_pool(todo, opts, spp, seen, bar)
    finally:
        bar.close()


def _run_pool(todo: list[Unit], opts: BuildOptions, spp: int, seen: dict, bar: Any) -> Iterator[dict]:
    import multiprocessing as mp

    with mp.Manager() as manager, ProcessPoolExecutor(max_workers=opts.workers) as pool:
        claims = Claims(manager.dict(seen)) if opts.dedup else None
        ticks = manager.Queue()
        pending = {pool.submit(run_unit, u, opts, spp, claims, ticks.put) for u in todo}
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(ticks, bar)
            for f in finished:
                try:
                    yield f.result()
                except BaseException:
                    for p in pending:
                        p.cancel()
                    raise
        _drain(ticks, bar)


def _drain(ticks: Any, bar: Any) -> None:
    while True:
        try:
            bar.update(ticks.get_nowait())
        except queue.Empty:
            return


def _write_manifest(opts: BuildOptions, src: str, kind: str, parts: list[dict], resumed: int) -> dict:
    shards = [s for p in parts for s in p["shards"]]
    bad: Counter = Counter()
    for p in parts:
        bad.update(p["bad"])
    stats = {"input": src, "kind": kind, "bad": dict(bad), "duplicates": sum(p["duplicates"] for p in parts)}
    manifest = {"format": MANIFEST_FORMAT, "shards": shards, "total_samples": sum(s["samples"] for s in shards),
                "build": stats}
    fs.write_text(fs.join(opts.out, MANIFEST_NAME), json.dumps(manifest, indent=1) + "\n")
    return {"out": opts.out, "shards": len(shards), "samples": manifest["total_samples"],
            "bytes": sum(s["bytes"] for s in shards), "resumed_shards": resumed, **stats,
            "options": {k: v for k, v in asdict(opts).items() if k in ("max_size", "dedup", "workers")}}
