"""AdamW with the usual weight-decay exclusions and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from clipjob.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, extra: nn.Module | None = None) -> list[dict]:
    """No decay for 1-D parameters (biases, norms, scalars such as logit_scale, RangeAugment's ranges) and
    embeddings' tables. `extra` (the loss module: SigLIP's bias) trains alongside, never decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "logit_scale" in name or name.endswith("pos_embed") or "cls_token" in name \
            or "embedding" in name or ".ln" in name or "bn" in name
        (no_decay if skip else decay).append(p)
    if extra is not None:
        no_decay += [p for p in extra.parameters() if p.requires_grad]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters) on CUDA and on the CPU: on the CPU 3x faster than the
    per-parameter loop torch picks by default there (13 vs 43 ms for 22 M parameters on 2 cores)."""
    device = next(model.parameters()).device
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, extra), lr=cfg.lr, betas=cfg.betas,
                             eps=cfg.eps, fused=fused or None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from warmup_init_lr to lr, then cosine down to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * step / max(1, cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
