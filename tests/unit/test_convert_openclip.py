"""Parity with OpenCLIP (random weights): its ViT-B-32 (GELU, loaded from a safetensors file) and the OpenAI
QuickGELU ViT-B-16 (fp16 weights with OpenAI's metadata keys) give the same image and text features after
conversion (fp32, max abs diff <= 1e-4); `ckpt convert --from openai` keeps QuickGELU in the checkpoint it writes
(checked end to end on a small OpenCLIP model through the eval loader)."""

import pytest
import torch
from safetensors.torch import save_file

open_clip = pytest.importorskip("open_clip")

from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402

from clipjob.commands.ckpt import convert_checkpoint  # noqa: E402
from clipjob.errors import ClipjobError  # noqa: E402
from clipjob.eval.runner import load_for_eval  # noqa: E402
from clipjob.checkpoint import load_any_weights  # noqa: E402
from clipjob.model.convert import detect_layout, fit_to_config, infer_model_config, model_with_weights, to_clipjob  # noqa: E402

MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
CAPTIONS = ["a photo of a cat", "a diagram of a transformer block with many words in it"]


def reference(name: str):
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.1)
    return model


@torch.no_grad()
def assert_same_features(oc, ours, size: int = 224, context: int = 77):
    torch.manual_seed(1)
    images = torch.rand(2, 3, size, size)
    tokens = open_clip.tokenize(CAPTIONS, context_length=context)
    img = (ours.eval().encode_image(images) - oc.encode_image((images - MEAN) / STD, normalize=True)).abs().max()
    txt = (ours.encode_text(tokens) - oc.encode_text(tokens, normalize=True)).abs().max()
    assert img <= 1e-4 and txt <= 1e-4, (img, txt)
    torch.testing.assert_close(ours.logit_scale.detach(), oc.logit_scale.detach())


def test_should_match_openclip_vit_b32_when_loading_its_safetensors_file(tmp_path):
    oc = reference("ViT-B-32")
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    cfg = infer_model_config(to_clipjob(oc.state_dict()))
    v, t = cfg.vision, cfg.text
    assert (v.family, v.image_size, v.patch_size, v.width, v.layers, v.heads, v.act, v.ln_eps) == \
        ("openai", 224, 32, 768, 12, 12, "gelu", 1e-5)
    assert (t.width, t.layers, t.heads, t.context_length, t.vocab_size, cfg.embed_dim) == (512, 12, 8, 77, 49408, 512)
    assert_same_features(oc, model_with_weights(cfg, load_any_weights(str(path), cfg)))


def test_should_match_openai_quickgelu_vit_b16_with_fp16_weights_and_metadata_keys():
    oc = reference("ViT-B-16-quickgelu")
    sd = {k: v.half() for k, v in oc.state_dict().items()}  # OpenAI ships (mostly) fp16 ...
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    oc.half().float()  # ... so compare with the same rounded weights
    converted = to_clipjob(sd)
    cfg = infer_model_config(converted, act="quick_gelu")
    assert (cfg.vision.patch_size, cfg.vision.image_size, cfg.vision.act, cfg.text.act) == (16, 224, "quick_gelu", "quick_gelu")
    assert_same_features(oc, model_with_weights(cfg, fit_to_config(converted, cfg, "test")))


def tiny_openai_clip():
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=64)
    text = CLIPTextCfg(context_length=16, width=64, heads=2, layers=2)
    return open_clip.model.CLIP(48, vision, text, quick_gelu=True).eval()


def test_should_write_a_quickgelu_checkpoint_when_converting_from_openai(tmp_path):
    oc = tiny_openai_clip()
    torch.save(oc.state_dict(), tmp_path / "openai.pt")
    msg = convert_checkpoint(str(tmp_path / "openai.pt"), str(tmp_path / "ckpt"), "openai",
                             ["model.vision.heads=2", "model.text.heads=2"])
    assert "openclip -> clipjob" in msg and "quick_gelu" in msg
    model, cfg, _ = load_for_eval(str(tmp_path / "ckpt"), device=torch.device("cpu"))  # the eval path
    assert (cfg.model.vision.act, cfg.model.text.act, cfg.model.vision.heads) == ("quick_gelu", "quick_gelu", 2)
    assert_same_features(oc, model, size=64, context=16)
    auto = convert_checkpoint(str(tmp_path / "openai.pt"), str(tmp_path / "auto.safetensors"), "auto",
                              ["model.vision.heads=2", "model.text.heads=2"])
    assert "assumed GELU; use --from openai" in auto
    with pytest.raises(ClipjobError, match="already holds a checkpoint; pass --force"):
        convert_checkpoint(str(tmp_path / "openai.pt"), str(tmp_path / "ckpt"), "openai")


def test_should_refuse_openclip_variants_clipjob_cannot_represent():
    sd = {"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "visual.attn_pool.query": torch.zeros(4, 8)}
    assert detect_layout(sd) == "openclip"
    with pytest.raises(ClipjobError, match="visual.attn_pool.query"):
        to_clipjob(sd)
    with pytest.raises(ClipjobError, match="use --from openclip"):
        to_clipjob(sd, "corenet")
    with pytest.raises(ClipjobError, match="ResNet"):
        detect_layout({"visual.layer1.0.conv1.weight": torch.zeros(1)})


def tiny_openclip(image_size: int, patch: int = 14, head_width: int = 24):
    """An OpenCLIP ViT of an unusual shape: patch 14, 24-dim heads (not 64), QuickGELU."""
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=72, head_width=head_width, patch_size=patch, image_size=image_size)
    text = CLIPTextCfg(context_length=16, width=48, heads=2, layers=2)
    return open_clip.model.CLIP(40, vision, text, quick_gelu=True).eval()


@pytest.mark.parametrize("second", [42, 98])  # the 56-px grid of 4 down to 3, and up to 7
def test_should_match_openclip_at_a_second_resolution_when_its_pos_embed_is_resized(second):
    """OpenCLIP resizes the positional grid when it loads weights into a model of another image size
    (resize_pos_embed: antialiased bicubic); clipjob resizes at forward time and must give the same features."""
    base = tiny_openclip(56)
    sd = base.state_dict()
    other = tiny_openclip(second)
    resized = dict(sd)
    open_clip.model.resize_pos_embed(resized, other)
    other.load_state_dict(resized)
    cfg = infer_model_config(to_clipjob(sd), act="quick_gelu", vision_heads=3, text_heads=2)
    ours = model_with_weights(cfg, fit_to_config(to_clipjob(sd), cfg, "test"))
    assert (cfg.vision.patch_size, cfg.vision.image_size, cfg.vision.width // cfg.vision.heads) == (14, 56, 24)
    assert_same_features(other, ours, size=second, context=16)


def test_should_build_a_patch_14_model_when_multiscale_is_off():
    """ViT-L/14-style models: data.multiscale_sizes (multiples of 16) are only checked when multi-scale is on."""
    from clipjob.config import build_config
    from clipjob.errors import ConfigError

    cfg = build_config("tiny-cpu-scratch", None, ["model.vision.patch_size=14", "model.vision.image_size=56"])
    assert (cfg.model.vision.patch_size, cfg.data.multiscale) == (14, False)
    with pytest.raises(ConfigError, match=r"data.multiscale_sizes: each must be a positive multiple of the patch size 14"):
        build_config("tiny-cpu-scratch", None, ["model.vision.patch_size=14", "model.vision.image_size=56",
                                                "data.multiscale=true", "data.multiscale_sizes=[48,56]"])
