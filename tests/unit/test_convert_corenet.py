"""CoreNet checkpoints: a state dict with exactly the reference key names and shapes (written here from
reference/corenet-clip.md) loads strictly, and the converted model computes what CoreNet's architecture
computes, checked against plain-torch code written in this file (conv stem padding, BatchNorm, 1-D positional
interpolation at 160/224/320, class token without positional embedding, LayerNorm eps, exact GELU, EOT pooling,
x @ proj)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from clipjob.commands.ckpt import checkpoint_info, convert_checkpoint
from clipjob.config import ModelConfig, TextConfig, VisionConfig
from clipjob.errors import ClipjobError
from clipjob.checkpoint import load_any_weights
from clipjob.model.convert import count_parameters, fit_to_config, infer_model_config, model_with_weights, to_clipjob
from clipjob.presets import PRESETS

SOT, EOT = 49406, 49407


def block_shapes(prefix: str, d: int, layers: int, ffn: int) -> dict:
    s = {}
    for i in range(layers):
        p = f"{prefix}{i}."
        s.update({p + "pre_norm_mha.0.weight": (d,), p + "pre_norm_mha.0.bias": (d,),
                  p + "pre_norm_mha.1.qkv_proj.weight": (3 * d, d), p + "pre_norm_mha.1.qkv_proj.bias": (3 * d,),
                  p + "pre_norm_mha.1.out_proj.weight": (d, d), p + "pre_norm_mha.1.out_proj.bias": (d,),
                  p + "pre_norm_ffn.0.weight": (d,), p + "pre_norm_ffn.0.bias": (d,),
                  p + "pre_norm_ffn.1.weight": (ffn, d), p + "pre_norm_ffn.1.bias": (ffn,),
                  p + "pre_norm_ffn.4.weight": (d, ffn), p + "pre_norm_ffn.4.bias": (d,)})
    return s


def corenet_shapes(dim=768, layers=12, text_dim=512, text_layers=12, embed=512, n_pos=196, ctx=77, vocab=49408,
                   augmentor=True, text_ffn=None) -> dict:
    """The key names and shapes of CoreNet's clip_vit_base.pt (defaults), per reference/corenet-clip.md."""
    stem, ie, te = max(32, dim // 4), "image_encoder.", "text_encoder."
    s = {"logit_scale": (), ie + "patch_emb.0.block.conv.weight": (stem, 3, 4, 4),
         ie + "patch_emb.1.block.conv.weight": (stem, stem, 2, 2),
         ie + "patch_emb.2.block.conv.weight": (dim, stem, 2, 2), ie + "patch_emb.2.block.conv.bias": (dim,)}
    for i in (0, 1):
        s.update({f"{ie}patch_emb.{i}.block.norm.{n}": (stem,) for n in ("weight", "bias", "running_mean", "running_var")})
        s[f"{ie}patch_emb.{i}.block.norm.num_batches_tracked"] = ()
    s.update({ie + "pos_embed.pos_embed.pos_embed": (1, 1, n_pos, dim), ie + "cls_token": (1, 1, dim)})
    s.update(block_shapes(ie + "transformer.", dim, layers, 4 * dim))
    s.update({ie + "post_transformer_norm.weight": (dim,), ie + "post_transformer_norm.bias": (dim,),
              ie + "classifier.proj": (dim, embed)})
    if augmentor:
        s.update({f"{ie}neural_augmentor.{op}.{end}": () for op in ("brightness", "contrast", "noise") for end in ("_low", "_high")})
    s.update({te + "embedding_layer.weight": (vocab, text_dim),
              te + "positional_embedding.pos_embed.pos_embed": (1, 1, ctx, text_dim)})
    s.update(block_shapes(te + "transformer.", text_dim, text_layers, text_ffn or 4 * text_dim))
    s.update({te + "final_layer_norm.weight": (text_dim,), te + "final_layer_norm.bias": (text_dim,),
              te + "projection_layer": (text_dim, embed)})
    return s


def random_state(shapes: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1000)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(("norm.weight", ".0.weight")) and len(shape) == 1:  # norms near 1
            out[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[k] = 0.1 * torch.randn(shape, generator=g)
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return out


# --- the reference computation, plain torch ------------------------------------------------------------------


def layer_norm(x, sd, p, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[p + "weight"], sd[p + "bias"], eps)


def gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def blocks(x, sd, prefix, layers, heads, eps, causal):
    b, s, d = x.shape
    mask = torch.full((s, s), float("-inf")).triu(1) if causal else torch.zeros(s, s)
    for i in range(layers):
        p = f"{prefix}{i}."
        h = layer_norm(x, sd, p + "pre_norm_mha.0.", eps)
        qkv = (h @ sd[p + "pre_norm_mha.1.qkv_proj.weight"].T + sd[p + "pre_norm_mha.1.qkv_proj.bias"])
        q, k, v = qkv.reshape(b, s, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = ((q * (d // heads) ** -0.5) @ k.transpose(-1, -2) + mask).float().softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(b, s, d)
        x = x + o @ sd[p + "pre_norm_mha.1.out_proj.weight"].T + sd[p + "pre_norm_mha.1.out_proj.bias"]
        h = layer_norm(x, sd, p + "pre_norm_ffn.0.", eps)
        h = gelu_erf(h @ sd[p + "pre_norm_ffn.1.weight"].T + sd[p + "pre_norm_ffn.1.bias"])
        x = x + h @ sd[p + "pre_norm_ffn.4.weight"].T + sd[p + "pre_norm_ffn.4.bias"]
    return x


def interp_1d(pos, n):
    """(N, D) -> (n, D): linear over the flattened index, half-pixel centres, clamped at the ends."""
    big_n = pos.shape[0]
    rows = []
    for i in range(n):
        src = max((i + 0.5) * big_n / n - 0.5, 0.0)
        i0 = min(int(math.floor(src)), big_n - 1)
        w = src - i0
        rows.append((1 - w) * pos[i0] + w * pos[min(i0 + 1, big_n - 1)])
    return torch.stack(rows)


def reference_image(sd, x, layers, heads):
    p = "image_encoder.patch_emb."

    def bn(x, q):
        rm, rv, w, b = (sd[q + n].view(1, -1, 1, 1) for n in ("running_mean", "running_var", "weight", "bias"))
        return (x - rm) / torch.sqrt(rv + 1e-5) * w + b

    x = gelu_erf(bn(F.conv2d(x, sd[p + "0.block.conv.weight"], stride=4, padding=1), p + "0.block.norm."))
    x = gelu_erf(bn(F.conv2d(x, sd[p + "1.block.conv.weight"], stride=2), p + "1.block.norm."))
    x = F.conv2d(x, sd[p + "2.block.conv.weight"], sd[p + "2.block.conv.bias"], stride=2)
    b, d = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)
    pos = sd["image_encoder.pos_embed.pos_embed.pos_embed"][0, 0]
    x = x + (pos if x.shape[1] == pos.shape[0] else interp_1d(pos, x.shape[1]))
    x = torch.cat([sd["image_encoder.cls_token"].expand(b, 1, d), x], dim=1)  # no positional embedding on it
    x = blocks(x, sd, "image_encoder.transformer.", layers, heads, 1e-6, causal=False)
    x = layer_norm(x, sd, "image_encoder.post_transformer_norm.", 1e-6)[:, 0] @ sd["image_encoder.classifier.proj"]
    return F.normalize(x, dim=-1)


def reference_text(sd, tokens, layers, heads):
    x = sd["text_encoder.embedding_layer.weight"][tokens]
    x = x + sd["text_encoder.positional_embedding.pos_embed.pos_embed"][0, 0, : tokens.shape[1]]
    x = blocks(x, sd, "text_encoder.transformer.", layers, heads, 1e-5, causal=True)
    x = layer_norm(x, sd, "text_encoder.final_layer_norm.", 1e-5)
    x = x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ sd["text_encoder.projection_layer"]
    return F.normalize(x, dim=-1)


# --- tests ---------------------------------------------------------------------------------------------------

SMALL = dict(dim=64, layers=2, text_dim=32, text_layers=2, embed=48)  # stem width max(32, 64 // 4) = 32
SMALL_CFG = ModelConfig(
    embed_dim=48, range_augment=True,
    vision=VisionConfig(family="corenet", image_size=224, patch_size=16, width=64, layers=2, heads=4, ln_eps=1e-6),
    text=TextConfig(width=32, layers=2, heads=2, context_length=77, ln_eps=1e-5))


@pytest.fixture(scope="module")
def small():
    sd = random_state(corenet_shapes(**SMALL))
    return sd, model_with_weights(SMALL_CFG, fit_to_config(to_clipjob(sd, "corenet"), SMALL_CFG, "test")).eval()


@pytest.mark.parametrize("size", [160, 224, 320])
def test_should_match_the_reference_image_tower_at_eval_resolutions(small, size):
    sd, model = small
    torch.manual_seed(size)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        got = model.encode_image(x)
    torch.testing.assert_close(got, reference_image(sd, x, layers=2, heads=4), atol=1e-5, rtol=1e-4)


def test_should_interpolate_positions_over_the_flattened_index_not_the_grid():
    pos = torch.randn(196, 8)
    grid = F.interpolate(pos.T.reshape(1, 8, 14, 14), size=(10, 10), mode="bilinear").reshape(8, 100).T
    assert (interp_1d(pos, 100) - grid).abs().max() > 1e-2  # the two differ, so the image test can tell them apart
    from clipjob.model.vit import resize_pos_1d

    # torch computes the source index in float32 (ulp ~1.5e-5 near index 133), this file in float64
    torch.testing.assert_close(resize_pos_1d(pos, 100), interp_1d(pos, 100), atol=1e-4, rtol=1e-4)


def test_should_pool_the_eot_token_of_the_reference_text_tower(small):
    sd, model = small
    tokens = torch.zeros(3, 77, dtype=torch.long)
    tokens[0, :4] = torch.tensor([SOT, 320, 1125, EOT])
    tokens[1, :7] = torch.tensor([SOT, 49, 3, 1000, 20000, 7, EOT])
    tokens[2, :] = torch.randint(1, 49000, (77,))
    tokens[2, 0], tokens[2, -1] = SOT, EOT
    with torch.no_grad():
        got = model.encode_text(tokens)
    torch.testing.assert_close(got, reference_text(sd, tokens, layers=2, heads=2), atol=1e-5, rtol=1e-4)


def test_should_use_corenet_eps_and_load_range_augment_and_logit_scale(small):
    sd, model = small
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps and all(v == (1e-6 if n.startswith("visual.") else 1e-5) for n, v in eps.items()), eps
    assert not hasattr(model.visual.ln_pre, "eps")  # no LayerNorm before the first image block
    for op in ("brightness", "contrast", "noise"):
        for end in ("_low", "_high"):
            assert getattr(getattr(model.image_augmentor, op), end).item() == sd[f"image_encoder.neural_augmentor.{op}.{end}"].item()
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_should_load_the_full_size_reference_keys_strictly_as_the_vit_b16_preset():
    shapes = corenet_shapes()
    sd = {k: torch.zeros(()).expand(s) for k, s in shapes.items()}  # shapes only, no memory
    converted = to_clipjob(sd, "corenet")
    cfg = infer_model_config(converted)
    preset = PRESETS["corenet-vit-b16"]["model"]
    v = cfg.vision
    assert {k: getattr(v, k) for k in preset["vision"]} == preset["vision"]
    assert (v.mlp_ratio, v.act) == (4.0, "gelu")
    assert {k: getattr(cfg.text, k) for k in preset["text"]} == preset["text"]
    assert cfg.embed_dim == preset["embed_dim"] and cfg.range_augment
    fitted = fit_to_config(converted, cfg, "clip_vit_base.pt")
    assert len(fitted) == len(sd)  # every reference key consumed, nothing invented
    buffers = [k for k in shapes if "running_" in k or "num_batches" in k]
    assert count_parameters(cfg) == sum(math.prod(s) for k, s in shapes.items() if k not in buffers)


def test_should_infer_the_vit_h16_architecture():
    shapes = corenet_shapes(dim=1280, layers=32, text_dim=768, text_layers=12, embed=512)
    cfg = infer_model_config(to_clipjob({k: torch.zeros(()).expand(s) for k, s in shapes.items()}, "corenet"))
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.heads, cfg.vision.image_size) == (1280, 32, 20, 224)
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.embed_dim) == (768, 12, 12, 512)
    assert tuple(fit_to_config(to_clipjob({k: torch.zeros(()).expand(s) for k, s in shapes.items()}), cfg, "h")
                 ["visual.stem.conv1.weight"].shape) == (320, 3, 4, 4)


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.pop("image_encoder.cls_token"), "missing visual.cls_token"),
    (lambda sd: sd.__setitem__("image_encoder.dist_token", torch.zeros(1, 1, 64)), "image_encoder.dist_token"),
    (lambda sd: sd.__setitem__("image_encoder.pos_embed.pos_embed.pos_embed", torch.zeros(1, 1, 197, 64)),
     r"visual.pos_embed has shape \(197, 64\) in the checkpoint but \(196, 64\) in the model"),
    (lambda sd: sd.__setitem__("image_encoder.cls_token", torch.zeros(2, 1, 64)), "unexpected shape"),
])
def test_should_refuse_a_corenet_state_dict_that_does_not_match_the_reference(tmp_path, change, message):
    sd = random_state(corenet_shapes(**SMALL))
    change(sd)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ClipjobError, match=message) as e:
        load_any_weights(str(tmp_path / "bad.pt"), SMALL_CFG)
    assert "\n" not in str(e.value)


