import math

import pytest
import torch
import torch.nn.functional as F

from clipjob.model import build_model
from clipjob.model.range_augment import ALPHA, RangeAugment, psnr_to_mse, target_mse

CORENET_KEYS = {f"{op}.{end}" for op in ("brightness", "contrast", "noise") for end in ("_low", "_high")}


# the tiny model (tests/conftest.py) with a wider vision tower at the preset's 48 px
WIDER_VISION = ["model.vision.width=64", "model.vision.image_size=48"]


def test_should_name_parameters_like_corenet_neural_augmentor():
    sd = RangeAugment().state_dict()
    assert set(sd) == CORENET_KEYS
    assert all(v.shape == () for v in sd.values())
    assert {k: round(v.item(), 6) for k, v in sd.items()} == {
        "brightness._low": 0.5, "brightness._high": 1.5, "contrast._low": 0.5, "contrast._high": 1.5,
        "noise._low": 0.0, "noise._high": 0.1}


@pytest.mark.parametrize("raw", [-50.0, 0.0, 50.0])
def test_should_keep_ranges_inside_their_bounds_when_raw_values_are_extreme(raw):
    aug = RangeAugment()
    bounds = {"brightness": ((0.1, 0.9), (1.1, 10.0)), "contrast": ((0.1, 0.9), (1.1, 10.0)),
              "noise": ((0.0, 5e-5), (1e-4, 1.0))}
    with torch.no_grad():
        for p in aug.parameters():
            p.fill_(raw)
    for name, ((llo, lhi), (hlo, hhi)) in bounds.items():
        r = getattr(aug, name)
        eps = 1e-6 * hhi  # float32 rounding at the ends
        assert llo - eps <= r.low.item() <= lhi + eps and hlo - eps <= r.high.item() <= hhi + eps
        expected_low = llo + (lhi - llo) / (1 + math.exp(-raw))
        assert math.isclose(r.low.item(), expected_low, rel_tol=1e-5, abs_tol=1e-9)


def _manual(name, aug, x, seed):
    """The operation written out from the paper's formulas, with the same random draws."""
    torch.manual_seed(seed)
    r = getattr(aug, name)
    m = r.low + torch.rand(x.shape[0], 1, 1, 1) * (r.high - r.low)
    if name == "brightness":
        return x * m
    if name == "contrast":
        return (1 - m) * x.mean(dim=(2, 3), keepdim=True) + m * x
    return x + torch.randn_like(x) * m


@pytest.mark.parametrize("name", ["brightness", "contrast", "noise"])
def test_should_apply_each_operation_with_a_per_sample_magnitude(name):
    aug = RangeAugment()
    x = torch.rand(4, 3, 8, 8)
    torch.manual_seed(3)
    got = aug._augment(name, x)
    torch.testing.assert_close(got, _manual(name, aug, x, 3))


@pytest.mark.parametrize("name", ["brightness", "contrast", "noise"])
def test_should_augment_exactly_half_of_the_batch_per_operation(name):
    aug = RangeAugment()
    aug.ORDER = (name,)
    with torch.no_grad():
        aug.noise._high.fill_(20.0)  # sigma up to 1: every noised sample changes visibly
    x = torch.rand(10, 3, 8, 8) * 0.5 + 0.25
    out, _ = aug(x)
    changed = (out != x).flatten(1).any(1)
    assert int(changed.sum()) == 5


def test_should_apply_all_operations_once_in_a_random_order():
    aug = RangeAugment()
    seen, orders = [], set()
    real = aug._augment

    def record(name, x):
        seen.append(name)
        return real(name, x)

    aug._augment = record
    for seed in range(12):
        torch.manual_seed(seed)
        seen.clear()
        aug(torch.rand(4, 3, 8, 8))
        assert sorted(seen) == ["brightness", "contrast", "noise"]
        orders.add(tuple(seen))
    assert len(orders) > 1


def test_should_clip_the_output_to_the_unit_range():
    aug = RangeAugment()
    with torch.no_grad():
        aug.brightness._high.fill_(20.0)  # up to 10x brighter
    out, _ = aug(torch.full((8, 3, 4, 4), 0.9))
    assert out.min() >= 0 and out.max() <= 1 and (out == 1).any()


def test_should_follow_the_psnr_curriculum_in_the_aux_loss():
    assert math.isclose(psnr_to_mse(40), 6.5025, rel_tol=1e-9)
    assert math.isclose(target_mse(0.0), 6.5025, rel_tol=1e-9)
    assert math.isclose(target_mse(1.0), 650.25, rel_tol=1e-9)
    assert math.isclose(target_mse(0.5), (6.5025 + 650.25) / 2, rel_tol=1e-9)
    assert target_mse(0.1) < target_mse(0.5) < target_mse(0.9)
    assert math.isclose(ALPHA, 100 / 65025)
    aug = RangeAugment()
    clean = torch.rand(6, 3, 8, 8)
    noisy = (clean + 0.05 * torch.randn_like(clean)).clamp(0, 1)
    for progress in (0.0, 0.3, 1.0):
        aug.set_progress(progress)
        mse = ((noisy - clean) * 255).pow(2).mean(dim=(1, 2, 3))
        want = 100 / 65025 * F.smooth_l1_loss(mse, torch.full((6,), target_mse(progress)))
        torch.testing.assert_close(aug.loss(clean, noisy), want)


def test_should_send_gradients_to_every_range_end():
    aug = RangeAugment()
    x = torch.rand(8, 3, 8, 8) * 0.5 + 0.25
    torch.manual_seed(0)
    out, aux = aug(x)
    (aux + out.mean()).backward()
    grads = {n: p.grad for n, p in aug.named_parameters()}
    assert set(grads) == CORENET_KEYS
    assert all(g is not None and torch.isfinite(g) and g != 0 for g in grads.values()), grads


def test_should_run_the_augmentor_inside_clip_in_training_only(tiny_cfg):
    torch.manual_seed(0)
    m = build_model(tiny_cfg(*WIDER_VISION, "model.range_augment=true").model).to("cpu")  # Module._apply still works
    assert isinstance(m.image_augmentor, RangeAugment)
    assert {k for k in m.state_dict() if k.startswith("image_augmentor.")} == {f"image_augmentor.{k}" for k in CORENET_KEYS}
    images, tokens = torch.rand(4, 3, 64, 64), torch.randint(1, 100, (4, 8))
    assert m.train()(images, tokens).aux_loss is not None
    out = m.eval()(images, tokens)
    assert out.aux_loss is None
    torch.testing.assert_close(out.image_features, m.encode_image(images))
    assert build_model(tiny_cfg(*WIDER_VISION).model).image_augmentor is None
