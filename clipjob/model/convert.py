"""Checkpoint adapters: CoreNet and OpenCLIP/OpenAI state dicts -> clipjob's CLIP (key mapping and architecture
inference only; reading and writing files is clipjob/checkpoint.py).

Layouts, detected from the keys:
- clipjob:  `visual.stem...`, `visual.transformer.blocks.N...`, `text.transformer.blocks.N...`
- corenet:  `image_encoder.*`, `text_encoder.*`, `logit_scale` (e.g. CoreNet's clip_vit_base.pt). Loaded
            strictly: every key must have a clipjob counterpart and every clipjob key must be present.
- openclip: OpenAI/OpenCLIP `CLIP` ViT models (`visual.conv1.weight`, `visual.transformer.resblocks.N...`,
            `token_embedding.weight`, ...; also the `text.`-prefixed CustomTextCLIP text tower). The same
            layout holds OpenAI's weights, which need `act: quick_gelu`; it cannot be told from the keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

from clipjob.config import ModelConfig, TextConfig, VisionConfig
from clipjob.errors import ClipjobError

LAYOUTS = ("clipjob", "corenet", "openclip")
Tensors = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------------------
# key mapping: one (regex, replacement, reshape) rule per foreign key family

_CORENET_BLOCK = {"pre_norm_mha.0": "ln_1", "pre_norm_mha.1.qkv_proj": "attn.qkv",
                  "pre_norm_mha.1.out_proj": "attn.proj", "pre_norm_ffn.0": "ln_2", "pre_norm_ffn.1": "mlp.0",
                  "pre_norm_ffn.4": "mlp.2"}
_OPENCLIP_BLOCK = {"ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias", "ln_2.weight": "ln_2.weight",
                   "ln_2.bias": "ln_2.bias", "attn.in_proj_weight": "attn.qkv.weight",
                   "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj.weight": "attn.proj.weight",
                   "attn.out_proj.bias": "attn.proj.bias", "mlp.c_fc.weight": "mlp.0.weight",
                   "mlp.c_fc.bias": "mlp.0.bias", "mlp.c_proj.weight": "mlp.2.weight",
                   "mlp.c_proj.bias": "mlp.2.bias"}
_BN = "(weight|bias|running_mean|running_var|num_batches_tracked)"
_WB = "(weight|bias)"


def _alt(names) -> str:
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def _squeeze_to(ndim: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """CoreNet keeps pos_embed as (1, 1, N, D) and cls_token as (1, 1, D); clipjob as (N, D) and (D,)."""

    def go(key: str, t: torch.Tensor) -> torch.Tensor:
        if t.dim() < ndim or any(s != 1 for s in t.shape[: t.dim() - ndim]):
            raise ClipjobError(f"{key}: unexpected shape {tuple(t.shape)} for a CoreNet checkpoint")
        return t.reshape(t.shape[t.dim() - ndim:])

    return go


Rule = tuple[re.Pattern, "str | Callable[[re.Match], str]", "Callable | None"]


def _rules(spec: list[tuple]) -> list[Rule]:
    return [(re.compile(p + r"\Z"), r, f) for p, r, *rest in spec for f in [rest[0] if rest else None]]


_CORENET_RULES = _rules([
    (r"logit_scale", "logit_scale"),
    (r"image_encoder\.patch_emb\.0\.block\.conv\.weight", "visual.stem.conv1.weight"),
    (rf"image_encoder\.patch_emb\.0\.block\.norm\.{_BN}", r"visual.stem.bn1.\1"),
    (r"image_encoder\.patch_emb\.1\.block\.conv\.weight", "visual.stem.conv2.weight"),
    (rf"image_encoder\.patch_emb\.1\.block\.norm\.{_BN}", r"visual.stem.bn2.\1"),
    (rf"image_encoder\.patch_emb\.2\.block\.conv\.{_WB}", r"visual.stem.conv3.\1"),
    (r"image_encoder\.pos_embed\.pos_embed\.pos_embed", "visual.pos_embed", _squeeze_to(2)),
    (r"image_encoder\.cls_token", "visual.cls_token", _squeeze_to(1)),
    (rf"image_encoder\.transformer\.(\d+)\.{_alt(_CORENET_BLOCK)}\.{_WB}",
     lambda m: f"visual.transformer.blocks.{m[1]}.{_CORENET_BLOCK[m[2]]}.{m[3]}"),
    (rf"image_encoder\.post_transformer_norm\.{_WB}", r"visual.ln_post.\1"),
    (r"image_encoder\.classifier\.proj", "visual.proj"),
    (r"image_encoder\.neural_augmentor\.(brightness|contrast|noise)\.(_low|_high)", r"image_augmentor.\1.\2"),
    (r"text_encoder\.embedding_layer\.weight", "text.token_embedding.weight"),
    (r"text_encoder\.positional_embedding\.pos_embed\.pos_embed", "text.pos_embed", _squeeze_to(2)),
    (rf"text_encoder\.transformer\.(\d+)\.{_alt(_CORENET_BLOCK)}\.{_WB}",
     lambda m: f"text.transformer.blocks.{m[1]}.{_CORENET_BLOCK[m[2]]}.{m[3]}"),
    (rf"text_encoder\.final_layer_norm\.{_WB}", r"text.ln_final.\1"),
    (r"text_encoder\.projection_layer", "text.proj"),
])

_OPENCLIP_RULES = _rules([
    (r"logit_scale", "logit_scale"),
    (r"visual\.conv1\.weight", "visual.stem.weight"),
    (r"visual\.class_embedding", "visual.cls_token"),
    (r"visual\.positional_embedding", "visual.pos_embed"),
    (rf"visual\.(ln_pre|ln_post)\.{_WB}", r"visual.\1.\2"),
    (r"visual\.proj", "visual.proj"),
    (rf"visual\.transformer\.resblocks\.(\d+)\.{_alt(_OPENCLIP_BLOCK)}",
     lambda m: f"visual.transformer.blocks.{m[1]}.{_OPENCLIP_BLOCK[m[2]]}"),
    (r"(?:text\.)?token_embedding\.weight", "text.token_embedding.weight"),
    (r"(?:text\.)?positional_embedding", "text.pos_embed"),
    (rf"(?:text\.)?transformer\.resblocks\.(\d+)\.{_alt(_OPENCLIP_BLOCK)}",
     lambda m: f"text.transformer.blocks.{m[1]}.{_OPENCLIP_BLOCK[m[2]]}"),
    (rf"(?:text\.)?ln_final\.{_WB}", r"text.ln_final.\1"),
    (r"(?:text\.)?text_projection", "text.proj"),
])
# buffers and metadata of the OpenAI/OpenCLIP layouts that carry no weights
_OPENCLIP_DROP = re.compile(r"((text\.)?attn_mask|input_resolution|context_length|vocab_size)\Z")


def _rename(sd: Tensors, rules: list[Rule], layout: str, drop: re.Pattern | None = None) -> Tensors:
    out: Tensors = {}
    unknown = []
    for key, t in sd.items():
        if drop is not None and drop.match(key):
            continue
        for pattern, repl, reshape in rules:
            m = pattern.match(key)
            if m:
                new = repl(m) if callable(repl) else m.expand(repl)
                out[new] = reshape(key, t) if reshape else t
                break
        else:
            unknown.append(key)
    if unknown:
        raise ClipjobError(f"{len(unknown)} {layout} key(s) have no clipjob counterpart (unsupported variant?): "
                           f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}")
    return out


def detect_layout(sd: Tensors) -> str:
    keys = set(sd)
    if any(k.startswith(("image_encoder.", "text_encoder.")) for k in keys):
        return "corenet"
    if "visual.conv1.weight" in keys or "visual.class_embedding" in keys:
        return "openclip"
    if any(k.startswith("visual.layer1.") for k in keys):
        raise ClipjobError("this is an OpenAI/OpenCLIP ResNet CLIP checkpoint; from those layouts clipjob reads "
                           "ViT towers only (its own model.vision.family=resnet checkpoints load as they are)")
    if "visual.cls_token" in keys or "visual.attn_pool.pos_embed" in keys or "visual.conv_head.weight" in keys:
        return "clipjob"  # ViT, ResNet, EfficientNet-Lite0 towers
    raise ClipjobError(f"unrecognised checkpoint layout (keys such as {', '.join(sorted(keys)[:3])}); "
                       f"expected clipjob, CoreNet or OpenCLIP/OpenAI ViT weights")


def to_clipjob(sd: Tensors, layout: str = "auto") -> Tensors:
    """Rename (and reshape) a state dict of any supported layout into clipjob's keys."""
    sd = _strip_prefix(sd, "module.")
    found = detect_layout(sd)
    if layout not in ("auto", found):
        raise ClipjobError(f"expected a {layout} checkpoint, but its keys look like {found} (use --from {found})")
    if found == "corenet":
        return _rename(sd, _CORENET_RULES, "CoreNet")
    if found == "openclip":
        return _rename(sd, _OPENCLIP_RULES, "OpenCLIP", _OPENCLIP_DROP)
    return dict(sd)


