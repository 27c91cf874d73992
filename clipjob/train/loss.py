"""Contrastive losses. Pure torch; no I/O, no env.

Distributed: features are gathered with an autograd-aware all_gather and each rank computes the "local" loss
(its own rows against all gathered columns, labels offset by rank). With n rows per rank and W ranks the
global loss is the mean of the W local losses, and the gradient math works out exactly:
  - all_gather's backward sums, over ranks, the gradients every local loss sends to each rank's slice, so rank
    r's features receive d(sum_r' L_r')/d f_r;
  - DDP then averages parameter gradients over ranks: (1/W) sum_r d(sum_r' L_r')/d theta|via f_r
    = d((1/W) sum_r' L_r')/d theta = d L_global / d theta.
So loss and gradients equal the single-process loss on the concatenated batch (tests/integration/
test_distributed.py checks both). Without the local-loss labels, gathering with grad would scale gradients by W.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

SIGLIP_LOGIT_BIAS_INIT = -10.0  # SigLIP paper / OpenCLIP (the logit scale starts at ln 10: config.resolve)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision values (autocast output) up to fp32 for the loss; fp32 and fp64 stay as they are (a
    float64 model computes its loss in float64: the gradient tests compare against that exact arithmetic)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# newer torch calls them *_single and warns on every call of the *_tensor names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each rank's slice of the output gradient over all ranks (a
    reduce-scatter; gloo has none, so there an all-reduce followed by taking the own slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        n = grad.shape[0] // world
        if dist.get_backend() == "nccl":
            out = grad.new_empty((n, *grad.shape[1:]))
            _reduce_scatter(out, grad.contiguous())
            return out
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total[rank * n:(rank + 1) * n]


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """All ranks' features concatenated along dim 0 (rank order); gradients flow back to every rank's slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_groups(groups: torch.Tensor) -> torch.Tensor:
    """All ranks' group ids concatenated in rank order (no gradient: ids are labels)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return groups
    out = groups.new_empty((dist.get_world_size() * groups.shape[0],))
    _all_gather(out, groups.contiguous())
    return out


def _positives(n: int, groups: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(diagonal labels: each local row's own column, the local rows x global columns same-group mask or None).
    Without groups the mask is None: each row's only positive is its own pair."""
    labels = torch.arange(n, device=device) + n * _rank()
    if groups is None:
        return labels, None
    groups = groups.to(device)
    return labels, groups[:, None] == gather_groups(groups)[None, :]


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              groups: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: 0.5 * (CE(image -> text) + CE(text -> image)), local rows x global columns.

    With `groups` (one int64 id per local sample, `data.positives_key`), the target of each row is spread
    evenly over every column of its group (UniCL's multi-positive InfoNCE): two pictures of one concept in a
    batch are no longer pushed apart as negatives of each other's captions. All-distinct groups give CLIP's loss."""
    n = image_features.shape[0]
    all_img, all_txt = gather_features(image_features), gather_features(text_features)
    labels, same = _positives(n, groups, image_features.device)
    if same is not None:
        labels = same.to(at_least_fp32(image_features).dtype)
        labels = labels / labels.sum(dim=1, keepdim=True)  # each row holds its own pair: the sum is >= 1
    logits_img = logit_scale * image_features @ all_txt.T
    logits_txt = logit_scale * text_features @ all_img.T
    return 0.5 * (F.cross_entropy(at_least_fp32(logits_img), labels) + F.cross_entropy(at_least_fp32(logits_txt), labels))


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid loss (SigLIP): every (image, text) pair is a binary problem; positives on the diagonal (and,
    with `groups`, every pair of one group). Local images against all gathered texts, normalised by the local
    batch size, so the global loss (normalised by the global batch) is again the mean of the local ones."""
    n = image_features.shape[0]
    all_txt = gather_features(text_features)
    logits = at_least_fp32(logit_scale * image_features @ all_txt.T + logit_bias)
    labels, same = _positives(n, groups, logits.device)
    targets = -torch.ones_like(logits)
    if same is not None:
        targets[same] = 1.0
    targets[torch.arange(n, device=logits.device), labels] = 1.0
    return -F.logsigmoid(targets * logits).sum() / n


class ContrastiveLoss(nn.Module):
    """`train.loss` as a module. SigLIP's learnable logit bias lives here: it trains with the model (same
    optimizer, no weight decay), its gradient is averaged over ranks by the trainer (it is outside DDP), and
    its state is saved in the checkpoint's train state."""

    def __init__(self, kind: str = "clip", members: int = 1):
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"unknown loss {kind!r}")
        self.kind, self.members = kind, members
        self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_LOGIT_BIAS_INIT)) if kind == "siglip" else None

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                learn_params: bool = True, groups: torch.Tensor | None = None) -> torch.Tensor:
        """`learn_params=False` keeps the loss's own parameters out of this backward (used by gradient
        accumulation, where the full loss is evaluated once per micro-batch but must count once). `groups`:
        one id per row, rows of one id are positives of each other (data.positives_key); None = CLIP's pairs.
        With `members` > 1 (model.ensemble) the features are that many unit vectors side by side, each scaled by
        1/sqrt(members) (CLIP.unit): the loss is the mean of each member's own loss, so a member's gradient comes
        from its own loss only (the logit scale and SigLIP's bias are shared)."""
        if self.members > 1:
            k = self.members
            return torch.stack([self._one(i * k**0.5, t * k**0.5, logit_scale, learn_params, groups)
                                for i, t in zip(image_features.chunk(k, -1), text_features.chunk(k, -1))]).mean()
        return self._one(image_features, text_features, logit_scale, learn_params, groups)

    def _one(self, image_features, text_features, logit_scale, learn_params, groups) -> torch.Tensor:
        if self.logit_bias is None:
            return clip_loss(image_features, text_features, logit_scale, groups)
        bias = self.logit_bias if learn_params else self.logit_bias.detach()
        return siglip_loss(image_features, text_features, logit_scale, bias, groups)


def build_loss(kind: str, members: int = 1) -> ContrastiveLoss:
    """`members`: model.ensemble."""
    return ContrastiveLoss(kind, members)
