"""Model FLOPs and MFU of one training step, clipjob vs OpenCLIP, on synthetic in-memory tensors.

    .venv/bin/python bench/mfu.py cpu                      # both tools, fp32 + bf16, 2 threads -> results/mfu.json
    .venv/bin/python bench/mfu.py peak --precision bf16    # this machine's matmul FLOP/s
    python bench/mfu.py step --side openclip --model vit-b-16 --device cuda --precision bf16 --batch 256 --compile
                                                           # one configuration, JSON on stdout (bench/gpu.sh)

FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward + backward (loss included, optimizer not) of
each tool's own model, built from the same ModelSpec (bench/common.py). The CPU's fused attention kernels
(_scaled_dot_product_flash_attention_for_cpu and its backward) have no formula in torch's table, so the same
formula as the CUDA kernels is registered for them (full, not causal-halved, attention, as torch counts it).
Steps: each tool's training step as its trainer runs it: clipjob's `forward_backward` + `optimizer_step`
(clipjob/train/step.py), OpenCLIP's body of `train_one_epoch` (autocast from open_clip_train.precision,
ClipLoss, AdamW with its weight-decay groups, zero_grad, logit-scale clamp). On the CPU both sides live in one
process and their timed steps are interleaved (ABBA...), so background load hits both alike; samples/s and
MFU use the median step time. MFU = FLOPs per step / step time / peak, where the peak is a large matmul
measured here in the same dtype and threads (CPU) or the device's dense bf16 peak (H200/H100: 989 TFLOP/s).
On the CPU a second MFU uses the peak at the model's own matmul shapes (bench/profile_step.py `shape_peak`:
every matmul of one step timed alone), what this CPU reaches on exactly these matrices.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import MODELS, ModelSpec, default_precisions, machine_info, ratio, write_result  # noqa: E402
from clipjob.train.flops import GPU_PEAK_FLOPS  # noqa: E402



# -- peak -----------------------------------------------------------------------------------------------------


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 0, seconds: float = 3.0) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` (repeated rounds, the best counts). On shared VMs the fp32 rate
    drifts by 1.5x from one second to the next (seen on the AMD EPYC of 2026-12-02: 106-167 GFLOP/s), so the
    callers measure before and after the timed steps and take the best: the machine's capability."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    c = a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        iters = 0
        _sync(device)
        t0 = time.perf_counter()
        while iters < 3 or time.perf_counter() - t0 < 0.2:
            c = a @ b
            iters += 1
        _sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    del c
    return best


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where it came from)."""
    if device.type == "cuda" and precision == "bf16":
        name = torch.cuda.get_device_name(device)
        for fragment, value in GPU_PEAK_FLOPS:  # the trainer's table (clipjob.train.flops)
            if fragment in name:
                return value, f"{fragment} dense bf16 spec"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_matmul_flops(device, dtype), f"measured {dtype} matmul, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the two tools' training steps ------------------------------------------------------------------------------


