"""Vision transformers for the image tower, in two families chosen by config:

- openai: patchify conv, class token + positional embedding on every token, ln_pre, 2-D (bicubic) positional
  resize at other resolutions (antialiased, as OpenCLIP); expects mean/std-normalised input.
- corenet: three-stage conv stem with BatchNorm, positional embedding on patch tokens only (the class token
  has none), no ln_pre, 1-D bilinear interpolation of the positional embedding over the flattened raster
  index at other resolutions; expects input in [0, 1].
Both pool the class token, apply a final LayerNorm and project with `x @ proj`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipjob.config import VisionConfig
from clipjob.model.transformer import Transformer, init_transformer


class ConvStem(nn.Module):
    """CoreNet's stem: conv4x4/s4 (pad 1) + BN + GELU, conv2x2/s2 + BN + GELU, conv2x2/s2 (bias): stride 16."""

    def __init__(self, width: int):
        super().__init__()
        mid = max(32, width // 4)
        self.conv1 = nn.Conv2d(3, mid, 4, stride=4, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 2, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, width, 2, stride=2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn1(self.conv1(x)))
        x = F.gelu(self.bn2(self.conv2(x)))
        return self.conv3(x)


def resize_pos_1d(pos: torch.Tensor, n: int) -> torch.Tensor:
    """CoreNet: (N, D) -> (n, D) by bilinear interpolation on the (1, 1, N, D) tensor (1-D over the index)."""
    if pos.shape[0] == n:
        return pos
    return F.interpolate(pos[None, None], size=(n, pos.shape[1]), mode="bilinear", align_corners=False)[0, 0]


def resize_pos_2d(pos: torch.Tensor, n: int) -> torch.Tensor:
    """OpenAI/OpenCLIP: (N, D) patch grid -> (n, D) by antialiased bicubic interpolation on the 2-D grid, as
    OpenCLIP's resize_pos_embed does (torch's antialiased bicubic uses PIL's kernel, a = -0.5, in both
    directions; without antialias it is a = -0.75, and features differed by 2e-4 to 1e-3)."""
    if pos.shape[0] == n:
        return pos
    g_old, g_new = int(math.isqrt(pos.shape[0])), int(math.isqrt(n))
    grid = pos.reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(n, -1)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.family = cfg.family
        w = cfg.width
        grid = cfg.image_size // (16 if cfg.family == "corenet" else cfg.patch_size)
        scale = w**-0.5
        if cfg.family == "corenet":
            self.stem = ConvStem(w)
            self.pos_embed = nn.Parameter(torch.randn(grid * grid, w) * 0.02)
            self.ln_pre = nn.Identity()
        else:
            self.stem = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
            self.pos_embed = nn.Parameter(torch.randn(grid * grid + 1, w) * scale)
            self.ln_pre = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.cls_token = nn.Parameter(torch.randn(w) * scale)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps)
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.proj = nn.Parameter(torch.randn(w, embed_dim) * scale)
        init_transformer(self.transformer, w, cfg.layers)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> token sequence (class token first) with positional embeddings, before the blocks."""
        x = self.stem(x).flatten(2).transpose(1, 2)  # (B, N, W)
        n = x.shape[1]
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        if self.family == "corenet":
            x = x + resize_pos_1d(self.pos_embed, n).to(x.dtype)
            return torch.cat([cls, x], dim=1)
        pos = torch.cat([self.pos_embed[:1], resize_pos_2d(self.pos_embed[1:], n)])
        return torch.cat([cls, x], dim=1) + pos.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_pre(self.tokens(x))
        cls = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.ln_post(self.transformer(x, cls)) @ self.proj  # the last block computes the class token only
