"""Where a training step's time goes, by category of op, and the matmul peak at the model's own shapes.

    .venv/bin/python bench/profile_step.py                       # clipjob and OpenCLIP, bf16, TINY, batch 128
    .venv/bin/python bench/profile_step.py --precisions fp32,bf16 --sides clipjob --out ''

torch.profiler over `--steps` training steps of each side of bench/mfu.py (the isolated step on in-memory
tensors, after warm-up): the self CPU time of every aten op is put in one category (matmul, attention, norms,
elementwise, optimizer, copies and casts, other), so the shares add up to the profiled time. Ops that run
inside another op (the matmuls of a fused kernel) are counted once, in the category of the op that owns the
time (self time).

The shape peak: every matmul the step issues (aten::mm / addmm / bmm / baddbmm, with the shapes the profiler
recorded) is timed alone in the step's dtype and threads (best of several rounds); the model-shape peak is the
step's matmul FLOPs / the sum of those isolated times, i.e. the FLOP/s this CPU reaches on exactly these
matrices. Small or skinny matrices run far below the 2048² peak; an MFU against the shape peak says how much
of what is reachable the step reaches. Writes bench/results/profile.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import MODELS, machine_info, write_result  # noqa: E402

CATEGORIES = (
    ("optimizer", re.compile(r"adam|_foreach_|clamp_|lerp|addcdiv|addcmul|sqrt|maximum|norm_except|fused")),
    ("matmul", re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_convolution|convolution|mkldnn_|"
                          r"convolution_backward|_mkldnn|onednn)")),
    ("attention", re.compile(r"scaled_dot_product|softmax|_flash_attention|masked_fill|tril|triu")),
    ("norms", re.compile(r"layer_norm|batch_norm|group_norm|native_norm")),
    ("copies and casts", re.compile(r"copy_|_to_copy|^aten::to$|clone|contiguous|cat$|stack|fill_|zero_|zeros|"
                                    r"empty|index|gather|scatter|embedding|transpose|permute|view|reshape|expand|"
                                    r"split|chunk|select|slice|narrow|as_strided|unbind|t$|_unsafe_view|detach")),
    ("elementwise", re.compile(r"gelu|add|mul|div|sub|exp|log|neg|sum|mean|pow|rsqrt|tanh|sigmoid|where|"
                               r"threshold|relu|max|min|abs|sign|argmax|eq|ne|lt|gt|ones|arange|rand|normal")),
)
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def category(name: str) -> str:
    if name.startswith("Optimizer.") or "adam" in name.lower():
        return "optimizer"
    for cat, pattern in CATEGORIES:
        if pattern.search(name):
            return cat
    return "other"


def _matmul_dims(name: str, shapes: list) -> tuple[int, int, int, int] | None:
    """(batch, m, k, n) of one matmul op from its recorded input shapes."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 1, m, k, n
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 1, m, k, n
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return b, m, k, n
        if name == "aten::baddbmm":
            (b, m, k), (_, _, n) = shapes[1], shapes[2]
            return b, m, k, n
    except (ValueError, TypeError, IndexError):
        return None
    return None