def _strip_prefix(sd: Tensors, prefix: str) -> Tensors:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------------------------------------------------
# architecture from weights, and the strict shape check against a config


def _count_blocks(sd: Tensors, prefix: str) -> int:
    ids = {int(m[1]) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if ids != set(range(len(ids))):
        raise ClipjobError(f"{prefix}*: block indices {sorted(ids)[:8]} are not 0..N-1")
    return len(ids)


# Head counts of published towers, by family and width. A state dict does not encode the head count (the fused
# qkv projection has the same shape for any split), so it is read from here only where the width pins it down;
# anything else must be given (`--set model.vision.heads=N`, or the CoreNet YAML), never guessed.
KNOWN_HEADS = {
    "corenet": {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 20},  # CoreNet ViT modes tiny .. huge
    "openai": {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16},  # OpenAI/OpenCLIP S, B, L, H, g, bigG
    "text": {512: 8, 768: 12, 1024: 16, 1280: 20},  # CLIP text towers (OpenAI, OpenCLIP, CoreNet presets)
}


def _heads(tower: str, family: str, width: int, given: int | None) -> int:
    if given:
        return given
    known = KNOWN_HEADS["text" if tower == "text" else family].get(width)
    if known is None:
        hint = " or --corenet-config CORENET_YAML" if family == "corenet" else ""
        raise ClipjobError(f"model.{tower}.heads: a {tower} tower {width} wide has no standard head count and the "
                           f"weights do not encode it; pass --set model.{tower}.heads=N{hint}")
    return known


def infer_model_config(sd: Tensors, act: str = "gelu", vision_heads: int | None = None,
                       text_heads: int | None = None) -> ModelConfig:
    """The ModelConfig of a clipjob-layout state dict (after `to_clipjob`). Neither the head counts nor the
    activation can be seen in the weights: heads are the given ones, else those of a published tower of that
    width (KNOWN_HEADS), else a ClipjobError naming the option; the activation is the caller's (OpenAI:
    quick_gelu)."""
    try:
        corenet = "visual.stem.conv1.weight" in sd
        family = "corenet" if corenet else "openai"
        vw = sd["visual.ln_post.weight"].shape[0]
        n_pos = sd["visual.pos_embed"].shape[0]
        if corenet:
            patch, grid = 16, math.isqrt(n_pos)
            square = grid * grid == n_pos
        else:
            patch, grid = sd["visual.stem.weight"].shape[-1], math.isqrt(n_pos - 1)
            square = grid * grid == n_pos - 1
        if not square:
            raise ClipjobError(f"visual.pos_embed: {n_pos} positions do not form a square patch grid")
        vision = VisionConfig(
            family=family, image_size=grid * patch, patch_size=patch, width=vw,
            layers=_count_blocks(sd, "visual.transformer.blocks."), heads=_heads("vision", family, vw, vision_heads),
            mlp_ratio=sd["visual.transformer.blocks.0.mlp.0.weight"].shape[0] / vw, act=act,
            ln_eps=1e-6 if corenet else 1e-5)
        tw = sd["text.ln_final.weight"].shape[0]
        text = TextConfig(
            kind="transformer", context_length=sd["text.pos_embed"].shape[0],
            vocab_size=sd["text.token_embedding.weight"].shape[0], width=tw,
            layers=_count_blocks(sd, "text.transformer.blocks."), heads=_heads("text", family, tw, text_heads),
            mlp_ratio=sd["text.transformer.blocks.0.mlp.0.weight"].shape[0] / tw, act=act, ln_eps=1e-5)
        embed = sd["visual.proj"].shape[1]
    except KeyError as e:
        towers = [name for name, prefix in (("a ResNet image tower", "visual.stages."), ("a MiniLM text tower", "text.word."))
                  if any(k.startswith(prefix) for k in sd)]
        if towers:  # clipjob's own towers whose shapes do not spell out their config
            raise ClipjobError(f"{' and '.join(towers)}: the architecture cannot be read from the weights alone; keep "
                               f"the config.yaml clipjob writes beside model.safetensors") from None
        raise ClipjobError(f"checkpoint has no {e.args[0]}: cannot tell its architecture") from None
    return ModelConfig(embed_dim=embed, vision=vision, text=text,
                       range_augment=any(k.startswith("image_augmentor.") for k in sd))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of a model built from `cfg` (built on the meta device: no memory)."""
    from clipjob.model.clip import CLIP

    with torch.device("meta"):
        model = CLIP(cfg, pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def fit_to_config(sd: Tensors, cfg: ModelConfig, source: str, hint: str = "") -> Tensors:
    """Check that `sd` has exactly the keys and shapes of a model built from `cfg` (one-line error naming
    `source` and the first difference, then `hint`). RangeAugment ranges are training-only: dropped when model.range_augment is off,
    filled with their initial values when it is on and the checkpoint has none (e.g. OpenCLIP weights)."""
    from clipjob.model.range_augment import RangeAugment

    want = expected_shapes(cfg)
    sd = {k: v for k, v in sd.items() if cfg.range_augment or not k.startswith("image_augmentor.")}
    if cfg.range_augment and not any(k.startswith("image_augmentor.") for k in sd):
        sd.update({f"image_augmentor.{k}": v for k, v in RangeAugment().state_dict().items()})
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}"
        raise ClipjobError(f"{source}: weights do not fit the model config ({what}); check model.vision/"
                           f"model.text layers{hint}")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            section = "model.vision" if k.startswith("visual.") else "model.text" if k.startswith("text.") else "model"
            raise ClipjobError(f"{source}: {k} has shape {tuple(sd[k].shape)} in the checkpoint but {shape} in the "
                               f"model; check {section} in the config")
    return sd


def count_parameters(cfg: ModelConfig) -> int:
    from clipjob.model.clip import CLIP

    with torch.device("meta"):
        return sum(p.numel() for p in CLIP(cfg, pretrained=False).parameters())


_INIT_FNS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "xavier_uniform_",
             "xavier_normal_")


def model_with_weights(cfg: ModelConfig, sd: Tensors):
    """A CLIP built for `cfg` holding `sd` (loaded strictly, fp32), skipping the random initialisation and the
    copy that loading into a fresh model costs (seconds for a ViT-B, a minute for a ViT-H on a CPU)."""
    from torch import nn

    from clipjob.model.clip import CLIP

    saved = {n: getattr(nn.init, n) for n in _INIT_FNS}
    try:
        for n in _INIT_FNS:
            setattr(nn.init, n, lambda t, *a, **k: t)
        model = CLIP(cfg, pretrained=False)
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)
    want = model.state_dict()
    sd = {k: v.to(want[k].dtype) if k in want else v for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    return model
