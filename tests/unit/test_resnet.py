"""model/resnet.py: CLIP's ModifiedResNet image tower (model.vision.family=resnet): shapes, the attention pool
against a written-out softmax attention, the positional embedding at other resolutions, the residual init,
forward/backward, its config errors, a checkpoint round trip and the preset."""

from __future__ import annotations

import math

import pytest
import torch

from clipjob.config import build_config, to_yaml
from clipjob.errors import ConfigError
from clipjob.model import build_model
from clipjob.model.resnet import AttentionPool, Bottleneck, ModifiedResNet

RESNET = ["model.vision.family=resnet", "model.vision.width=8", "model.vision.heads=4",
          "model.vision.resnet_layers=[1,2,1,1]", "model.vision.image_size=64", "model.text.width=32",
          "model.text.layers=1", "model.text.heads=2", "model.text.context_length=8", "model.embed_dim=16",
          "model.text.vocab_size=64"]


def resnet_config(*sets: str):
    return build_config("tiny-cpu-scratch", None, [*RESNET, *sets])


def naive_pool(pool: AttentionPool, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The attention pool written out: mean token first, `pos` added, softmax(q k^T / sqrt(d)) v per head."""
    b, c = x.shape[:2]
    tokens = x.flatten(2).transpose(1, 2)
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + pos
    h, d = pool.heads, c // pool.heads
    q = pool.q(tokens[:, :1]).view(b, 1, h, d).transpose(1, 2)
    k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in pool.kv(tokens).split(c, -1))
    attn = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return pool.proj((attn @ v).transpose(1, 2).reshape(b, c))


def test_should_give_clip_widths_and_a_stride_of_32_when_built():
    cfg = resnet_config().model
    tower = ModifiedResNet(cfg.vision, cfg.embed_dim).eval()
    x = torch.rand(2, 3, 64, 64)
    stem = tower.stem(x)
    assert stem.shape == (2, 8, 16, 16)  # stride 4, stem width
    shapes = []
    for stage in tower.stages:
        stem = stage(stem)
        shapes.append(tuple(stem.shape))
    # stages w, 2w, 4w, 8w wide, 4x expansion; the first stage keeps the resolution, the others halve it
    assert shapes == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert [len(s) for s in tower.stages] == [1, 2, 1, 1]
    assert tower(x).shape == (2, 16)
    assert tower.attn_pool.pos_embed.shape == (2 * 2 + 1, 256)


def test_should_have_rn50s_parameter_count_when_sized_like_rn50():
    cfg = build_config(None, None, ["model.vision.family=resnet", "model.vision.width=64", "model.vision.heads=32",
                                    "model.embed_dim=1024"]).model
    with torch.device("meta"):
        tower = ModifiedResNet(cfg.vision, cfg.embed_dim)
    # OpenAI's RN50 image tower: 38.32 M parameters (OpenCLIP's model profile); BatchNorm's running
    # statistics are buffers, not parameters
    assert sum(p.numel() for p in tower.parameters()) == pytest.approx(38.32e6, abs=0.005e6)


def test_should_match_written_out_attention_when_pooling():
    torch.manual_seed(0)
    pool = AttentionPool(32, 3, 4, 8)
    x = torch.randn(2, 32, 3, 3)
    torch.testing.assert_close(pool(x), naive_pool(pool, x, pool.pos_embed), atol=1e-5, rtol=1e-5)


def test_should_resize_the_spatial_positional_embedding_when_the_grid_differs():
    torch.manual_seed(0)
    pool = AttentionPool(32, 3, 4, 8)
    with torch.no_grad():  # a grid that is the same everywhere stays so at any size; the mean token's differs
        pool.pos_embed[1:] = torch.randn(32)
    x = torch.randn(2, 32, 5, 5)
    pos = torch.cat([pool.pos_embed[:1], pool.pos_embed[1:2].expand(25, -1)])
    torch.testing.assert_close(pool(x), naive_pool(pool, x, pos), atol=1e-5, rtol=1e-5)
    cfg = resnet_config().model
    model = build_model(cfg, pretrained=False).eval()
    features = model.encode_image(torch.rand(2, 3, 96, 96))  # a 64 px model at 96 px (multi-scale, eval)
    assert features.shape == (2, 16) and torch.isfinite(features).all()


def test_should_start_each_residual_block_as_its_shortcut():
    torch.manual_seed(0)
    cfg = resnet_config().model
    tower = ModifiedResNet(cfg.vision, cfg.embed_dim).eval()
    block = tower.stages[1][1]  # same shape in and out: an identity shortcut
    assert isinstance(block, Bottleneck) and isinstance(block.shortcut, torch.nn.Identity)
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(block(x), x.relu())


def test_should_train_every_parameter_when_stepped():
    torch.manual_seed(0)
    cfg = resnet_config()
    model = build_model(cfg.model, pretrained=False).train()
    out = model(torch.rand(4, 3, 64, 64), torch.randint(1, 64, (4, 8)))
    assert out.image_features.shape == (4, 16)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(4))
    (out.image_features @ out.text_features.T).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.visual.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # each block's last BatchNorm scale starts at zero: it gets a gradient, so the blocks start learning
    last_bn = [f"stages.{i}.{j}.body.{len(block.body) - 1}.weight"
               for i, stage in enumerate(model.visual.stages) for j, block in enumerate(stage)]
    assert len(last_bn) == 5 and all(grads[n].abs().sum() > 0 for n in last_bn)
    assert grads["stem.layers.0.weight"].abs().sum() > 0  # the shortcuts carry the gradient to the stem


def test_should_run_in_bf16_autocast_on_the_cpu():
    cfg = resnet_config().model
    tower = ModifiedResNet(cfg.vision, cfg.embed_dim).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = tower(x)
    assert half.dtype == torch.bfloat16
    full = tower(x)  # bf16 keeps 8 bits of mantissa: ~0.4 % per rounding, a few % after ~20 layers
    assert (half.float() - full).norm() / full.norm() < 0.05


@pytest.mark.parametrize("sets, message", [
    (["model.vision.image_size=80"], r"^model.vision.image_size: 80 is not a multiple of the resnet's stride 32$"),
    (["model.vision.resnet_layers=[1,1,1]"], r"^model.vision.resnet_layers: need 4 stages of >= 1 block each"),
    (["model.vision.resnet_layers=[1,0,1,1]"], r"^model.vision.resnet_layers: need 4 stages"),
    (["model.vision.width=9"], r"^model.vision.width: the resnet stem's first convs are width/2 wide; 9 is odd$"),
    (["model.vision.heads=3"], r"^model.vision.heads: the resnet attention pool's 256 channels .* by 3 heads$"),
    (["data.multiscale=true", "data.multiscale_sizes=[64,80]"],
     r"^data.multiscale_sizes: each must be a positive multiple of the resnet's stride 32"),
])
def test_should_say_which_key_is_wrong_when_a_resnet_config_is_bad(sets, message):
    with pytest.raises(ConfigError, match=message):
        resnet_config(*sets)


def test_should_accept_heads_that_divide_the_pool_but_not_the_stem_width():
    assert resnet_config("model.vision.heads=16").model.vision.heads == 16  # 256 channels / 16, width 8


def test_should_give_the_same_features_when_saved_and_loaded(tmp_path):
    from clipjob import checkpoint as ckpt
    from clipjob.eval.runner import load_for_eval

    torch.manual_seed(0)
    cfg = resnet_config()
    model = build_model(cfg.model, pretrained=False).train()
    with torch.no_grad():  # training-mode passes move BatchNorm's running statistics off their init
        for _ in range(2):
            model.encode_image(torch.rand(4, 3, 64, 64))
    model.eval()
    run = str(tmp_path / "run")
    ckpt.save_checkpoint(run, 3, model.state_dict(), {}, to_yaml(cfg), {})
    loaded, loaded_cfg, _ = load_for_eval(run, device=torch.device("cpu"))
    assert loaded_cfg.model.vision == cfg.model.vision
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), atol=0, rtol=0)
    stats = "stages.0.0.body.1.running_mean"
    torch.testing.assert_close(loaded.visual.state_dict()[stats], model.visual.state_dict()[stats], atol=0, rtol=0)


def test_should_describe_the_resnet_tower_when_showing_a_checkpoint():
    from clipjob.commands.ckpt import describe_model

    assert describe_model(resnet_config().model).startswith(
        "ResNet (stem width 8, blocks 1-2-1-1, 4 pool heads, 64px) + transformer text (width 32")


def test_should_differ_from_tiny_cpu_only_in_the_image_tower_when_using_the_resnet_preset():
    from clipjob.config import to_dict

    resnet, vit = to_dict(build_config("tiny-cpu-resnet")), to_dict(build_config("tiny-cpu"))
    assert resnet["model"]["vision"]["family"] == "resnet" and resnet["model"]["vision"]["image_size"] == 96
    resnet["model"]["vision"] = vit["model"]["vision"]
    assert resnet == vit


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """fn()'s result and the bytes autograd saved for the backward while it ran."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_should_give_the_same_gradients_and_statistics_with_less_saved_when_checkpointing():
    """model.grad_checkpointing on the ResNet tower: gradients and BatchNorm running statistics (updated once,
    not again by the recomputation) equal the plain step's, in float64 (same kernels, same order: equal to
    rounding); autograd keeps fewer activations."""
    torch.manual_seed(0)
    plain = build_model(resnet_config().model, pretrained=False).double().train()
    ckpt = build_model(resnet_config("model.grad_checkpointing=true").model, pretrained=False).double().train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.visual.grad_checkpointing and not plain.visual.grad_checkpointing
    x = torch.rand(4, 3, 64, 64, dtype=torch.float64)
    results = []
    for model in (plain, ckpt):
        feats, saved = _saved_bytes(lambda m=model: m.visual(x))
        feats.square().sum().backward()
        results.append((saved, {n: p.grad for n, p in model.visual.named_parameters()},
                        {n: b.clone() for n, b in model.visual.named_buffers()}))
    (saved_plain, grads_plain, bufs_plain), (saved_ckpt, grads_ckpt, bufs_ckpt) = results
    assert saved_ckpt < 0.7 * saved_plain, (saved_ckpt, saved_plain)
    assert set(grads_plain) == set(grads_ckpt)
    for n, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[n], g, rtol=1e-9, atol=1e-12 * (g.abs().max().item() or 1.0), msg=n)
    for n, b in bufs_plain.items():
        torch.testing.assert_close(bufs_ckpt[n], b, rtol=1e-12, atol=0, msg=n)
    assert int(bufs_ckpt["stages.0.0.body.1.num_batches_tracked"]) == 1
    # momentum is back where it was after the recomputation
    assert all(m.momentum == 0.1 for m in ckpt.visual.modules() if isinstance(m, torch.nn.BatchNorm2d))