def test_should_fill_or_drop_range_augment_to_fit_the_config(tmp_path):
    sd = random_state(corenet_shapes(**SMALL, augmentor=False))
    torch.save(sd, tmp_path / "noaug.pt")
    filled = load_any_weights(str(tmp_path / "noaug.pt"), SMALL_CFG)
    assert filled["image_augmentor.brightness._high"].item() == 1.5
    torch.save(random_state(corenet_shapes(**SMALL)), tmp_path / "aug.pt")
    from dataclasses import replace

    dropped = load_any_weights(str(tmp_path / "aug.pt"), replace(SMALL_CFG, range_augment=False))
    assert not any(k.startswith("image_augmentor.") for k in dropped)


def test_should_convert_and_describe_a_corenet_checkpoint(tmp_path):
    sd = random_state(corenet_shapes(dim=128, layers=2, text_dim=64, text_layers=1, embed=48, ctx=16, vocab=1000))
    torch.save(sd, tmp_path / "clip_vit_tiny.pt")
    with pytest.raises(ClipjobError, match=r"^\S+clip_vit_tiny.pt: model.vision.heads: a vision tower 128 wide has no standard head count "
                                           r"and the weights do not encode it; pass --set model.vision.heads=N or "
                                           r"--corenet-config CORENET_YAML$"):
        checkpoint_info(str(tmp_path / "clip_vit_tiny.pt"))  # never a silent guess
    heads = ["model.vision.heads=2", "model.text.heads=1"]
    info = checkpoint_info(str(tmp_path / "clip_vit_tiny.pt"), heads)
    assert info["layout"] == "corenet" and info["step"] is None
    assert info["architecture"].startswith("corenet ViT (width 128, 2 layers, 2 heads, conv stem, 224px, gelu)")
    assert "RangeAugment" in info["architecture"]
    buffers = [k for k in sd if "running_" in k or "num_batches" in k]
    assert info["parameters"] == sum(v.numel() for k, v in sd.items() if k not in buffers)
    convert_checkpoint(str(tmp_path / "clip_vit_tiny.pt"), str(tmp_path / "ckpt"), "corenet", heads)
    again = checkpoint_info(str(tmp_path / "ckpt"))
    assert again["layout"] == "clipjob" and again["model"] == info["model"]
    with pytest.raises(ClipjobError, match="keys look like corenet"):
        convert_checkpoint(str(tmp_path / "clip_vit_tiny.pt"), str(tmp_path / "x"), "openclip", heads)


