"""Zero-shot eval throughput (images/s): `clipjob eval zeroshot --data folder:DIR` vs OpenCLIP's zero-shot path,
same weights, same ImageFolder, class names, prompt templates, batch size, workers, threads and precision.

    .venv/bin/python bench/eval_bench.py                   # fp32 + bf16, 2 repeats (needs .venv-bench)
    .venv/bin/python bench/eval_bench.py --precisions fp32 --repeats 1

Data: 20 classes x 100 synthetic photo-like JPEGs of 256..500 px (made once under bench/results/tmp/).
Weights: an OpenCLIP model of bench/common.py TINY with random weights (seed 0), saved as OpenCLIP's state
dict, converted for clipjob by `clipjob ckpt convert --from openclip` (so both evaluate the same network).
OpenCLIP side: what `open_clip_train.zero_shot.zero_shot_eval` does with `--imagenet-val`, on this folder:
`build_zero_shot_classifier` (10 classes per batch, under its autocast), torchvision ImageFolder with the
model's eval transform (`preprocess_val`), a DataLoader with the same batch size and workers, and
`open_clip_train.zero_shot.run` for the loop (its `accuracy` helper patched: 3.3.0's raises on numpy 2.4).
Timed on both sides from the start of the classifier to the last batch (clipjob's own `seconds` field); the
process wall time (imports, model load) is recorded too. The best of `--repeats` runs counts; sides
alternate. Writes bench/results/eval.json.

This file is also the OpenCLIP-side worker (`openclip-init`, `openclip-eval`), run by .venv-bench's Python.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (CLIPJOB_PY, OPENCLIP_MODEL_NAME, PEER_PY, TINY, TMP, default_precisions,  # noqa: E402
                          exit_on_sigterm, machine_info, ratio, run_env, run_monitored, tail, versions, write_result)

CLASSES = ["apple", "bicycle", "bridge", "butterfly", "castle", "cloud", "dolphin", "forest", "guitar", "horse",
           "lighthouse", "mountain", "orange", "penguin", "rocket", "sailboat", "snowman", "sunflower", "tiger",
           "volcano"]
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.",
             "a close-up photo of a {}.", "a cropped photo of a {}.", "a good photo of a {}.", "{}"]


# -- data -------------------------------------------------------------------------------------------------------


def make_folder(root: Path, per_class: int = 100, seed: int = 0) -> Path:
    """ImageFolder layout ROOT/CLASS/NNN.jpg: smooth colour fields + shapes + noise, 256..500 px, JPEG q90."""
    import numpy as np
    from PIL import Image, ImageDraw

    if root.exists() and sum(1 for _ in root.glob("*/*.jpg")) == len(CLASSES) * per_class:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            w, h = prng.randint(256, 500), prng.randint(256, 500)
            small = rng.integers(0, 256, size=(max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
            draw = ImageDraw.Draw(img)
            for _ in range(prng.randint(3, 8)):
                x0, y0 = prng.randrange(w), prng.randrange(h)
                box = (x0, y0, x0 + prng.randint(10, w // 2), y0 + prng.randint(10, h // 2))
                fill = tuple(prng.randrange(256) for _ in range(3))
                (draw.ellipse if prng.random() < 0.5 else draw.rectangle)(box, fill=fill)
            arr = np.asarray(img).astype(np.int16) + rng.normal(0, 6, size=(h, w, 3)).astype(np.int16)
            buf = io.BytesIO()
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            (root / c / f"{i:03d}.jpg").write_bytes(buf.getvalue())
    return root


# -- OpenCLIP side (runs in .venv-bench) ---------------------------------------------------------------------------


def _openclip_model(cfg_dir: str):
    import open_clip

    open_clip.add_model_config(cfg_dir)
    model, _, preprocess_val = open_clip.create_model_and_transforms(OPENCLIP_MODEL_NAME)
    return model, preprocess_val, open_clip.get_tokenizer(OPENCLIP_MODEL_NAME)


def _accuracy_numpy2(output, target, topk=(1,)):
    """open_clip_train.zero_shot.accuracy with `.item()` where 3.3.0 calls float() on a 1-element array."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() for k in topk]


def openclip_init(a: argparse.Namespace) -> None:
    """Random weights (seed 0) in OpenCLIP's own state-dict format."""
    import torch

    torch.manual_seed(0)
    model, _, _ = _openclip_model(a.config_dir)
    torch.save(model.state_dict(), a.weights)


