"""CLIP: an image tower and a text tower projected into one space, plus a learnable temperature.

`encode_image` takes images in [0, 1] (the OpenAI ViT and the ResNet families normalise with mean/std inside
the model, so the data pipeline is the same for every family) and `encode_text` takes token ids; both return
L2-normalised features. `forward` returns one `CLIPOutput`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipjob.config import ModelConfig
from clipjob.model.efficientnet import EfficientNetLite
from clipjob.model.range_augment import RangeAugment
from clipjob.model.resnet import ModifiedResNet
from clipjob.model.text import MiniLMText, MiniLMTokenizer, TextTransformer, set_text_projection
from clipjob.model.vit import VisionTransformer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPOutput:
    image_features: torch.Tensor  # (B, E), L2-normalised
    text_features: torch.Tensor  # (B, E), L2-normalised
    logit_scale: torch.Tensor  # scalar, exp(log scale) clamped to [0, logit_scale_max]
    aux_loss: torch.Tensor | None = None  # e.g. RangeAugment's curriculum loss during training


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig, pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.members = cfg.ensemble  # model.ensemble: members' embeddings side by side (validated: LiT towers)
        if cfg.vision.family == "efficientnet-lite0":
            self.visual = EfficientNetLite(cfg.vision, cfg.embed_dim, pretrained=pretrained, members=self.members)
        else:
            tower = ModifiedResNet if cfg.vision.family == "resnet" else VisionTransformer
            self.visual = tower(cfg.vision, cfg.embed_dim)
        if cfg.text.kind == "minilm":
            self.text = MiniLMText(cfg.text, cfg.embed_dim * self.members, pretrained=pretrained)  # K projections
        else:
            self.text = TextTransformer(cfg.text, cfg.embed_dim)
            set_text_projection(self.text, cfg.text)  # LiT-style freeze: only the projection trains
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.image_augmentor = RangeAugment() if cfg.range_augment else None  # runs in training only
        normalise = cfg.vision.family in ("openai", "resnet")
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1) if normalise else None, persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1) if normalise else None, persistent=False)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for m in self.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = enabled

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            images = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return self.unit(self.visual(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.unit(self.text(tokens))

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalise embeddings; with model.ensemble=K each member's part separately, scaled by 1/sqrt(K):
        the whole is a unit vector again and a dot product is the mean of the members' cosines."""
        if self.members == 1:
            return F.normalize(x, dim=-1)
        parts = F.normalize(x.unflatten(-1, (self.members, -1)), dim=-1)
        return parts.flatten(-2) * self.members**-0.5

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(0, self.cfg.logit_scale_max)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> CLIPOutput:
        aux = None
        if self.image_augmentor is not None and self.training:
            images, aux = self.image_augmentor(images)
        return CLIPOutput(self.encode_image(images), self.encode_text(tokens), self.scale(), aux)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep exp(logit_scale) <= max after each optimizer step, as OpenCLIP does."""
        self.logit_scale.clamp_(0, math.log(self.cfg.logit_scale_max))


def build_model(cfg: ModelConfig, pretrained: bool = True) -> CLIP:
    """`pretrained`: load the shipped weights of the pretrained towers (MiniLM, EfficientNet-Lite0); False where a
    checkpoint overwrites them anyway (eval, conversion), so their packages need not be installed there."""
    return CLIP(cfg, pretrained=pretrained)


def build_tokenizer(cfg: ModelConfig):
    """The tokenizer that matches the text tower: callable texts -> LongTensor (N, context_length)."""
    if cfg.text.kind == "minilm":
        return MiniLMTokenizer(cfg.text.context_length)
    from clipjob.model.tokenizer import ClipTokenizer

    return ClipTokenizer(cfg.text.context_length)

