"""Image transforms. They end in a uint8 (3, H, W) tensor: DataLoader workers hand the trainer a quarter of
the bytes a float batch would be (shared memory between processes, then host-to-device), and the trainer
turns a batch into float [0, 1] on its device with `to_unit_float`. Normalisation is the model's job."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

BILINEAR = T.InterpolationMode.BILINEAR
BICUBIC = T.InterpolationMode.BICUBIC


@dataclass(frozen=True)
class Augment:
    """The optional training augmentations after the crop (data.color_jitter, grayscale_p, outline_p,
    background_p); all off by default."""
    color_jitter: float = 0.0
    grayscale_p: float = 0.0
    outline_p: float = 0.0
    background_p: float = 0.0

    @classmethod
    def of(cls, data) -> "Augment":
        return cls(**{f.name: getattr(data, f.name) for f in fields(cls)})


def train_transform(size: int, scale: tuple[float, float], augment: Augment = Augment()) -> "TrainTransform":
    """RandomResizedCrop, then (when asked) the drawing-style jitter, colour jitter on 80 % of images and grey
    with probability grayscale_p."""
    return TrainTransform(RandomResizedCrop(size, scale), augment_steps(augment))


class RandomResizedCrop:
    """The training crop: a box of `scale` of the area and aspect ratio 3/4..4/3, resized (bilinear, antialias)
    to `size` x `size`. It draws the same boxes as torchvision's v2 RandomResizedCrop from the same torch RNG
    state (the same calls, in the same order) and resizes with the same kernel, so its pictures are torchvision's
    bit for bit (tests/unit/test_transforms.py), without the v2 dispatch around one small picture (the emoji
    demo's crop, 72 px to 64: 0.282 against 0.365 ms per picture, one thread)."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        log_ratio = torch.log(torch.tensor(self.ratio))  # float32, as torchvision draws the aspect from
        self.log_ratio = (float(log_ratio[0]), float(log_ratio[1]))

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width): up to 10 tries at a random area and aspect ratio that fit, else the
        largest centred box within the ratio range."""
        area = height * width
        for _ in range(10):
            target = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect = math.exp(torch.empty(1).uniform_(*self.log_ratio).item())
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,)).item())
                left = int(torch.randint(0, width - w + 1, size=(1,)).item())
                return top, left, h, w
        ratio = width / height
        if ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        top, left, h, w = self.box(*img.shape[-2:])
        return TF.resized_crop_image(img, top, left, h, w, [self.size, self.size], interpolation=BILINEAR,
                                     antialias=True)


class TrainTransform:
    """A picture (PIL, or a uint8 (3, H, W) tensor) -> the crop -> the augmentations -> uint8 (3, size, size)."""

    def __init__(self, crop: RandomResizedCrop, steps: list[torch.nn.Module]):
        self.crop, self.steps = crop, steps

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(img, Image.Image):
            img = TF.pil_to_tensor(img)
        img = self.crop(img)
        for step in self.steps:
            img = step(img)
        return img


def augment_steps(augment: Augment) -> list[torch.nn.Module]:
    """The augmentations after the crop, on a uint8 (3, H, W) tensor on any device; their random decisions come
    from torch's CPU generator."""
    steps: list[torch.nn.Module] = []
    if augment.outline_p or augment.background_p:
        steps.append(StyleJitter(augment.outline_p, augment.background_p))
    if augment.color_jitter > 0:
        s = augment.color_jitter
        steps.append(T.RandomApply([T.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4))], p=0.8))
    if augment.grayscale_p > 0:
        steps.append(T.RandomGrayscale(p=augment.grayscale_p))
    return steps


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


class StyleJitter(torch.nn.Module):
    """Drawing-style augmentation for pictures on a white background (emoji, icons): with probability
    `outline_p` the colour edges are traced in black, 1-2 px thick (an outlined style from a flat one; a third
    of these keep only the lines, a line drawing); with
    probability `background_p` the white background becomes a random light colour. Works on uint8 (3, H, W)."""

    def __init__(self, outline_p: float = 0.0, background_p: float = 0.0):
        super().__init__()
        self.outline_p, self.background_p = outline_p, background_p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.outline_p and torch.rand(()) < self.outline_p:
            lines = outline(img, thickness=int(torch.randint(1, 3, ())))
            # a third of these become a line drawing: the traced edges alone, on white
            img = lines if torch.rand(()) >= 1 / 3 else torch.where((lines == 0).all(0), lines, torch.full_like(img, 255))
        if self.background_p and torch.rand(()) < self.background_p:
            white = (img >= 245).all(0, keepdim=True)
            colour = torch.randint(170, 256, (3, 1, 1), dtype=torch.uint8).to(img.device)
            img = torch.where(white, colour, img)
        return img


def outline(img: torch.Tensor, thickness: int = 1, threshold: float = 60.0) -> torch.Tensor:
    """Black lines where the colour changes by more than `threshold` (0..255, per-channel max of the
    horizontal/vertical difference), widened to `thickness` pixels."""
    x = img.to(torch.float32)
    dx = (x[:, :, 1:] - x[:, :, :-1]).abs().amax(0)
    dy = (x[:, 1:, :] - x[:, :-1, :]).abs().amax(0)
    edge = torch.zeros(img.shape[1:], dtype=torch.bool, device=img.device)
    edge[:, 1:] |= dx > threshold
    edge[1:, :] |= dy > threshold
    if thickness > 1:
        edge = torch.nn.functional.max_pool2d(edge[None, None].float(), 2 * thickness - 1, 1, thickness - 1)[0, 0] > 0
    return torch.where(edge, torch.zeros((), dtype=img.dtype), img)
