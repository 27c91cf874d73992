"""Image transforms. Output is always a float tensor in [0, 1]; normalisation (if any) is the model's job."""

from __future__ import annotations

from torchvision.transforms import v2 as T
import torch

BILINEAR = T.InterpolationMode.BILINEAR
BICUBIC = T.InterpolationMode.BICUBIC


def train_transform(size: int, scale: tuple[float, float]) -> T.Compose:
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=BILINEAR, antialias=True),
        T.ToDtype(torch.float32, scale=True),
    ])


def eval_transform(size: int, family: str = "openai") -> T.Compose:
    """Resize the shorter side to `size`, center crop: bicubic for OpenAI weights, bilinear for CoreNet."""
    interp = BILINEAR if family == "corenet" else BICUBIC
    return T.Compose([
        T.ToImage(),
        T.Resize(size, interpolation=interp, antialias=True),
        T.CenterCrop(size),
        T.ToDtype(torch.float32, scale=True),
    ])
