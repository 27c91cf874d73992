"""The FLOP model behind MFU: model FLOPs per sample from the config (forward ~ 2 * params * tokens + attention,
x3 for forward + backward; recomputation for grad checkpointing or cached accumulation features is not counted),
and the device's peak FLOP/s (`train.peak_flops`, else a table of GPUs, else a matmul timed at startup).
"""

from __future__ import annotations

import time

import torch

from clipjob.config import MINILM_LAYERS, ModelConfig, VisionConfig
from clipjob.model import efficientnet

# dense bf16/fp16 tensor-core peaks (FLOP/s) by device-name fragment, most specific first
GPU_PEAK_FLOPS = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
                  ("A10", 125e12), ("V100", 125e12)]
MINILM_DIMS = (384, MINILM_LAYERS, 4.0)  # width, layers, mlp ratio of the all-MiniLM-L6-v2 text tower



def transformer_flops(width: int, layers: int, mlp_ratio: float, tokens: int) -> float:
    """Forward FLOPs of one sequence: 2 FLOPs per weight per token (qkv, out-proj, MLP) + attention's
    QK^T and AV (2 * 2 * tokens^2 * width per layer)."""
    weights = layers * (4 + 2 * mlp_ratio) * width * width
    return 2 * weights * tokens + layers * 4 * tokens * tokens * width


def vit_flops(v: VisionConfig, embed_dim: int, image_size: int) -> float:
    """Forward FLOPs of one image through a ViT tower (either stem), its blocks and the projection."""
    if v.family == "corenet":
        mid, g = max(32, v.width // 4), image_size // 16
        stem = 2 * (3 * 16 * mid * (4 * g) ** 2 + mid * 4 * mid * (2 * g) ** 2 + mid * 4 * v.width * g * g)
    else:
        g = image_size // v.patch_size
        stem = 2 * 3 * v.patch_size**2 * v.width * g * g
    return stem + transformer_flops(v.width, v.layers, v.mlp_ratio, g * g + 1) + 2 * v.width * embed_dim


def resnet_flops(v: VisionConfig, embed_dim: int, image_size: int) -> float:
    """Forward FLOPs of one image through the ModifiedResNet tower (clipjob/model/resnet.py): its convs and
    linear layers at 2 FLOPs per multiply-add, plus the attention pool's one-query attention; BatchNorm,
    ReLU and the average pools are not counted (nor does torch's FlopCounterMode count them)."""
    w, half, r = v.width, v.width // 2, image_size // 2
    total = 2 * 9 * (3 * half + half * half + half * w) * r * r  # stem: three 3x3 convs at half resolution
    r, cin = r // 2, w  # the stem's 2x2 average pool
    for i, blocks in enumerate(v.resnet_layers):
        p = w * 2**i
        for j in range(blocks):
            r_out = r // 2 if i > 0 and j == 0 else r  # the block's average pool
            total += 2 * (cin * p + 9 * p * p) * r * r + 2 * p * 4 * p * r_out * r_out
            if cin != 4 * p or r_out != r:
                total += 2 * cin * 4 * p * r_out * r_out  # shortcut 1x1 conv (after its pool)
            r, cin = r_out, 4 * p
    tokens = r * r + 1  # the mean token + the spatial grid
    return total + 2 * cin * cin + 2 * tokens * cin * 2 * cin + 4 * tokens * cin + 2 * cin * embed_dim


def flops_per_sample(cfg: ModelConfig, image_size: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one image-caption pair at a resolution;
    a frozen tower costs its forward only, and a frozen MiniLM (cached features) nothing."""
    v, t, e = cfg.vision, cfg.text, cfg.embed_dim
    if v.family == "efficientnet-lite0":  # a frozen trunk costs its forward only (nothing with its feature cache:
        # the pictures return, as the MiniLM captions do); the head always trains
        trunk, head = efficientnet.trunk_flops(image_size), efficientnet.head_flops(v, e) * cfg.ensemble
        vision = (0 if v.feature_cache else trunk / 3 if v.freeze else trunk) + head
    else:
        vision = resnet_flops(v, e, image_size) if v.family == "resnet" else vit_flops(v, e, image_size)
    tw, tl, tm = MINILM_DIMS if t.kind == "minilm" else (t.width, t.layers, t.mlp_ratio)
    text = transformer_flops(tw, tl, tm, t.context_length) + 2 * tw * max(1, len(t.pool_layers)) * e
    if t.freeze and t.kind == "minilm":
        text = 0  # frozen MiniLM features are cached per caption: after the first epoch they cost nothing
    return 3 * vision + (1 if t.freeze else 3) * text


def peak_flops(device: torch.device, precision: str, configured: float = 0.0) -> float:
    """Peak FLOP/s of one device: the configured value, a known GPU's dense bf16/fp16 peak, or measured."""
    if configured > 0:
        return configured
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda" and precision != "fp32":
        name = torch.cuda.get_device_name(device)
        for fragment, value in GPU_PEAK_FLOPS:
            if fragment in name:
                return value
    return measure_matmul_flops(device, dtype)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul in this dtype on this device (a stand-in peak for CPUs and unknown GPUs): the
    fastest of repeated runs over ~`seconds` (a busy neighbour only slows some), at least one timed run.

    The size grows from 256 while a run of the next size (8x the work) still fits in `seconds`, up to 2048
    (4096 on a GPU), so a CPU with a fast kernel is measured at 2048² as before, and where a dtype has none (bf16
    on a CPU without AVX512-BF16 or AMX ran one 2048² matmul in ~65 s, 0.3 GFLOP/s, on an AVX2-only AMD EPYC) the
    measurement still takes a fraction of a second instead of minutes."""
    largest = 4096 if device.type == "cuda" else 2048
    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        _timed_matmul(a, b, device)  # warm-up (kernel selection, JIT)
        one = _timed_matmul(a, b, device)
        if n >= largest or 8 * one > seconds:  # twice the size is 8x the work: stay where a run fits the window
            break
        n *= 2
    best, t_end = one, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        best = min(best, _timed_matmul(a, b, device))
    return 2 * n**3 / best


def _timed_matmul(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    t0 = time.perf_counter()
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return max(time.perf_counter() - t0, 1e-9)


AUTO_BF16_MIN_SPEEDUP = 1.5  # train.precision=auto takes bf16 when its matmuls are at least this much faster


def choose_precision(device: torch.device, requested: str, measure=None) -> tuple[str, str]:
    """(precision, why) for train.precision: `auto` becomes bf16 on a GPU that supports it and on a CPU whose
    bf16 matmul runs at least AUTO_BF16_MIN_SPEEDUP x its fp32 one (measured here, up to 2048² for ~0.2 s
    each), else fp32; any other value stays as it is."""
    if requested != "auto":
        return requested, ""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bf16" if ok else "fp32"), f"{torch.cuda.get_device_name(device)} {'has' if ok else 'lacks'} bf16"
    measure = measure or measure_matmul_flops
    speedup = measure(device, torch.bfloat16, 0.2) / measure(device, torch.float32, 0.2)
    chosen = "bf16" if speedup >= AUTO_BF16_MIN_SPEEDUP else "fp32"
    return chosen, f"bf16 matmul {speedup:.2g}x fp32 on this CPU"