def openclip_eval(a: argparse.Namespace) -> None:
    import open_clip_train.zero_shot as oc_zero_shot
    import torch
    from open_clip import build_zero_shot_classifier
    from open_clip_train.precision import get_autocast
    from torchvision import datasets

    oc_zero_shot.accuracy = _accuracy_numpy2  # 3.3.0's float(1-element array) raises on numpy >= 2.4

    if a.threads:
        torch.set_num_threads(a.threads)
    model, preprocess_val, tokenizer = _openclip_model(a.config_dir)
    model.load_state_dict(torch.load(a.weights, map_location="cpu", weights_only=True))
    model.eval()
    args = argparse.Namespace(device="cpu", precision="amp_bf16" if a.precision == "bf16" else "fp32",
                              batch_size=a.batch_size, workers=a.workers)
    classnames = [c.replace("_", " ") for c in sorted(p.name for p in Path(a.data).iterdir() if p.is_dir())]
    templates = json.loads(Path(a.templates).read_text())
    t0 = time.time()
    with get_autocast(args.precision, device_type="cpu")():  # as zero_shot_eval builds it
        classifier = build_zero_shot_classifier(model, tokenizer=tokenizer, classnames=classnames,
                                                templates=templates, num_classes_per_batch=10,
                                                device=torch.device("cpu"), use_tqdm=False)
    dataset = datasets.ImageFolder(a.data, transform=preprocess_val)  # open_clip_train.data.get_imagenet
    loader = torch.utils.data.DataLoader(dataset, batch_size=a.batch_size, num_workers=a.workers, sampler=None)
    top1, top5 = oc_zero_shot.run(model, classifier, loader, args)
    seconds = time.time() - t0
    n = len(dataset)
    Path(a.out).write_text(json.dumps({"top1": 100 * top1, "top5": 100 * top5, "images": n, "seconds": seconds,
                                       "images_per_s": n / seconds, "classes": len(classnames),
                                       "templates": len(templates)}))


# -- orchestration (runs in clipjob's .venv) -------------------------------------------------------------------------


def convert_weights(work: Path, weights: Path) -> tuple[str, list[str], str]:
    """(checkpoint for clipjob, extra eval args, how): `clipjob ckpt convert --from openclip` when it exists,
    else a clipjob model of the same size with its own random weights (same FLOPs, different numbers)."""
    ck = work / "clipjob-ckpt"
    shutil.rmtree(ck, ignore_errors=True)
    heads = [f"model.vision.heads={TINY.vision_heads}", f"model.text.heads={TINY.text_heads}"]
    cmd = [str(CLIPJOB_PY), "-m", "clipjob", "ckpt", "convert", "--from", "openclip", str(weights), str(ck),
           *[x for s in heads for x in ("--set", s)]]
    r = run_monitored(cmd, env=run_env(2), log=work / "convert.log")
    if r["rc"] == 0:
        return str(ck), [], "clipjob ckpt convert --from openclip (same weights as OpenCLIP)"
    fallback = work / "clipjob-random.safetensors"
    code = ("import sys, torch; from safetensors.torch import save_file; from clipjob.config import build_config; "
            "from clipjob.model import build_model; torch.manual_seed(0); "
            "m = build_model(build_config('tiny-cpu-scratch', None, sys.argv[2:]).model); "
            "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[1])")
    r2 = run_monitored([str(CLIPJOB_PY), "-c", code, str(fallback), *TINY.clipjob_sets()], env=run_env(2),
                       log=work / "fallback.log")
    if r2["rc"] != 0:
        logs = tail(work / "convert.log") + "\n" + tail(work / "fallback.log")
        raise SystemExit(f"could not make clipjob weights:\n{logs}")
    extra = ["--preset", "tiny-cpu-scratch", *[x for s in TINY.clipjob_sets() for x in ("--set", s)]]
    return str(fallback), extra, f"same-size random clipjob model (convert failed: {tail(work / 'convert.log', 2)})"


