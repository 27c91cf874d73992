"""Image transforms. They end in a uint8 (3, H, W) tensor: DataLoader workers hand the trainer a quarter of
the bytes a float batch would be (shared memory between processes, then host-to-device), and the trainer
turns a batch into float [0, 1] on its device with `to_unit_float`. Normalisation is the model's job."""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

BILINEAR = T.InterpolationMode.BILINEAR
BICUBIC = T.InterpolationMode.BICUBIC


def train_transform(size: int, scale: tuple[float, float], color_jitter: float = 0.0,
                    grayscale_p: float = 0.0) -> T.Compose:
    """RandomResizedCrop, then (when asked) colour jitter on 80 % of images and grey with probability p."""
    steps = [T.ToImage(),
             T.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=BILINEAR, antialias=True)]
    if color_jitter > 0:
        s = color_jitter
        steps.append(T.RandomApply([T.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4))], p=0.8))
    if grayscale_p > 0:
        steps.append(T.RandomGrayscale(p=grayscale_p))
    return T.Compose(steps)


def eval_transform(size: int, family: str = "openai") -> T.Compose:
    """Resize the shorter side to `size`, center crop: bicubic for OpenAI weights, bilinear for CoreNet."""
    interp = BILINEAR if family == "corenet" else BICUBIC
    return T.Compose([
        T.ToImage(),
        T.Resize(size, interpolation=interp, antialias=True),
        T.CenterCrop(size),
    ])


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """A uint8 image batch -> float32 in [0, 1] (what the transforms used to end with: ToDtype(scale=True)),
    on the batch's device; float batches pass through."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255)
    return images
