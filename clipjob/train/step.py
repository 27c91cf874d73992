"""One optimisation step: forward + backward (optionally over micro-batches with cached features), then
unscale, clip, optimizer step, logit-scale clamp. Pure torch: no I/O, no env.

Gradient accumulation keeps the whole contrastive batch (OpenCLIP's accum_freq): first the features of every
micro-batch are computed without grad and cached; then each micro-batch is recomputed with grad and the loss
is evaluated on [cached features of the others + fresh features of this one]. Each backward therefore
carries exactly the gradient that flows through this micro-batch's features, and their sum is the gradient
of the full-batch loss. Parameters the loss reaches directly (logit scale, SigLIP bias) get their gradient
from one micro-batch only, the last, which is also the one where DDP synchronises. Random draws inside the
model (RangeAugment) are replayed from the same RNG state in both passes so cached and fresh features agree.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from clipjob import dist
from clipjob.train.loss import at_least_fp32


@dataclass
class StepResult:
    loss: torch.Tensor  # the contrastive loss of the step (detached)
    aux_loss: torch.Tensor | None  # e.g. RangeAugment's curriculum loss, averaged over micro-batches
    logit_scale: torch.Tensor  # exp(log scale), detached


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _backward(total: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(total) if scaler is not None else total).backward()


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def forward_backward(net: nn.Module, model: nn.Module, loss_fn: nn.Module, images: torch.Tensor,
                     tokens: torch.Tensor, *, accum_steps: int, precision: str,
                     scaler: torch.amp.GradScaler | None, groups: torch.Tensor | None = None) -> StepResult:
    """Accumulate this step's gradients into .grad. `net` is the (DDP-wrapped) model used with grad; `model`
    the bare one, used for the no-grad caching pass. `groups`: the batch's loss groups (data.positives_key)."""
    if accum_steps == 1:
        with autocast(precision, images.device):
            out = net(images, tokens)
        img, txt, scale = (at_least_fp32(t) for t in (out.image_features, out.text_features, out.logit_scale))
        loss = loss_fn(img, txt, scale, groups=groups)
        total = loss if out.aux_loss is None else loss + at_least_fp32(out.aux_loss)
        _backward(total, scaler)
        aux = None if out.aux_loss is None else out.aux_loss.detach()
        return StepResult(loss.detach(), aux, out.logit_scale.detach())
    return _accumulate(net, model, loss_fn, images.chunk(accum_steps), tokens.chunk(accum_steps),
                       precision, scaler, groups)


def _accumulate(net, model, loss_fn, images: tuple[torch.Tensor, ...], tokens: tuple[torch.Tensor, ...],
                precision: str, scaler, groups: torch.Tensor | None = None) -> StepResult:
    device, k = images[0].device, len(images)
    # pass 1: every micro-batch's features, no grad, remembering the RNG state each one started from. Batch
    # norm (the CoreNet stem) normalises with batch statistics in both passes; its running statistics are put
    # back after this pass, so that each micro-batch updates them once (in pass 2), as without accumulation.
    rng, cached_img, cached_txt = [], [], []
    norm_stats = _batchnorm_buffers(model)
    with torch.no_grad():
        for x, t in zip(images, tokens):
            rng.append(_rng_state(device))
            with autocast(precision, device):
                out = model(x, t)
            cached_img.append(at_least_fp32(out.image_features))
            cached_txt.append(at_least_fp32(out.text_features))
        for live, saved in norm_stats:
            live.copy_(saved)
    # pass 2: recompute each micro-batch with grad against the cached others; DDP syncs on the last one
    aux_sum = None
    for j, (x, t) in enumerate(zip(images, tokens)):
        last = j == k - 1
        _set_rng_state(rng[j], device)
        sync = contextlib.nullcontext() if last or not isinstance(net, DDP) else net.no_sync()
        with sync:
            with autocast(precision, device):
                out = net(x, t)
            img = torch.cat(cached_img[:j] + [at_least_fp32(out.image_features)] + cached_img[j + 1:])
            txt = torch.cat(cached_txt[:j] + [at_least_fp32(out.text_features)] + cached_txt[j + 1:])
            scale = at_least_fp32(out.logit_scale) if last else at_least_fp32(out.logit_scale).detach()
            loss = loss_fn(img, txt, scale, learn_params=last, groups=groups)  # the whole batch's groups
            total = loss if out.aux_loss is None else loss + at_least_fp32(out.aux_loss) / k
            _backward(total, scaler)
        if out.aux_loss is not None:
            aux_sum = out.aux_loss.detach() / k + (aux_sum if aux_sum is not None else 0)
    return StepResult(loss.detach(), aux_sum, out.logit_scale.detach())


def _batchnorm_buffers(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) for the running statistics of every batch-norm layer in training mode."""
    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            out += [(b, b.detach().clone()) for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                    if b is not None]
    return out


def optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, params: list[torch.Tensor],
                   extra_params: list[torch.Tensor], grad_clip: float) -> torch.Tensor | None:
    """Average the gradients DDP does not see (loss parameters), unscale, clip, step, zero. Returns the
    global grad norm when clipping (before clipping; a 0-dim tensor on the device, read only when logged, so
    a GPU step does not wait for it), else None."""
    dist.average_grads(extra_params)
    if scaler is not None:
        scaler.unscale_(opt)
    norm = None
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params + extra_params, grad_clip).detach()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm
