"""train/loss.py on one process: the losses against naive formulas, SigLIP's parameters and init.
(The two-process equivalence with the concatenated batch is in tests/integration/test_distributed.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipjob.train.loss import ContrastiveLoss, build_loss, clip_loss, siglip_loss


def _features(n: int = 6, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def test_should_equal_the_symmetric_infonce_formula_when_on_one_process():
    img, txt = _features()
    scale = torch.tensor(10.0, dtype=torch.float64)
    logits = scale * img @ txt.T
    n = len(img)
    ce_i = -sum(torch.log_softmax(logits[i], 0)[i] for i in range(n)) / n
    ce_t = -sum(torch.log_softmax(logits.T[i], 0)[i] for i in range(n)) / n
    assert clip_loss(img, txt, scale).item() == pytest.approx(0.5 * (ce_i + ce_t).item(), rel=1e-6)


def test_should_equal_the_sigmoid_pair_formula_when_on_one_process():
    img, txt = _features()
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    n = len(img)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = (scale * img[i] @ txt[j] + bias).item()
            y = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-y * z))
    assert siglip_loss(img, txt, scale, bias).item() == pytest.approx(total / n, rel=1e-6)


def test_should_hold_a_learnable_bias_initialised_to_minus_ten_when_siglip():
    loss = build_loss("siglip")
    assert loss.logit_bias is not None and loss.logit_bias.item() == -10.0 and loss.logit_bias.requires_grad
    assert list(loss.state_dict()) == ["logit_bias"]
    assert build_loss("clip").logit_bias is None and not list(build_loss("clip").parameters())
    with pytest.raises(ValueError):
        ContrastiveLoss("nope")


def test_should_keep_the_bias_out_of_backward_when_learn_params_is_false():
    img, txt = (f.float().requires_grad_() for f in _features())
    loss = build_loss("siglip")
    loss(img, txt, torch.tensor(10.0), learn_params=False).backward()
    assert loss.logit_bias.grad is None
    loss(img, txt, torch.tensor(10.0)).backward()
    assert loss.logit_bias.grad is not None and loss.logit_bias.grad.abs() > 0


def test_should_start_the_logit_scale_at_ln10_when_siglip_and_the_default_init(tiny_cfg):
    from clipjob import dist
    from clipjob.train.trainer import build_parts

    d = dist.DistInfo(0, 0, 1, torch.device("cpu"))
    parts = build_parts(tiny_cfg("train.loss=siglip"), d)
    assert parts.model.logit_scale.item() == pytest.approx(math.log(10))
    assert any(p is parts.loss_fn.logit_bias for g in parts.opt.param_groups for p in g["params"])
    custom = build_parts(tiny_cfg("train.loss=siglip", "model.logit_scale_init=1.5"), d)
    assert custom.model.logit_scale.item() == pytest.approx(1.5)
    assert build_parts(tiny_cfg(), d).model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    # resolved in the config, so the run's config.yaml says what ran
    assert tiny_cfg("train.loss=siglip").model.logit_scale_init == pytest.approx(math.log(10))


def test_should_equal_clips_loss_when_every_group_is_distinct():
    img, txt = _features()
    scale = torch.tensor(10.0, dtype=torch.float64)
    groups = torch.tensor([5, -3, 7, 11, 0, 2**40])
    assert clip_loss(img, txt, scale, groups).item() == pytest.approx(clip_loss(img, txt, scale).item(), rel=1e-9)
    bias = torch.tensor(-3.0, dtype=torch.float64)
    assert siglip_loss(img, txt, scale, bias, groups).item() == pytest.approx(
        siglip_loss(img, txt, scale, bias).item(), rel=1e-9)


def test_should_spread_each_rows_target_over_its_group_when_groups_repeat():
    """Rows 0, 2 and 5 share a group: each of their rows is a cross-entropy against 1/3 on each of the three
    columns (UniCL), the other rows against their own column; SigLIP counts every same-group pair positive."""
    img, txt = _features()
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    groups = torch.tensor([1, 2, 1, 3, 4, 1])
    n = len(img)
    members = [[j for j in range(n) if groups[j] == groups[i]] for i in range(n)]

    def ce(logits):
        return -sum(sum(torch.log_softmax(logits[i], 0)[j] for j in members[i]) / len(members[i])
                    for i in range(n)) / n

    logits = scale * img @ txt.T
    expected = 0.5 * (ce(logits) + ce(logits.T))
    got = clip_loss(img, txt, scale, groups)
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)
    assert got.item() != pytest.approx(clip_loss(img, txt, scale).item(), rel=1e-3)  # the targets did change
    total = sum(math.log1p(math.exp(-(1.0 if j in members[i] else -1.0) * (scale * img[i] @ txt[j] + bias).item()))
                for i in range(n) for j in range(n))
    assert siglip_loss(img, txt, scale, bias, groups).item() == pytest.approx(total / n, rel=1e-9)


def test_should_not_push_apart_two_pictures_of_one_concept_when_they_share_a_group():
    """Two identical images with two captions of one concept: CLIP's loss pushes each image away from the
    other's caption; with one group for both, both captions are targets of both copies, so the two copies
    get the same gradient: no target asks to tell identical pictures apart. (The loss value is the same either
    way for identical pictures: the two copies' log-probabilities are equal, only how they pair differs.)"""
    img, txt = _features(n=4)
    img = torch.cat([img[:1], img[:1], img[2:]]).requires_grad_()
    scale = torch.tensor(10.0, dtype=torch.float64)
    same = torch.tensor([9, 9, 1, 2])
    plain, grouped = clip_loss(img, txt, scale), clip_loss(img, txt, scale, same)
    assert grouped.item() == pytest.approx(plain.item(), rel=1e-12)
    (g_plain,) = torch.autograd.grad(plain, img)
    (g_grouped,) = torch.autograd.grad(clip_loss(img, txt, scale, same), img)
    # rows 0 and 1 are the same picture: with one group their targets (and so their gradients) are the same
    assert torch.allclose(g_grouped[0], g_grouped[1], atol=1e-12)
    assert not torch.allclose(g_plain[0], g_plain[1], atol=1e-6)
