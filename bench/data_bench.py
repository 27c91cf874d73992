"""Data pipeline throughput: clipjob's loader vs the webdataset pipeline as OpenCLIP's training app sets it up.

    .venv/bin/python bench/data_bench.py                   # 2,000 JPEGs, local + loopback S3, 2 workers
    .venv/bin/python bench/data_bench.py --images 500 --batches 10 --repeats 1   # a quick look

Both sides read the same webdataset shards (built once by `clipjob data build` from synthetic 256..640 px
JPEGs with captions), with the same number of DataLoader workers, image size, batch size and shuffle buffer,
and do the same work per sample in their workers: decode, RandomResizedCrop(224, scale 0.9..1), to tensor,
tokenise to 77 tokens, batch. clipjob's workers send uint8 images that its trainer turns into float [0, 1];
here the consumer does that conversion (timed, in one thread: see main), so both sides deliver float batches. Sources: a local
directory and the loopback S3 server (moto). The peer reads s3:// through a webdataset gopen handler on the
same fsspec stream clipjob reads with (webdataset has none of its own; OpenCLIP shells out to `aws s3 cp`,
which does not exist here). Samples/s are
measured after a warm-up (workers started, shuffle buffer filled). Per source, one untimed pair of runs warms the
page cache and the imports, then `--repeats` timed pairs follow, the side that goes first alternating; each side's
samples/s is the median of its runs and the ratio the median of the pairs' ratios (a pair shares the machine's
state of the moment). The local runs come first, the loopback S3 server starts after them.

Samples/s depend on everything else running on the machine. So each side's CPU cost per sample is also
measured with the whole pipeline in one process (num_workers=0, one torch thread, process CPU time), which
other load barely affects. And JPEG decode time per image with and without draft mode (decode.py decodes at
the smallest DCT scale that still covers the target size), alone and followed by the training crop.

data.decode=gpu (clipjob only; `--only decode-gpu` runs just this): the CPU per sample of the workers' part
(header parse + crop box + the bytes shipped) beside decode=cpu's, measured the same way, and the CPU time the
trainer-side decode (`device_decode.materialize`) takes when the device is this CPU, so the reader sees where the
work went (on a GPU that part runs in nvjpeg and CUDA kernels).

Writes bench/results/data.json and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.common import machine_info  # noqa: E402

WORDS = ("a photo of the red blue green small large old new dog cat car house tree river mountain street "
         "person child bird flower city night day beach snow field kitchen table chair book window sky "
         "wooden metal bright dark close-up view with and on in near under standing sitting running").split()


# -- data ----------------------------------------------------------------------------------------------------


def synthetic_jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A photo-like JPEG: smooth colour field + shapes + sensor noise (compresses like a real photo)."""
    small = rng.integers(0, 256, size=(max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 6, size=(h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """n JPEGs of 256..640 px per side with sidecar captions (kept between runs)."""
    if len(list(folder.glob("*.jpg"))) == n:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    for i in range(n):
        w, h = int(rng.integers(256, 641)), int(rng.integers(256, 641))
        (folder / f"{i:06d}.jpg").write_bytes(synthetic_jpeg(rng, w, h))
        (folder / f"{i:06d}.txt").write_text(" ".join(prng.choices(WORDS, k=prng.randint(5, 20))))


def make_shards(images: Path, out: Path, per_shard: int) -> str:
    from clipjob.datasets.build import BuildOptions, build_shards

    if not (out / "manifest.json").exists():
        build_shards(str(images), BuildOptions(out=str(out), samples_per_shard=per_shard, workers=2,
                                               progress=False))
    return str(out)


def upload(local: str, bucket_url: str) -> str:
    from clipjob import fs

    for name in sorted(os.listdir(local)):
        if name.endswith((".tar", ".json")):
            fs.write_bytes(fs.join(bucket_url, name), Path(local, name).read_bytes())
    return bucket_url


# -- the two pipelines ---------------------------------------------------------------------------------------


def clipjob_loader(spec: str, args: argparse.Namespace, decode: str = "cpu"):
    from clipjob.config import DataConfig
    from clipjob.data.pipeline import build_train_loader
    from clipjob.model.tokenizer import ClipTokenizer

    data = DataConfig(train=spec, num_workers=args.workers, shuffle_buffer=args.shuffle, rrc_scale=(0.9, 1.0),
                      decode=decode)
    return build_train_loader(data, batch_size=args.batch_size, image_size=args.image_size, tokenizer=ClipTokenizer(77),
                              seed=0, rank=0, start_step=0)


FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "memory", "az", "abfs", "hf", "http", "https")


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """A webdataset gopen handler (webdataset's public `gopen_schemes` table) that opens any fsspec URL as
    clipjob reads it: a stream of range requests with clipjob.fs's retries."""
    from clipjob import fs

    if mode != "rb":
        raise ValueError(f"{url}: this gopen handler only reads (mode {mode!r})")
    return fs.open_stream(url)


def openclip_loader(spec: str, args: argparse.Namespace):
    """The webdataset pipeline as open_clip_train builds it for `--dataset-resampled` training: resampled
    shards -> tar samples -> sample shuffle -> drop samples without image or caption -> decode to PIL RGBA
    -> rename -> preprocess image / tokenise text -> tuples -> batches, in a WebLoader with the same
    workers. Transforms and tokenizer come from open_clip itself."""
    import open_clip
    import webdataset as wds

    from clipjob.data.shards import expand_shard_urls

    for scheme in FSSPEC_SCHEMES:  # s3:// for the peer too (see the module doc)
        wds.gopen_schemes[scheme] = _gopen_fsspec
    urls = expand_shard_urls(spec)
    preprocess = open_clip.image_transform(args.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    def has_caption_and_image(sample: dict) -> bool:
        return "txt" in sample and any(k in sample for k in ("png", "jpg", "jpeg", "webp"))

    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, deterministic=True),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=args.shuffle, initial=min(args.shuffle, 100)),
        wds.select(has_caption_and_image),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(args.batch_size, partial=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=args.workers,
                         persistent_workers=args.workers > 0)


def measure(make_loader, spec: str, args: argparse.Namespace) -> dict:
    """Samples/s over `args.batches` batches after `args.warmup` batches (workers up, buffer filled)."""
    t0 = time.perf_counter()
    loader = make_loader(spec, args)
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = 0
    for _ in range(args.batches):
        b = next(it)
        images = _float_images(b)
        assert tuple(images.shape[1:]) == (3, args.image_size, args.image_size), images.shape
        n += images.shape[0]
    dt = time.perf_counter() - t1
    del it, loader
    return {"samples_per_s": round(n / dt, 1), "samples": n, "seconds": round(dt, 2),
            "warmup_s": round(first, 2)}


def measure_cpu(make_loader, spec: str, args: argparse.Namespace) -> dict:
    """CPU milliseconds per sample with the whole pipeline in this process (num_workers=0, one torch thread,
    as in a worker): what a sample costs, nearly independent of other load on the machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one = argparse.Namespace(**{**vars(args), "workers": 0})
    it = iter(make_loader(spec, one))
    for _ in range(args.warmup):
        next(it)
    t = time.process_time()
    n = sum(_float_images(next(it)).shape[0] for _ in range(args.batches))
    cpu = time.process_time() - t
    torch.set_num_threads(threads)
    return {"cpu_ms_per_sample": round(cpu / n * 1e3, 3), "samples": n}


def measure_decode_gpu_cpu(spec: str, args: argparse.Namespace) -> dict:
    """data.decode=gpu's CPU milliseconds per sample, as measure_cpu measures them (whole pipeline in this
    process, one torch thread): the workers' part (header, crop box, bytes) and, apart, the trainer-side decode
    + crop + resize + float conversion on device "cpu" (on CUDA that part is nvjpeg's and the GPU's). decode=cpu
    measured alongside, in the same way and under the same load."""
    import torch

    from clipjob.data.device_decode import materialize
    from clipjob.data.transforms import to_unit_float

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one = argparse.Namespace(**{**vars(args), "workers": 0})
    out = {}
    for decode in ("cpu", "gpu"):
        it = iter(clipjob_loader(spec, one, decode=decode))
        for _ in range(args.warmup):
            next(it)
        worker = device = 0.0
        n = on_device = 0
        for _ in range(args.batches):
            t = time.process_time()
            b = next(it)
            t1 = time.process_time()
            images = to_unit_float(materialize(b, "cpu").images)
            device += time.process_time() - t1
            worker += t1 - t
            n += images.shape[0]
            on_device += 0 if b.jpegs is None else b.jpegs.rows.numel()
        out[decode] = {"worker_cpu_ms_per_sample": round(worker / n * 1e3, 3),
                       "trainer_cpu_ms_per_sample": round(device / n * 1e3, 3), "samples": n,
                       "decoded_on_device": on_device}
    torch.set_num_threads(threads)
    return out


def _float_images(b):
    """The batch's images as the model gets them: float in [0, 1]. clipjob's workers send uint8 and its trainer
    converts (clipjob.data.transforms.to_unit_float); that conversion is counted here, in the consumer, so
    both sides deliver the same thing."""
    from clipjob.data.transforms import to_unit_float

    return to_unit_float(b.images) if hasattr(b, "images") else b[0]


# -- draft-mode decoding -------------------------------------------------------------------------------------


def decode_times(images: list[bytes], target: int, repeats: int = 5) -> dict:
    """Per-image time of a full decode vs clipjob's draft-mode decode, alone and followed by the training
    crop (RandomResizedCrop to `target`), interleaved image by image so load changes hit all alike; the
    best of `repeats` tries per image and method counts."""
    import torch

    from clipjob.data.decode import decode_image
    from clipjob.data.transforms import train_transform

    torch.set_num_threads(1)  # as in a DataLoader worker
    crop = train_transform(target, (0.9, 1.0))
    methods = {
        "full": lambda d: Image.open(io.BytesIO(d)).convert("RGB"),
        "draft": lambda d: decode_image({"jpg": d}, target),
        "full_crop": lambda d: crop(Image.open(io.BytesIO(d)).convert("RGB")),
        "draft_crop": lambda d: crop(decode_image({"jpg": d}, target)),
    }
    total = dict.fromkeys(methods, 0.0)
    for data in images:
        best = dict.fromkeys(methods, float("inf"))
        for _ in range(repeats):
            for name, fn in methods.items():
                t = time.perf_counter()
                fn(data)
                best[name] = min(best[name], time.perf_counter() - t)
        total = {k: total[k] + best[k] for k in total}
    n = len(images)
    out = {"images": n, **{f"{k}_ms": round(v / n * 1e3, 3) for k, v in total.items()}}
    out["decode_speedup"] = round(total["full"] / total["draft"], 2)
    out["decode_crop_speedup"] = round(total["full_crop"] / total["draft_crop"], 2)
    return out


# -- main ----------------------------------------------------------------------------------------------------


def compare(where: str, spec: str, args: argparse.Namespace) -> dict:
    """`args.repeats` timed pairs of runs, the two sides alternating first (ABBA...), after one untimed pair that
    warms the page cache, the allocator and the imports. Each side's samples/s is the median of its runs, and the
    ratio is the median of the pairs' ratios: a pair shares the machine's state of the moment, so a slow spell of
    the shared 2 cores moves both of its runs, and one disturbed pair moves the median little."""
    order = [("clipjob", clipjob_loader), ("openclip_wds", openclip_loader)]
    warm = argparse.Namespace(**{**vars(args), "batches": max(2, args.batches // 10)})
    for _, make in order:
        measure(make, spec, warm)
    runs: dict[str, list[dict]] = {"clipjob": [], "openclip_wds": []}
    pair_ratios = []
    for r in range(args.repeats):
        for name, make in (order if r % 2 == 0 else order[::-1]):
            runs[name].append(measure(make, spec, args))
            print(f"  {where:5s} {name:13s} run {r + 1}: {runs[name][-1]['samples_per_s']:8.1f} samples/s",
                  flush=True)
        pair_ratios.append(round(runs["clipjob"][-1]["samples_per_s"] / runs["openclip_wds"][-1]["samples_per_s"], 3))
    cpu = {"clipjob": measure_cpu(clipjob_loader, spec, args), "openclip_wds": measure_cpu(openclip_loader, spec, args)}
    out: dict = {}
    for name, rs in runs.items():
        speeds = [x["samples_per_s"] for x in rs]
        out[name] = {"samples_per_s": round(statistics.median(speeds), 1), "best_samples_per_s": max(speeds),
                     "worst_samples_per_s": min(speeds), "samples_per_run": rs[0]["samples"], **cpu[name]}
    return {**out, "runs": runs, "pair_ratios": pair_ratios,
            "ratio_clipjob_over_peer": round(statistics.median(pair_ratios), 2),
            "ratio_range": [min(pair_ratios), max(pair_ratios)],
            "cpu_ratio_peer_over_clipjob": round(cpu["openclip_wds"]["cpu_ms_per_sample"]
                                                 / cpu["clipjob"]["cpu_ms_per_sample"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--shuffle", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batches", type=int, default=100, help="Batches timed per run after the warm-up (20 read +-30 percent run to run)")
    ap.add_argument("--repeats", type=int, default=5, help="Timed pairs of runs per source; the median pair ratio counts")
    ap.add_argument("--no-s3", action="store_true", help="Skip the loopback S3 runs")
    ap.add_argument("--tmp", default=str(ROOT / "bench" / "results" / "tmp" / "data"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data.json"), help="Result file ('' = do not write)")
    ap.add_argument("--only", choices=["decode-gpu"], help="Run only this part (local shards) and update its entry "
                    "of the result file")
    args = ap.parse_args()
    # Both pipelines run in this process (and its forked workers), so both get clipjob's host-allocator setting,
    # as clipjob's trainer has it (clipjob/hostmem.py); without it, the consumer's float conversion of every batch
    # page-faults a fresh 38 MiB buffer in.
    from clipjob.hostmem import tune_malloc

    host_malloc = "keep (clipjob/hostmem.py), both sides" if tune_malloc() else "glibc default, both sides"
    # The consumer stands in for a trainer, which on a GPU converts the batch on the device and runs no host
    # OpenMP pool; with 2 pool threads here, the idle one spins after each conversion on the cores the
    # workers need (clipjob local: 462-561 samples/s with 2 consumer threads, 567-631 with 1, 3 pairs).
    # One consumer thread on both sides; clipjob's conversion (~4 ms per batch of 64) is still counted.
    import torch

    torch.set_num_threads(1)
    tmp = Path(args.tmp)
    images = tmp / f"images-{args.images}"
    make_images(images, args.images)
    local = make_shards(images, tmp / f"shards-{args.images}-{args.per_shard}", args.per_shard)
    if args.only == "decode-gpu":
        return decode_gpu_only(local, args)
    load_before = os.getloadavg()
    results: dict[str, dict] = {"local": compare("local", local, args)}
    if not args.no_s3:
        # the S3 server starts after the local runs, so neither the upload nor the moto process shares the 2 cores
        # with them (session 17's local runs, made after both, spread 259-779 samples/s for clipjob)
        from s3server import S3Server, apply_env

        server = S3Server().start()
        try:
            apply_env(server.env())
            results["s3"] = compare("s3", upload(local, server.make_bucket("bench-data") + "/shards"), args)
        finally:
            server.stop()

    rng = np.random.default_rng(1)
    sample_files = sorted(images.glob("*.jpg"))[:100]
    draft = {"dataset_256_640px_to_224": decode_times([p.read_bytes() for p in sample_files], args.image_size),
             "large_2048x1536_to_224": decode_times([synthetic_jpeg(rng, 2048, 1536) for _ in range(8)],
                                                    args.image_size)}
    machine = machine_info()
    machine["loadavg_after"] = machine.pop("loadavg")  # machine_info reads it now, after the runs
    report = {
        "what": "training data pipeline samples/s: clipjob vs OpenCLIP-style webdataset pipeline",
        "command": "python bench/data_bench.py " + " ".join(sys.argv[1:]),
        "setup": {"host_malloc": host_malloc, "images": args.images, "image_px": "256..640 JPEG q90",
                  "shards": args.images // args.per_shard, "workers": args.workers, "batch_size": args.batch_size,
                  "image_size": args.image_size, "shuffle_buffer": args.shuffle, "batches_timed": args.batches, "repeats": args.repeats},
        "machine": {**machine, "loadavg_before": [round(x, 2) for x in load_before]},
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in results.items()},
        "runs": {k: v["runs"] for k, v in results.items()},
        "jpeg_decode": draft,
        "decode_gpu": decode_gpu_entry(local, args),
    }
    if args.out:  # '' = print only, as the other benches
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'source':8s} {'clipjob':>10s} {'openclip+wds':>13s} {'ratio':>6s}  |  {'CPU ms/sample':>13s} "
          f"{'(clipjob':>9s} {'peer)':>6s} {'ratio':>6s}   samples/s: median of {args.repeats} runs, "
          f"{args.workers} workers, batch {args.batch_size}, {args.image_size} px; ratio: median of the pairs'")
    for where, r in results.items():
        c, p = r["clipjob"], r["openclip_wds"]
        print(f"{where:8s} {c['samples_per_s']:10.1f} {p['samples_per_s']:13.1f} {r['ratio_clipjob_over_peer']:6.2f}  |  "
              f"{'':13s} {c['cpu_ms_per_sample']:9.2f} {p['cpu_ms_per_sample']:6.2f} "
              f"{r['cpu_ratio_peer_over_clipjob']:6.2f}   pairs {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}")
    for k, v in draft.items():
        print(f"jpeg {k}: decode full {v['full_ms']} ms / draft {v['draft_ms']} ms ({v['decode_speedup']}x); "
              f"decode+crop {v['full_crop_ms']} / {v['draft_crop_ms']} ms ({v['decode_crop_speedup']}x)")
    print_decode_gpu(report["decode_gpu"])
    print(f"load average before/after: {report['machine']['loadavg_before']} / {report['machine']['loadavg_after']}")
    print(f"wrote {args.out}" if args.out else "(not written: --out '')")


def decode_gpu_entry(spec: str, args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()
    cpu = measure_decode_gpu_cpu(spec, args)
    return {"what": "CPU ms per sample, whole clipjob pipeline in one process with one torch thread: workers' part "
                    "(decode=gpu: header + crop box only) and trainer-side decode on device cpu",
            "images": args.images, "image_px": "256..640 JPEG q90", "batch_size": args.batch_size,
            "image_size": args.image_size, "batches_timed": args.batches, **cpu,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def print_decode_gpu(entry: dict) -> None:
    c, g = entry["cpu"], entry["gpu"]
    print(f"data pipeline CPU per sample, decode=cpu: workers {c['worker_cpu_ms_per_sample']:.3f} ms + trainer-side "
          f"float conversion {c['trainer_cpu_ms_per_sample']:.3f} ms; decode=gpu "
          f"(workers: header + box only): workers {g['worker_cpu_ms_per_sample']:.3f} ms + trainer-side decode on "
          f"device cpu {g['trainer_cpu_ms_per_sample']:.3f} ms ({g['decoded_on_device']} of {g['samples']} samples "
          f"decoded there); load {entry['loadavg_before']} -> {entry['loadavg_after']}")


def decode_gpu_only(local: str, args: argparse.Namespace) -> None:
    """`--only decode-gpu`: measure just data.decode=gpu's CPU split; replace that entry of the result file."""
    import torch

    torch.set_num_threads(1)
    entry = decode_gpu_entry(local, args)
    print_decode_gpu(entry)
    if args.out:
        path = Path(args.out)
        report = json.loads(path.read_text()) if path.exists() else {}
        report["decode_gpu"] = {**entry, "command": "python bench/data_bench.py " + " ".join(sys.argv[1:])}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out} (decode_gpu)")


if __name__ == "__main__":
    main()
