"""Contrastive losses. Pure torch; the distributed variant gathers features with an autograd-aware
all_gather and computes the "local" loss (local rows x all columns, labels offset by rank), which equals
the single-process loss on the concatenated batch, gradients included."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """All ranks' features concatenated along dim 0; gradients flow back to every rank's slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: 0.5 * (CE(image -> text) + CE(text -> image)) over the global batch.

    Each rank scores its local rows against all gathered columns. DDP averages gradients over ranks, so the
    gathered-loss gradient (which every rank computes for its own rows only) matches the full-batch one."""
    n = image_features.shape[0]
    all_img, all_txt = gather_features(image_features), gather_features(text_features)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = torch.arange(n, device=image_features.device) + n * rank
    logits_img = logit_scale * image_features @ all_txt.T
    logits_txt = logit_scale * text_features @ all_img.T
    return 0.5 * (F.cross_entropy(logits_img.float(), labels) + F.cross_entropy(logits_txt.float(), labels))


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """Sigmoid loss (SigLIP): every (image, text) pair is a binary problem; positives on the diagonal.
    Normalised by the local batch size, local rows against all gathered texts."""
    n = image_features.shape[0]
    all_txt = gather_features(text_features)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    logits = (logit_scale * image_features @ all_txt.T + logit_bias).float()
    targets = -torch.ones_like(logits)
    idx = torch.arange(n, device=logits.device)
    targets[idx, idx + n * rank] = 1.0
    return -F.logsigmoid(targets * logits).sum() / n
