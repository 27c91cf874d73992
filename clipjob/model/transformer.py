"""Pre-norm transformer blocks shared by the image and text towers. Attention goes through
torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels where available)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_HALF = (torch.bfloat16, torch.float16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention of (B, H, S, D) heads. On the CPU in bf16/fp16 it is two half-precision
    matmuls and a softmax written out (`matmul_attention`): there the CPU flash kernel is slower than that, and
    so is SDPA's own math backend, which copies q, k and v into new layouts several times per call
    (bench/README.md). In fp32 and on GPUs torch's scaled_dot_product_attention picks the kernel."""
    if q.device.type == "cpu" and q.dtype in _HALF and not torch.compiler.is_compiling():
        return matmul_attention(q, k, v, mask, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v on the strided (B, H, S, D) views the q|k|v projection gives, without
    copying them into new layouts first. `mask`: bool (True = attend) or additive float, broadcast to
    (B, H, Sq, Sk); `causal`: position i attends to positions <= i."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores.mul_(q.shape[-1] ** -0.5)  # in place: matmul's backward keeps its inputs, not its output
    if causal:
        sq, sk = scores.shape[-2:]
        scores.masked_fill_(torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu_(sk - sq + 1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(scores.softmax(-1), v)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class Attention(nn.Module):
    """Multi-head self-attention with a fused q|k|v projection."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = attention(q, k, v, mask, causal=self.causal and mask is None)
        return self.proj(o.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, act: str, eps: float, causal: bool = False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, causal)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), activation(act), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_token(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """`forward(x)[b, index[b]]` for each row b, computed for that one token: keys and values for the
        whole sequence, but the query, the output projection and the MLP only where they are read. A tower
        that pools one token (class token, EOT) needs nothing else from its last block."""
        b, s, d = x.shape
        rows = torch.arange(b, device=x.device)
        h = self.ln_1(x)
        w, bias = self.attn.qkv.weight, self.attn.qkv.bias
        q = F.linear(h[rows, index], w[:d], bias[:d])  # (B, D)
        kv = F.linear(h, w[d:], bias[d:])  # (B, S, 2D)
        heads = self.attn.heads
        k, v = kv.view(b, s, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
        mask = None
        if self.attn.causal:  # the token at position p sees positions <= p
            mask = (torch.arange(s, device=x.device)[None, :] <= index[:, None]).view(b, 1, 1, s)
        o = attention(q.view(b, heads, 1, d // heads), k, v, mask)
        y = x[rows, index] + self.attn.proj(o.reshape(b, d))
        return y + self.mlp(self.ln_2(y))


class Transformer(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, mlp_ratio: float, act: str, eps: float,
                 causal: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, act, eps, causal) for _ in range(layers))
        self.grad_checkpointing = False
        self.one_token_last_block = True  # False: the last block computes every token (FLOP counts, tests)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, D) -> (B, S, D); with `index` (B,) only the output token each row pools: (B, D), the last
        block computing just that token (Block.forward_token: 1/S of its token-wise work)."""
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        one_token = index is not None and self.one_token_last_block
        last = len(self.blocks) - 1 if one_token else len(self.blocks)
        for blk in self.blocks[:last]:
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        if index is None:
            return x
        if not one_token:
            return x[torch.arange(x.shape[0], device=x.device), index]
        blk = self.blocks[last]
        return checkpoint(blk.forward_token, x, index, use_reentrant=False) if ckpt else blk.forward_token(x, index)


def init_transformer(t: Transformer, width: int, layers: int) -> None:
    """OpenAI-style init: scaled normal for projections, so deep stacks start near identity."""
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    attn_std = width**-0.5
    fc_std = (2 * width) ** -0.5
    for blk in t.blocks:
        nn.init.normal_(blk.attn.qkv.weight, std=attn_std)
        nn.init.zeros_(blk.attn.qkv.bias)
        nn.init.normal_(blk.attn.proj.weight, std=proj_std)
        nn.init.zeros_(blk.attn.proj.bias)
        nn.init.normal_(blk.mlp[0].weight, std=fc_std)
        nn.init.normal_(blk.mlp[2].weight, std=proj_std)
