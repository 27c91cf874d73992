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