def test_should_take_the_text_heads_from_the_corenet_yaml_instead_of_guessing(tmp_path):
    """A CoreNet text tower 256 wide with 8 heads (32-dim): a 64-dim-head guess built it with 4 heads, and text
    embeddings moved by ~0.1. The head counts come from the CoreNet YAML (or --set); the result matches the
    reference forward pass with 8 heads."""
    sd = random_state(corenet_shapes(dim=768, layers=1, text_dim=256, text_layers=2, embed=48, ctx=16, vocab=500))
    torch.save(sd, tmp_path / "clip.pt")
    (tmp_path / "corenet.yaml").write_text("model:\n  classification: {name: vit, vit: {mode: base}}\n"
                                           "  text:\n    transformer: {model_dim: 256, n_heads_per_layer: 8}\n")
    with pytest.raises(ClipjobError, match="model.text.heads: a text tower 256 wide .* --set model.text.heads=N"):
        convert_checkpoint(str(tmp_path / "clip.pt"), str(tmp_path / "guess"), "corenet")
    convert_checkpoint(str(tmp_path / "clip.pt"), str(tmp_path / "ckpt"), "corenet",
                       corenet_config=str(tmp_path / "corenet.yaml"))
    info = checkpoint_info(str(tmp_path / "ckpt"))
    assert (info["model"]["vision"]["heads"], info["model"]["text"]["heads"]) == (12, 8)
    cfg = ModelConfig(**{**SMALL_CFG.__dict__, "embed_dim": 48,
                         "vision": VisionConfig(family="corenet", width=768, layers=1, heads=12, ln_eps=1e-6),
                         "text": TextConfig(width=256, layers=2, heads=8, context_length=16, vocab_size=500)})
    model = model_with_weights(cfg, load_any_weights(str(tmp_path / "ckpt"), cfg)).eval()
    tokens = torch.randint(1, 499, (2, 16))
    with torch.no_grad():
        got = model.encode_text(tokens)
    torch.testing.assert_close(got, reference_text(sd, tokens, layers=2, heads=8), atol=1e-5, rtol=1e-4)
    four = model_with_weights(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, heads=4)),
                              load_any_weights(str(tmp_path / "ckpt"), cfg)).eval()
    with torch.no_grad():
        assert (four.encode_text(tokens) - got).abs().max() > 1e-3  # the guess computed something else


@pytest.mark.parametrize("text", ["minilm", "transformer"])
def test_should_name_the_tower_that_needs_config_yaml_for_a_bare_resnet_checkpoint(tmp_path, text):
    """clipjob's own ResNet image tower (and its MiniLM text tower) cannot be read back from shapes alone: a
    bare model.safetensors says so, instead of blaming a missing ViT key."""
    from safetensors.torch import save_file

    from clipjob.config import resolve
    from clipjob.model.clip import build_model

    sets = ["model.text.kind=transformer", "model.text.width=64", "model.text.layers=1", "model.text.heads=2"]
    cfg = resolve(PRESETS["tiny-cpu-resnet"], None, sets if text == "transformer" else [])
    sd = {k: v.contiguous() for k, v in build_model(cfg.model, pretrained=False).state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    towers = "a ResNet image tower" + (" and a MiniLM text tower" if text == "minilm" else "")
    with pytest.raises(ClipjobError, match=rf"^\S+model.safetensors: {towers}: the architecture cannot be read from the weights alone; "
                                           r"keep the config.yaml clipjob writes beside model.safetensors$"):
        checkpoint_info(str(tmp_path / "model.safetensors"))