class Side:
    """One tool's model + loss + optimizer and its training step."""

    name: str
    model: torch.nn.Module

    def forward_backward(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        raise NotImplementedError


class ClipjobSide(Side):
    name = "clipjob"

    def __init__(self, spec: ModelSpec, device: torch.device, precision: str, compile_: bool):
        from clipjob.config import build_config
        from clipjob.model import build_model
        from clipjob.train.loss import build_loss
        from clipjob.train.optim import build_optimizer

        cfg = build_config("tiny-cpu-scratch", None, spec.clipjob_sets() + [
            f"train.precision={precision}", "train.lr=5e-4", "train.weight_decay=0.2"])
        self.cfg = cfg
        torch.manual_seed(0)
        self.model = build_model(cfg.model).to(device).train()
        self.loss_fn = build_loss("clip").to(device)
        self.opt = build_optimizer(self.model, cfg.train, self.loss_fn)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.precision, self.compile = precision, compile_

    def apply_compile(self) -> None:
        if self.compile:
            self.model.compile()  # as clipjob's trainer does (wrap_model: in place)

    def forward_backward(self, images, tokens):
        from clipjob.train.step import forward_backward

        forward_backward(self.model, self.model, self.loss_fn, images, tokens, accum_steps=1,
                         precision=self.precision, scaler=None)

    def step(self, images, tokens):
        from clipjob.train.step import optimizer_step

        self.forward_backward(images, tokens)
        optimizer_step(self.opt, None, self.params, list(self.loss_fn.parameters()), 0.0)
        self.model.clamp_logit_scale()


class OpenclipSide(Side):
    name = "openclip"

    def __init__(self, spec: ModelSpec, device: torch.device, precision: str, compile_: bool):
        import open_clip
        from open_clip.model import CLIP

        torch.manual_seed(0)
        self.model = CLIP(**spec.openclip_config(), output_dict=True).to(device).train()
        self.loss = open_clip.ClipLoss()
        # open_clip_train.main: no weight decay for gains, biases, norms, logit_scale
        named = list(self.model.named_parameters())
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        self.opt = torch.optim.AdamW(
            [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
             {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": 0.2}],
            lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
        try:
            from open_clip_train.precision import get_autocast

            self.autocast = get_autocast("amp_bf16" if precision == "bf16" else "fp32", device_type=device.type)
        except ImportError:  # the library without its training app: the same autocast by hand
            self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
                else __import__("contextlib").nullcontext
        self.compile = compile_
        self.net = self.model

    def apply_compile(self) -> None:
        if self.compile:
            self.net = torch.compile(self.model)  # as open_clip_train.main does with --torchcompile

    def forward_backward(self, images, tokens):
        with self.autocast():
            out = self.net(images, tokens)
            losses = self.loss(**out, output_dict=True)
            total = sum(losses.values())
        total.backward()

    def step(self, images, tokens):
        self.opt.zero_grad()
        self.forward_backward(images, tokens)
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))


SIDES = {"clipjob": ClipjobSide, "openclip": OpenclipSide}


def synthetic_batch(spec: ModelSpec, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, spec.image_size, spec.image_size, generator=g)
    tokens = torch.randint(1, spec.vocab_size - 1, (batch, spec.context_length), generator=g)
    return images.to(device), tokens.to(device)


# -- FLOPs --------------------------------------------------------------------------------------------------------


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_step_flops(side: Side, images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """FLOPs of one forward + backward (the optimizer is not counted), eager, grads cleared afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {}
    fwd, bwd = "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"
    if hasattr(aten, fwd) and hasattr(aten, bwd):
        custom = {getattr(aten, fwd): _cpu_sdpa_flop, getattr(aten, bwd): _cpu_sdpa_backward_flop}

    def count() -> FlopCounterMode:
        counter = FlopCounterMode(display=False, custom_mapping=custom)
        with counter:
            side.forward_backward(images, tokens)
        for p in side.model.parameters():
            p.grad = None
        return counter

    counter = count()
    executed = counter.get_total_flops()
    # The model's FLOPs, as MFU counts them: the full architecture. clipjob's towers skip the token-wise work
    # of their last block for tokens the pooling never reads (Transformer.one_token_last_block); counted with
    # that off, both tools' model FLOPs are equal, and the executed count is reported beside it.
    towers = {m: m.one_token_last_block for m in side.model.modules() if hasattr(m, "one_token_last_block")}
    for m in towers:
        m.one_token_last_block = False
    nominal = count().get_total_flops() if towers else executed
    for m, was in towers.items():
        m.one_token_last_block = was
    per_module = counter.get_flop_counts()
    return {"flops_per_step": nominal, "flops_per_sample": nominal / images.shape[0],
            "executed_flops_per_sample": executed / images.shape[0],
            "top_ops": {str(k): v for k, v in sorted(per_module.get("Global", {}).items(),
                                                        key=lambda kv: -kv[1])[:6]}}


# -- timing ------------------------------------------------------------------------------------------------------


def prepare(side_name: str, spec: ModelSpec, device: torch.device, precision: str, compile_: bool,
            images: torch.Tensor, tokens: torch.Tensor) -> tuple[Side, dict]:
    """Build one side and count its FLOPs (eager, before any compile)."""
    side = SIDES[side_name](spec, device, precision, compile_)
    flops = count_step_flops(side, images, tokens)
    side.apply_compile()
    return side, flops


def warm_up(side: Side, images: torch.Tensor, tokens: torch.Tensor, steps: int, device: torch.device) -> float | None:
    """`steps` untimed steps (compilation, allocator, oneDNN primitives); returns the first step's seconds."""
    first = None
    for i in range(steps):
        t0 = time.perf_counter()
        side.step(images, tokens)
        _sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    return first


def timed_steps(sides: dict[str, Side], images: torch.Tensor, tokens: torch.Tensor, steps: int,
                device: torch.device) -> dict[str, list[float]]:
    """Step times of each side, the sides interleaved step by step (ABBA...), so that background load on a
    shared machine hits both alike."""
    names, times = list(sides), {n: [] for n in sides}
    for i in range(steps):
        for n in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            sides[n].step(images, tokens)
            _sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def record(side_name: str, side: Side, spec: ModelSpec, device: torch.device, precision: str, batch: int,
           times: list[float], flops: dict, warmup: int, first_step_s: float | None, compile_: bool,
           peak: float, peak_source: str) -> dict:
    """One result. Samples/s and MFU use the median step time (robust to a stray slow step on a shared
    machine); the mean is reported beside it."""
    med, mean = statistics.median(times), sum(times) / len(times)
    rec = {"side": side_name, "model": spec.name, "device": str(device), "precision": precision, "batch": batch,
           "compile": compile_, "params": sum(p.numel() for p in side.model.parameters()),
           "steps_timed": len(times), "warmup_steps": warmup,
           "first_step_s": round(first_step_s, 3) if first_step_s is not None else None,
           "step_s_median": round(med, 4), "step_s_mean": round(mean, 4), "step_s_min": round(min(times), 4),
           "samples_per_s": round(batch / med, 2), "samples_per_s_mean": round(batch / mean, 2),
           **flops, "achieved_tflops": round(flops["flops_per_step"] / med / 1e12, 4),
           "peak_tflops": round(peak / 1e12, 4), "peak_source": peak_source,
           "mfu": round(flops["flops_per_step"] / med / peak, 4), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        rec["peak_mem_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        rec["gpu"] = torch.cuda.get_device_name(device)
    return rec


def run_config(side_name: str, spec: ModelSpec, device: torch.device, precision: str, batch: int, steps: int,
               warmup: int, compile_: bool) -> dict:
    """One side alone (bench/gpu.sh runs each configuration in its own process, for clean memory peaks)."""
    images, tokens = synthetic_batch(spec, batch, device)
    side, flops = prepare(side_name, spec, device, precision, compile_, images, tokens)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    first = warm_up(side, images, tokens, warmup, device)
    times = timed_steps({side_name: side}, images, tokens, steps, device)[side_name]
    peak, peak_source = device_peak(device, precision)
    return record(side_name, side, spec, device, precision, batch, times, flops, warmup, first, compile_, peak,
                  peak_source)


# -- CPU suite -------------------------------------------------------------------------------------------------------


def cpu_suite(args: argparse.Namespace) -> dict:
    """Both sides in one process, per precision: FLOPs, warm-up, then their steps interleaved. The process runs
    with clipjob's host-allocator setting (clipjob/hostmem.py), which both sides then share: this part
    compares the model code alone; the train part shows the allocator's share."""
    from clipjob.hostmem import tune_malloc

    host_malloc = "keep (clipjob/hostmem.py), both sides" if tune_malloc() else "glibc default, both sides"
    torch.set_num_threads(args.threads)
    device, spec = torch.device("cpu"), MODELS[args.model]
    images, tokens = synthetic_batch(spec, args.batch, device)
    runs: dict[str, dict[str, dict]] = {}
    peaks: dict[str, float] = {}
    for precision in args.precisions:
        peaks[precision] = measure_matmul_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
        source = f"measured {precision} 2048x2048 matmul, {args.threads} threads"
        sides, flops, first = {}, {}, {}
        for name in SIDES:
            sides[name], flops[name] = prepare(name, spec, device, precision, False, images, tokens)
            first[name] = warm_up(sides[name], images, tokens, args.warmup, device)
        times = timed_steps(sides, images, tokens, args.steps, device)
        after = measure_matmul_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
        source += f", best of before ({peaks[precision] / 1e9:.0f} GFLOP/s) and after ({after / 1e9:.0f}) the steps"
        peaks[precision] = max(peaks[precision], after)
        runs[precision] = {n: record(n, sides[n], spec, device, precision, args.batch, times[n], flops[n],
                                     args.warmup, first[n], False, peaks[precision], source) for n in sides}
        from bench.profile_step import model_shape_peak

        for n, rec in runs[precision].items():  # the peak this CPU reaches on the step's own matmul shapes
            shape_peak, shapes = model_shape_peak(sides[n], images, tokens, precision)
            rec["shape_peak_tflops"] = round(shape_peak / 1e12, 4)
            rec["mfu_vs_shape_peak"] = round(rec["flops_per_step"] / rec["step_s_median"] / shape_peak, 4)
            rec["matmul_shapes"] = shapes[:12]
        for n, rec in runs[precision].items():
            print(f"  mfu {precision:4s} {n:8s}: {rec['samples_per_s']:7.1f} samples/s (median of {args.steps} "
                  f"interleaved steps), {rec['flops_per_sample'] / 1e9:.3f} GFLOP/sample fwd+bwd, "
                  f"MFU {rec['mfu']:.3f} (vs its matmul shapes' peak of {rec['shape_peak_tflops'] * 1e3:.0f} "
                  f"GFLOP/s: {rec['mfu_vs_shape_peak']:.3f})", flush=True)
        del sides
    out = {"what": "isolated training step on synthetic tensors (no data pipeline): FLOPs, samples/s, MFU",
           "machine": machine_info(), "torch": torch.__version__, "model": spec, "batch": args.batch,
           "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "host_malloc": host_malloc,
           "peak_tflops": {p: round(v / 1e12, 4) for p, v in peaks.items()},
           "runs": runs,
           "ratios_clipjob_over_openclip": {p: {"samples_per_s": ratio(r["clipjob"]["samples_per_s"],
                                                                     r["openclip"]["samples_per_s"]),
                                                "mfu": ratio(r["clipjob"]["mfu"], r["openclip"]["mfu"]),
                                                "flops_per_sample": ratio(r["clipjob"]["flops_per_sample"],
                                                                          r["openclip"]["flops_per_sample"])}
                                            for p, r in runs.items()}}
    if args.out:
        write_result(args.out, out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cpu", help="both tools, each precision, on the CPU; writes bench/results/mfu.json")
    c.add_argument("--model", default="tiny", choices=sorted(MODELS))
    c.add_argument("--batch", type=int, default=128)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--steps", type=int, default=5)
    c.add_argument("--warmup", type=int, default=2)
    c.add_argument("--precisions", default=None, type=lambda s: s.split(","))
    c.add_argument("--out", default="mfu", help="result name under bench/results/ ('' = do not write)")
    p = sub.add_parser("peak", help="matmul FLOP/s of this device")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0)
    s = sub.add_parser("step", help="one tool, one configuration; JSON on stdout")
    s.add_argument("--side", required=True, choices=sorted(SIDES))
    s.add_argument("--model", default="vit-b-16", choices=sorted(MODELS))
    s.add_argument("--device", default="cuda")
    s.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    if getattr(args, "precisions", 0) is None:
        args.precisions = default_precisions()  # bf16 only where it is fast here
    if args.cmd == "cpu":
        cpu_suite(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.cmd == "peak":
        peak, src = device_peak(device, args.precision)
        print(json.dumps({"peak_tflops": round(peak / 1e12, 4), "source": src}))
        return
    rec = run_config(args.side, MODELS[args.model], device, args.precision, args.batch, args.steps, args.warmup,
                     args.compile)
    print(json.dumps(rec, default=str))


if __name__ == "__main__":
    main()
