"""Exponential moving average of the model weights (CoreNet: momentum 0.0005 per step).

    ema = (1 - m) * ema + m * w        for floating-point parameters and buffers, after every optimizer step
    ema = w                            for integer buffers (BatchNorm's num_batches_tracked)

The EMA is kept in fp32 on the training device; it is written as `ema.safetensors` next to
`model.safetensors` in each checkpoint (same keys, so any evaluator can load it: `clipjob eval zeroshot --ema`).
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, momentum: float):
        if not 0 < momentum < 1:
            raise ValueError(f"EMA momentum must be in (0, 1), got {momentum}")
        self.momentum = momentum
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.shadow[k] for k in floats],
                             [current[k].detach().float() for k in floats], self.momentum)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(current[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        unexpected = set(state) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)
