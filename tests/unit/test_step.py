"""train/step.py: gradient accumulation with cached features equals the full batch, RNG replay for random
augmentation, precisions, grad checkpointing, clipping and the GradScaler path."""

from __future__ import annotations

import pytest
import torch

from clipjob.model import build_model
from clipjob.train.loss import build_loss
from clipjob.train.step import forward_backward, optimizer_step
from conftest import tiny_config

# the tiny model (tests/conftest.py) with two layers per tower and a 64-token vocabulary
TWO_LAYERS = ["model.vision.layers=2", "model.text.layers=2", "model.text.vocab_size=64"]


# Equalities that hold in exact arithmetic (accumulation = full batch, checkpointing = no checkpointing) are
# checked in float64: the two computations sum the same terms in different orders, and float64's rounding
# (eps 1.1e-16, over reductions of at most a few thousand terms) keeps their difference below 1e-12 of the
# gradient's scale on any CPU, while in float32 it reached 5e-6 on a Xeon (AMX kernels sum in other orders).
F64_RTOL, F64_ATOL = 1e-9, 1e-12


def _model(*extra: str, dtype: torch.dtype = torch.float32):
    cfg = tiny_config(*TWO_LAYERS, *extra)
    torch.manual_seed(0)
    return build_model(cfg.model).to(dtype)


def _batch(n: int = 8, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 16, 16, generator=g).to(dtype), torch.randint(1, 64, (n, 8), generator=g)


def _assert_same_grads(got: dict, ref: dict) -> None:
    assert set(got) == set(ref) and "logit_scale" in got
    for name in ref:
        scale = ref[name].abs().max().item() or 1.0  # the tensor's own magnitude
        torch.testing.assert_close(got[name], ref[name], rtol=F64_RTOL, atol=F64_ATOL * scale, msg=name)


def _grads(model, loss_fn, accum: int, precision: str = "fp32", extra=()):
    model.zero_grad(set_to_none=True)
    loss_fn.zero_grad(set_to_none=True)
    images, tokens = _batch(dtype=next(model.parameters()).dtype)
    torch.manual_seed(123)
    out = forward_backward(model, model, loss_fn, images, tokens, accum_steps=accum, precision=precision, scaler=None)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"loss.{n}": p.grad.clone() for n, p in loss_fn.named_parameters()})
    return out, grads


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("accum", [2, 4])
def test_should_give_the_full_batch_gradients_when_accumulating_with_cached_features(kind, accum):
    model, loss_fn = _model(dtype=torch.float64), build_loss(kind).double()
    ref_out, ref = _grads(model, loss_fn, 1)
    out, got = _grads(model, loss_fn, accum)
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(ref_out.loss.item(), rel=F64_RTOL)
    _assert_same_grads(got, ref)


def test_should_replay_random_augmentation_when_recomputing_a_micro_batch():
    """With RangeAugment (random per call) the grad pass must see the same draws as the caching pass, or the
    fresh features would not match the cached ones: the step's loss then equals the loss of pass 1 alone."""
    model, loss_fn = _model("model.range_augment=true"), build_loss("clip")
    model.train()
    images, tokens = _batch()
    torch.manual_seed(7)
    with torch.no_grad():
        outs = [model(x, t) for x, t in zip(images.chunk(2), tokens.chunk(2))]
    img = torch.cat([o.image_features for o in outs])
    txt = torch.cat([o.text_features for o in outs])
    expected = loss_fn(img, txt, outs[0].logit_scale).item()
    torch.manual_seed(7)
    out = forward_backward(model, model, loss_fn, images, tokens, accum_steps=2, precision="fp32", scaler=None)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.aux_loss is not None
    assert model.image_augmentor.brightness._low.grad is not None  # the CLIP and aux losses reach the ranges


def test_should_give_the_same_gradients_when_grad_checkpointing():
    model, loss_fn = _model(dtype=torch.float64), build_loss("clip").double()
    model.train()
    _, ref = _grads(model, loss_fn, 1)
    model.set_grad_checkpointing(True)
    _, got = _grads(model, loss_fn, 1)
    _assert_same_grads(got, ref)


def test_should_train_in_bf16_autocast_when_asked():
    model, loss_fn = _model(), build_loss("clip")
    out, grads = _grads(model, loss_fn, 2, precision="bf16")
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_should_step_through_the_grad_scaler_when_fp16():
    model, loss_fn = _model(), build_loss("siglip")
    opt = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = model.visual.proj.detach().clone()
    images, tokens = _batch()
    out = forward_backward(model, model, loss_fn, images, tokens, accum_steps=2, precision="fp16", scaler=scaler)
    assert torch.isfinite(out.loss)
    optimizer_step(opt, scaler, list(model.parameters()), list(loss_fn.parameters()), grad_clip=1.0)
    assert not torch.equal(before, model.visual.proj) and torch.isfinite(model.visual.proj).all()
    assert all(p.grad is None for p in model.parameters())


def test_should_clip_the_global_norm_when_grad_clip_is_set():
    lin = torch.nn.Linear(4, 4)
    extra = torch.nn.Parameter(torch.tensor(1.0))
    seen = {}
    opt = torch.optim.SGD(list(lin.parameters()) + [extra], lr=0.0)
    real_step = opt.step

    def spy():
        seen["norm"] = torch.norm(torch.stack([p.grad.norm() for p in [*lin.parameters(), extra]])).item()
        return real_step()

    opt.step = spy
    for p in [*lin.parameters(), extra]:
        p.grad = torch.full_like(p, 3.0)
    norm = optimizer_step(opt, None, list(lin.parameters()), [extra], grad_clip=0.5)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0  # stays on the device until logged: no sync
    assert float(norm) == pytest.approx(3.0 * (16 + 4 + 1) ** 0.5)
    assert seen["norm"] == pytest.approx(0.5, rel=1e-4)
    assert all(p.grad is None for p in [*lin.parameters(), extra])
    for p in [*lin.parameters(), extra]:
        p.grad = torch.full_like(p, 3.0)
    assert optimizer_step(opt, None, list(lin.parameters()), [extra], grad_clip=0.0) is None


def test_should_update_batchnorm_statistics_once_per_micro_batch_when_accumulating():
    """CoreNet's conv stem has BatchNorm: the caching pass must not move its running statistics, so they end
    where one forward per micro-batch leaves them (as if the micro-batches were trained one after another)."""
    model, loss_fn = _model("model.vision.family=corenet", "model.vision.patch_size=16"), build_loss("clip")
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    start = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    images, tokens = _batch()
    with torch.no_grad():  # the reference: each micro-batch through the model once
        for x, t in zip(images.chunk(2), tokens.chunk(2)):
            model(x, t)
    expected = {k: v.clone() for k, v in model.state_dict().items() if k in start}
    model.load_state_dict({**model.state_dict(), **start})
    forward_backward(model, model, loss_fn, images, tokens, accum_steps=2, precision="fp32", scaler=None)
    got = {k: v for k, v in model.state_dict().items() if k in start}
    assert int(got[next(k for k in got if "num_batches" in k)]) == 2
    for k in start:
        torch.testing.assert_close(got[k], expected[k], msg=k)