def run_side(side: str, precision: str, rep: int, ctx: dict, a: argparse.Namespace) -> dict:
    out = ctx["work"] / f"{side}-{precision}-{rep}.json"
    out.unlink(missing_ok=True)
    if side == "clipjob":
        cmd = [str(CLIPJOB_PY), "-m", "clipjob", "eval", "zeroshot", "--checkpoint", ctx["ckpt"], *ctx["extra"],
               "--data", f"folder:{ctx['data']}", "--batch-size", str(a.batch_size), "--workers", str(a.workers),
               "--precision", precision, "--templates", str(ctx["templates"]), "--out", str(out)]
    else:
        cmd = [str(PEER_PY), str(Path(__file__).resolve()), "openclip-eval", "--config-dir", str(ctx["cfg_dir"]),
               "--weights", str(ctx["weights"]), "--data", str(ctx["data"]), "--batch-size", str(a.batch_size),
               "--workers", str(a.workers), "--precision", precision, "--templates", str(ctx["templates"]),
               "--threads", str(a.threads), "--out", str(out)]
    res = run_monitored(cmd, env=run_env(a.threads), log=ctx["work"] / f"{side}-{precision}-{rep}.log")
    if res["rc"] == 0 and out.exists():
        r = json.loads(out.read_text())
        r = r[0] if isinstance(r, list) else r
        res.update({k: r[k] for k in ("top1", "top5", "images", "seconds", "images_per_s")})
        res["images_per_s_wall"] = round(r["images"] / res["wall_s"], 2)
    else:
        res["log_tail"] = tail(ctx["work"] / f"{side}-{precision}-{rep}.log")
    return res


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    for name in ("openclip-init", "openclip-eval"):
        w = sub.add_parser(name)
        w.add_argument("--config-dir", required=True)
        w.add_argument("--weights", required=True)
        if name == "openclip-eval":
            for flag, tp in (("--data", str), ("--batch-size", int), ("--workers", int), ("--precision", str),
                             ("--templates", str), ("--threads", int), ("--out", str)):
                w.add_argument(flag, type=tp, required=True)
    ap.add_argument("--precisions", default=None, type=lambda s: s.split(","))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=100, help="Images per class (500 images ran 3-5 s: +-20 percent)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="eval", help="Result name under bench/results/ ('' = do not write)")
    a = ap.parse_args(argv)
    if getattr(a, "precisions", 0) is None:
        a.precisions = default_precisions()  # bf16 only where it is fast here
    exit_on_sigterm()
    if a.cmd == "openclip-init":
        return openclip_init(a)
    if a.cmd == "openclip-eval":
        return openclip_eval(a)

    work = TMP / "eval"
    work.mkdir(parents=True, exist_ok=True)
    data = make_folder(TMP / f"zeroshot-{len(CLASSES)}x{a.per_class}", a.per_class)
    templates = work / "templates.json"
    templates.write_text(json.dumps(TEMPLATES))
    cfg_dir = TINY.write_openclip_config(work / "model_configs").parent
    weights = work / "openclip-random.pt"
    r = run_monitored([str(PEER_PY), str(Path(__file__).resolve()), "openclip-init", "--config-dir", str(cfg_dir),
                       "--weights", str(weights)], env=run_env(a.threads), log=work / "init.log")
    if r["rc"] != 0:
        raise SystemExit(f"OpenCLIP model init failed:\n{tail(work / 'init.log')}")
    ckpt, extra, how = convert_weights(work, weights)
    ctx = {"work": work, "data": data, "templates": templates, "cfg_dir": cfg_dir, "weights": weights,
           "ckpt": ckpt, "extra": extra}
    runs: dict[str, dict[str, list[dict]]] = {}
    best: dict[str, dict[str, dict]] = {}
    for i, precision in enumerate(a.precisions):
        runs[precision] = {"clipjob": [], "openclip": []}
        for rep in range(a.repeats):
            order = ["clipjob", "openclip"] if (i + rep) % 2 == 0 else ["openclip", "clipjob"]
            for side in order:
                res = run_side(side, precision, rep, ctx, a)
                runs[precision][side].append(res)
                print(f"  eval  {precision:4s} {side:8s} run {rep + 1}: " + (
                    f"{res['images_per_s']:7.1f} images/s (top-1 {res['top1']:.1f}%), wall {res['wall_s']:.1f} s"
                    if "images_per_s" in res else f"FAILED (rc {res['rc']})\n{res.get('log_tail', '')}"), flush=True)
        best[precision] = {s: max(rs, key=lambda x: x.get("images_per_s", 0)) for s, rs in runs[precision].items()}
    out = {"what": "zero-shot classification throughput (images/s), clipjob eval zeroshot vs OpenCLIP zero-shot path",
           "machine": machine_info(), "versions": versions(), "model": TINY, "weights": how,
           "setup": {"data": str(data), "classes": len(CLASSES), "images": len(CLASSES) * a.per_class,
                     "image_px": "256..500 JPEG q90", "templates": TEMPLATES, "batch_size": a.batch_size,
                     "workers": a.workers, "threads": a.threads, "repeats": a.repeats},
           "best": best, "runs": runs,
           "ratios_clipjob_over_openclip": {
               p: {"images_per_s": ratio(b["clipjob"].get("images_per_s"), b["openclip"].get("images_per_s")),
                   "images_per_s_wall": ratio(b["clipjob"].get("images_per_s_wall"),
                                              b["openclip"].get("images_per_s_wall")),
                   "peak_tree_pss": ratio(b["clipjob"]["peak_tree_pss_mib"], b["openclip"]["peak_tree_pss_mib"])}
               for p, b in best.items()}}
    if a.out:
        write_result(a.out, out)
    return out


if __name__ == "__main__":
    main()
