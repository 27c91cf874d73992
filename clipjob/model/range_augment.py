"""RangeAugment (arXiv 2212.10553) as CoreNet's CLIP recipes use it: learnable magnitude ranges for
brightness, contrast and Gaussian noise, applied to the image batch on-device during training only.

Each step: the three operations run in a random order, each on a random half of the batch; a magnitude
m ~ U(low, high) is drawn per sample; the result is clipped to [0, 1]. `low` and `high` are learnable scalars
squashed into fixed bounds with a sigmoid. An auxiliary loss pulls the per-sample MSE (0-255 scale) between
augmented and clean images towards a target MSE that moves, on a cosine curriculum over training
(`set_progress`), from the MSE of 40 dB PSNR (6.5) to that of 20 dB (650), times alpha = 100 / 255^2.
The CLIP loss's gradients reach the ranges too.

Parameter names (`brightness._low`, ..., `noise._high`) equal CoreNet's `neural_augmentor.*` keys, so a CoreNet
checkpoint's ranges load 1:1 (raw, pre-sigmoid values).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# name: (raw init of low, raw init of high, bounds of low, bounds of high), as in CoreNet's "distribution" mode
RANGES: dict[str, tuple[float, float, tuple[float, float], tuple[float, float]]] = {
    "brightness": (0.5, 1.5, (0.1, 0.9), (1.1, 10.0)),
    "contrast": (0.5, 1.5, (0.1, 0.9), (1.1, 10.0)),
    "noise": (0.0, 0.1, (0.0, 5e-5), (1e-4, 1.0)),
}
ALPHA = 100.0 / 255.0**2
PSNR_START, PSNR_END = 40.0, 20.0


def squash(raw: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """sigmoid(raw) mapped into (lo, hi)."""
    lo, hi = bounds
    return torch.sigmoid(raw) * (hi - lo) + lo


class LearnableRange(nn.Module):
    """A uniform distribution U(low, high) with learnable, bounded ends."""

    def __init__(self, low: float, high: float, low_bounds: tuple[float, float], high_bounds: tuple[float, float]):
        super().__init__()
        self._low = nn.Parameter(torch.tensor(float(low)))
        self._high = nn.Parameter(torch.tensor(float(high)))
        self.low_bounds, self.high_bounds = low_bounds, high_bounds

    @property
    def low(self) -> torch.Tensor:
        return squash(self._low, self.low_bounds)

    @property
    def high(self) -> torch.Tensor:
        return squash(self._high, self.high_bounds)

    def sample(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(n, 1, 1, 1) magnitudes, differentiable w.r.t. the range ends."""
        u = torch.rand(n, 1, 1, 1, dtype=like.dtype, device=like.device)
        low, high = self.low.to(like.dtype), self.high.to(like.dtype)
        return low + u * (high - low)


def psnr_to_mse(psnr: float) -> float:
    """MSE on the 0-255 scale of a PSNR in dB: PSNR = 20 log10(255) - 10 log10(MSE)."""
    return 255.0**2 / 10.0 ** (psnr / 10.0)


def target_mse(progress: float, start_psnr: float = PSNR_START, end_psnr: float = PSNR_END) -> float:
    """The curriculum's target MSE at `progress` in [0, 1]: cosine from the MSE of `start_psnr` to the MSE of
    `end_psnr` (the interpolation runs over MSE values, as CoreNet's cosine_curriculum does)."""
    p = min(max(progress, 0.0), 1.0)
    lo, hi = psnr_to_mse(start_psnr), psnr_to_mse(end_psnr)
    return hi + 0.5 * (lo - hi) * (1.0 + math.cos(math.pi * p))


class RangeAugment(nn.Module):
    """`images, aux_loss = augmentor(images)`: images in [0, 1], (B, 3, H, W). Used in training only."""

    ORDER = ("brightness", "contrast", "noise")

    def __init__(self) -> None:
        super().__init__()
        for name in self.ORDER:
            setattr(self, name, LearnableRange(*RANGES[name]))
        # fraction of training done, driving the curriculum; a tensor so torch.compile does not recompile per step
        self.register_buffer("progress", torch.zeros(()), persistent=False)

    def set_progress(self, fraction: float) -> None:
        self.progress.fill_(min(max(float(fraction), 0.0), 1.0))

    def _augment(self, name: str, x: torch.Tensor) -> torch.Tensor:
        m = getattr(self, name).sample(x.shape[0], x)
        if name == "brightness":
            return x * m
        if name == "contrast":
            return (1.0 - m) * x.mean(dim=(-2, -1), keepdim=True) + m * x
        return x + torch.randn_like(x) * m

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images
        n = x.shape[0]
        k = max(1, n // 2)
        for i in torch.randperm(len(self.ORDER)).tolist():  # a random order each step
            ids = torch.randperm(n, device=x.device)[:k]  # a random half of the batch
            x = x.index_copy(0, ids, self._augment(self.ORDER[i], x.index_select(0, ids)))
        x = x.clamp(0.0, 1.0)
        return x, self.loss(images, x)

    def loss(self, clean: torch.Tensor, augmented: torch.Tensor) -> torch.Tensor:
        """alpha * smooth-L1(per-sample MSE on the 0-255 scale, target MSE of the curriculum's PSNR)."""
        mse = ((augmented.float() - clean.float()) * 255.0).pow(2).flatten(1).mean(1)
        lo, hi = psnr_to_mse(PSNR_START), psnr_to_mse(PSNR_END)
        target = hi + 0.5 * (lo - hi) * (1.0 + torch.cos(math.pi * self.progress.float()))  # = target_mse(progress)
        return ALPHA * F.smooth_l1_loss(mse, target.expand_as(mse))

    def extra_repr(self) -> str:
        if self.brightness._low.is_meta:
            return ""
        parts = [f"{n}=[{getattr(self, n).low.item():.3g}, {getattr(self, n).high.item():.3g}]" for n in self.ORDER]
        return ", ".join(parts) + f", target_mse={target_mse(self.progress.item()):.4g}"
