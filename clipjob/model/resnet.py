"""CLIP's ModifiedResNet image tower (model.vision.family=resnet), written from the CLIP paper's description:

- stem: three 3x3 convs (the first stride 2; widths w/2, w/2, w), each with BatchNorm + ReLU, then a 2x2
  average pool (stride 4 in all);
- four stages of bottleneck blocks (1x1, 3x3, 1x1 convs, expansion 4) with widths w, 2w, 4w, 8w; stages 2-4
  halve the resolution anti-aliased: an average pool before the block's last 1x1 conv (after the stride-1
  3x3), and in the shortcut an average pool before its 1x1 conv + BatchNorm (overall stride 32, 32w channels);
- an attention pool: the mean of the spatial tokens is prepended as a query token, a positional embedding is
  added to all tokens, one multi-head attention (query: the mean token; keys/values: every token) and the mean
  token's output is projected to embed_dim.

At other resolutions than model.vision.image_size (multi-scale training, eval.resolution) the spatial part of
the positional embedding is resized on its 2-D grid (antialiased bicubic, as the openai ViT family does); the
mean token's embedding stays. Input: mean/std-normalised like the openai family (CLIP.encode_image does it).
The tower runs channels_last (its input is converted; the convs follow): a bf16 training step of tiny-cpu-resnet
on the 2-core AVX512-BF16 AMD EPYC took ~1.5x as long with the default (NCHW) layout.

model.grad_checkpointing keeps only each bottleneck block's input for the backward and recomputes the block
there. The recomputation runs its BatchNorms with momentum 0 (and puts their batch counters back), so the running
statistics are updated once per step, as without checkpointing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipjob.config import VisionConfig
from clipjob.model.transformer import attention
from clipjob.model.vit import resize_pos_2d

EXPANSION = 4  # bottleneck output channels / its inner width
STRIDE = 32  # stem (4) x three downsampling stages (2 each)


def conv_bn(cin: int, cout: int, k: int) -> list[nn.Module]:
    """A bias-free k x k conv (stride 1, same padding) and its BatchNorm."""
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]


class Stem(nn.Module):
    """3x3/s2 conv (w/2), 3x3 conv (w/2), 3x3 conv (w), each + BN + ReLU, then a 2x2 average pool."""

    def __init__(self, width: int):
        super().__init__()
        half = width // 2
        first = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
        self.layers = nn.Sequential(first, nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                                    *conv_bn(half, half, 3), nn.ReLU(inplace=True),
                                    *conv_bn(half, width, 3), nn.ReLU(inplace=True), nn.AvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Bottleneck(nn.Module):
    """1x1 (planes) -> 3x3 (planes) -> [avg-pool when strided] -> 1x1 (4 planes), BN after each conv; the
    shortcut pools and projects (1x1 conv + BN) when the shape changes. ReLU after the sum."""

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * EXPANSION
        pool = [nn.AvgPool2d(stride)] if stride > 1 else []
        self.body = nn.Sequential(*conv_bn(cin, planes, 1), nn.ReLU(inplace=True),
                                  *conv_bn(planes, planes, 3), nn.ReLU(inplace=True),
                                  *pool, *conv_bn(planes, cout, 1))
        reshape = stride > 1 or cin != cout
        self.shortcut = nn.Sequential(*pool, *conv_bn(cin, cout, 1)) if reshape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x), inplace=True)


class AttentionPool(nn.Module):
    """Multi-head attention of the mean token (query) over [mean token, spatial tokens] (keys, values), with a
    positional embedding on every token; the mean token's output projected to `out_dim`."""

    def __init__(self, dim: int, grid: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.pos_embed = nn.Parameter(torch.randn(grid * grid + 1, dim) * dim**-0.5)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        pos = torch.cat([self.pos_embed[:1], resize_pos_2d(self.pos_embed[1:], x.shape[1])])
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pos.to(x.dtype)  # (B, 1 + HW, C)
        d = c // self.heads
        q = self.q(x[:, :1]).view(b, 1, self.heads, d).transpose(1, 2)  # only the mean token queries
        k, v = (t.view(b, -1, self.heads, d).transpose(1, 2) for t in self.kv(x).split(c, dim=-1))
        out = attention(q, k, v).transpose(1, 2).reshape(b, c)
        return self.proj(out)


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        w = cfg.width
        self.stem = Stem(w)
        stages, cin = [], w
        for i, blocks in enumerate(cfg.resnet_layers):
            planes = w * 2**i
            stage = [Bottleneck(cin if j == 0 else planes * EXPANSION, planes, 2 if i > 0 and j == 0 else 1)
                     for j in range(blocks)]
            stages.append(nn.Sequential(*stage))
            cin = planes * EXPANSION
        self.stages = nn.Sequential(*stages)
        self.attn_pool = AttentionPool(cin, cfg.image_size // STRIDE, cfg.heads, embed_dim)
        self.grad_checkpointing = False  # set by CLIP.set_grad_checkpointing (model.grad_checkpointing)
        self._init_weights(cin)

    def _init_weights(self, dim: int) -> None:
        """As CLIP: the attention pool's projections normal(std=dim^-0.5); each block's last BatchNorm scale
        zero, so every residual block starts as its shortcut; convs keep torch's default (Kaiming uniform)."""
        for lin in (self.attn_pool.q, self.attn_pool.kv, self.attn_pool.proj):
            nn.init.normal_(lin.weight, std=dim**-0.5)
            nn.init.zeros_(lin.bias)
        for block in self.stages.modules():
            if isinstance(block, Bottleneck):
                nn.init.zeros_(block.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for block in self.stages.modules():
                if isinstance(block, Bottleneck):
                    x = checkpoint(_first_call_updates_stats(block), x, use_reentrant=False)
        else:
            x = self.stages(x)
        return self.attn_pool(x)


def _first_call_updates_stats(block: nn.Module):
    """block's forward for torch's checkpoint: the first call (the forward) runs as usual, later ones (the
    recomputation in the backward) leave the BatchNorm running statistics and batch counters as they are."""
    calls = 0

    def run(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return block(x)
        with _frozen_stats(block):
            return block(x)
    return run


@contextlib.contextmanager
def _frozen_stats(module: nn.Module) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged; batch statistics still normalise
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