def time_matmul(b: int, m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Best seconds per call of a (b x) m x k @ k x n matmul in `dtype`."""
    a = torch.randn(b, m, k).to(dtype) if b > 1 else torch.randn(m, k).to(dtype)
    w = torch.randn(b, k, n).to(dtype) if b > 1 else torch.randn(k, n).to(dtype)
    out = a @ w
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        reps, t0 = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - t0 < 0.02:
            out = a @ w
            reps += 1
        best = min(best, (time.perf_counter() - t0) / reps)
    del out
    return best


def profile_steps(side, images: torch.Tensor, tokens: torch.Tensor, steps: int):
    """torch.profiler (CPU, shapes recorded) over `steps` training steps; returns (profile, seconds per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            side.step(images, tokens)
        wall = (time.perf_counter() - t0) / steps
    return prof, wall


def matmul_calls(prof, steps: int) -> Counter:
    """(b, m, k, n) -> calls per step of every matmul in a profile."""
    calls: Counter = Counter()
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in MATMUL_OPS:
            dims = _matmul_dims(e.key, e.input_shapes)
            if dims:
                calls[dims] += e.count / steps
    return calls


def shape_peak(calls: Counter, dtype: torch.dtype, seconds: float = 0.3) -> tuple[float, list[dict]]:
    """(FLOP/s, per-shape rows): the step's matmul FLOPs over the sum of its matmuls timed alone."""
    flops = secs = 0.0
    rows = []
    for (b, m, k, n), c in sorted(calls.items(), key=lambda kv: -kv[1] * kv[0][0] * kv[0][1] * kv[0][2] * kv[0][3]):
        t = time_matmul(b, m, k, n, dtype, seconds)
        f = 2 * b * m * k * n
        flops, secs = flops + f * c, secs + t * c
        rows.append({"b": b, "m": m, "k": k, "n": n, "calls_per_step": round(c, 2),
                     "gflops_per_s_alone": round(f / t / 1e9, 1)})
    return (flops / secs if secs else 0.0), rows


def model_shape_peak(side, images: torch.Tensor, tokens: torch.Tensor, precision: str) -> tuple[float, list[dict]]:
    """The matmul peak at the shapes one training step of `side` issues (one profiled step)."""
    prof, _ = profile_steps(side, images, tokens, 1)
    return shape_peak(matmul_calls(prof, 1), torch.bfloat16 if precision == "bf16" else torch.float32)


def profile_side(side_name: str, precision: str, batch: int, steps: int, warmup: int) -> dict:
    from bench.mfu import SIDES, count_step_flops, synthetic_batch, warm_up

    spec, device = MODELS["tiny"], torch.device("cpu")
    images, tokens = synthetic_batch(spec, batch, device)
    side = SIDES[side_name](spec, device, precision, False)
    flops = count_step_flops(side, images, tokens)
    warm_up(side, images, tokens, warmup, device)
    prof, wall = profile_steps(side, images, tokens, steps)
    by_cat: Counter = Counter()
    by_op: Counter = Counter()
    for e in prof.key_averages():
        self_s = e.self_cpu_time_total / 1e6 / steps
        by_cat[category(e.key)] += self_s
        by_op[e.key] += self_s
    peak, shapes = shape_peak(matmul_calls(prof, steps), torch.bfloat16 if precision == "bf16" else torch.float32)
    profiled = sum(by_cat.values())
    return {
        "side": side_name, "precision": precision, "batch": batch, "threads": torch.get_num_threads(),
        "step_s": round(wall, 4), "profiled_s_per_step": round(profiled, 4),
        "flops_per_step": flops["flops_per_step"], "executed_flops_per_step": flops["executed_flops_per_sample"] * batch,
        "by_category_s": {k: round(v, 4) for k, v in by_cat.most_common()},
        "by_category_share": {k: round(v / profiled, 3) for k, v in by_cat.most_common()},
        "top_ops_s": {k: round(v, 4) for k, v in by_op.most_common(15)},
        "shape_peak_gflops": round(peak / 1e9, 1),
        "mfu_vs_shape_peak": round(flops["flops_per_step"] / wall / peak, 4) if peak else None,
        "matmul_shapes": shapes[:20],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default="bf16", type=lambda s: s.split(","))
    ap.add_argument("--sides", default="clipjob,openclip", type=lambda s: s.split(","))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="profile", help="Result name under bench/results/ ('' = do not write)")
    a = ap.parse_args(argv)
    from clipjob.hostmem import tune_malloc

    tune_malloc()
    torch.set_num_threads(a.threads)
    from bench.mfu import measure_matmul_flops

    runs = []
    for precision in a.precisions:
        for side in a.sides:
            try:
                runs.append(profile_side(side, precision, a.batch, a.steps, a.warmup))
            except ImportError as e:  # OpenCLIP lives in .venv-bench; clipjob's venv may not have it
                runs.append({"side": side, "precision": precision, "skipped": str(e)})
    peak2048 = {p: round(measure_matmul_flops(torch.device("cpu"), torch.bfloat16 if p == "bf16" else torch.float32,
                                              seconds=2.0) / 1e9, 1) for p in a.precisions}
    result = {"machine": machine_info(), "peak_2048_gflops": peak2048, "runs": runs}
    for r in runs:
        if "skipped" in r:
            print(f"{r['side']} {r['precision']}: skipped ({r['skipped']})")
            continue
        cats = ", ".join(f"{k} {v:.0%}" for k, v in r["by_category_share"].items())
        print(f"{r['side']:8s} {r['precision']}: step {r['step_s'] * 1e3:.0f} ms, {cats}; matmul shape peak "
              f"{r['shape_peak_gflops']:.0f} GFLOP/s (2048²: {peak2048[r['precision']]:.0f}), "
              f"MFU vs shape peak {r['mfu_vs_shape_peak']:.3f}")
    if a.out:
        write_result(a.out, result)
    return result


if __name__ == "__main__":
    main()
