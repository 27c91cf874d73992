"""CoreNet CLIP YAML -> clipjob config: `clipjob config from-corenet projects/clip/clip_vit_base.yaml`.

Maps what clipjob can express (model sizes, optimizer, schedule, batch per GPU, iterations, warmup, the
multi-scale variable-batch sampler, RangeAugment, EMA, precision, checkpoint interval, ImageNet eval). A key
whose value is what clipjob does anyway (e.g. `optim.no_decay_bn_filter_bias: true`) counts as mapped. Keys
that cannot change what is computed (logging, paths, loader workers, eval batch sizes: NEUTRAL) are returned
as "ignored" and printed as a list. Every other key is refused in one line (ConfigError, exit 2): a value
clipjob does not implement (`activation: relu`, `causal_masking: false`), or a misspelled key
(`scheduler.max_iteration`), would otherwise train something else than the YAML says.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clipjob.config import Config, from_dict, merge, to_dict, to_yaml, validate
from clipjob.errors import ConfigError

# CoreNet ViT modes: (width, layers, heads); FFN = 4 x width in every mode
VIT_MODES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
             "huge": (1280, 32, 20)}
PRECISIONS = {"float16": "fp16", "bfloat16": "bf16"}
# keys that hold clipjob's behaviour already when they have these values
SAME_AS_CLIPJOB: dict[str, tuple] = {
    "common.auto_resume": (True,),
    "optim.name": ("adamw",), "optim.no_decay_bn_filter_bias": (True,),
    "scheduler.name": ("cosine",), "scheduler.is_iteration_based": (True,),
    "model.multi_modal_image_text.name": ("clip",), "model.classification.name": ("vit",),
    "model.multi_modal_image_text.lr_multiplier_img_encoder": (1.0,),
    "model.multi_modal_image_text.lr_multiplier_text_encoder": (1.0,),
    "model.image_projection_head.name": ("simple_projection_nc2nc",),
    "model.classification.vit.norm_layer": ("layer_norm", "layer_norm_fp32"),
    "model.text.transformer.norm_layer": ("layer_norm", "layer_norm_fp32"),
    "model.text.name": ("transformer",), "model.text.transformer.causal_masking": (True,),
    "model.text.transformer.no_scale_embedding": (False,), "model.text.transformer.no_pos_embedding": (False,),
    "model.text.transformer.embed_dropout": (0.0,), "model.text.transformer.dropout": (0.0,),
    "model.text.transformer.attn_dropout": (0.0,), "model.text.transformer.ffn_dropout": (0.0,),
    "model.activation.name": ("gelu",), "model.classification.activation.name": ("gelu",),
    "model.activation.inplace": (True, False), "model.normalization.name": ("batch_norm",),
    "model.normalization.momentum": (0.1,), "model.learn_augmentation.mode": ("distribution",),
    "text_tokenizer.name": ("clip", "openai_clip"),
    "image_augmentation.random_resized_crop.enable": (True,),
    "image_augmentation.random_resized_crop.interpolation": ("bilinear",),
    "image_augmentation.resize.enable": (True,), "image_augmentation.resize.interpolation": ("bilinear",),
    "image_augmentation.center_crop.enable": (True,),
    "loss.category": ("composite_loss",),
    "dataset.category": ("multi_modal_image_text",),
    "dataset.multi_modal_img_text.trunc_seq_len": (False,),
}
# keys (or key prefixes, ending in '.') that cannot change what is trained or evaluated: names, paths, logging,
# loader processes, eval batch sizes, and CoreNet's weight-initialisation choices (clipjob initialises its
# towers its own way; the architecture and recipe are unchanged)
NEUTRAL = ("taskname", "common.run_label", "common.results_loc", "common.save_all_checkpoints",
           "common.tensorboard_logging", "common.bolt_logging", "common.channels_last", "common.resume",
           "dataset.root_train", "dataset.root_val", "dataset.root_test", "dataset.name", "dataset.val_batch_size0",
           "dataset.eval_batch_size0", "dataset.persistent_workers", "dataset.pin_memory", "dataset.workers",
           "dataset.prefetch_factor", "dataset.collate_fn_name_", "dataset.multi_modal_img_text.img_text_tar",
           "text_tokenizer.clip.merges_path", "text_tokenizer.clip.encoder_json_path", "sampler.use_shards",
           "sampler.start_shuffling_from_epoch", "stats.", "ddp.", "model.layer.global_pool",
           "model.layer.conv_init", "model.layer.linear_init", "model.layer.linear_init_std_dev")


def _neutral(key: str) -> bool:
    return any(key == n or key.startswith(n if n.endswith((".", "_")) else n + ".") for n in NEUTRAL)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (and lists of mappings) -> {'a.b.c': value}."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data}


def make_divisible(v: float, divisor: int) -> int:
    """CoreNet's rounding of a resolution to a multiple of `divisor` (never more than 10% down)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def multiscale_sizes(base: int, lo: int, hi: int, n: int, divisor: int) -> list[int]:
    """The variable-batch sampler's resolutions: linspace(lo, hi, n) plus the base size, made divisible."""
    return sorted({make_divisible(float(s), divisor) for s in [*np.linspace(lo, hi, n), base]})


class _Reader:
    """Reads flattened CoreNet keys and records which ones were used."""

    def __init__(self, flat: dict[str, Any]):
        self.flat, self.used = flat, set()

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.flat:
            self.used.add(key)
            return self.flat[key]
        return default

    def has(self, key: str) -> bool:
        return key in self.flat


def _set(out: dict, dotted: str, value: Any) -> None:
    node = out
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def _model(r: _Reader, out: dict) -> None:
    is_vit = r.flat.get("model.classification.name") == "vit"
    mode = r.get("model.classification.vit.mode", "base" if is_vit else None)  # CoreNet's default mode: base
    if mode is not None:
        if mode not in VIT_MODES:
            raise ConfigError(f"model.classification.vit.mode: {mode!r} is not one of {', '.join(VIT_MODES)}")
        w, layers, heads = VIT_MODES[mode]
        _set(out, "model.vision", {"family": "corenet", "patch_size": 16, "width": w, "layers": layers,
                                   "heads": heads, "mlp_ratio": 4.0, "act": "gelu", "ln_eps": 1e-6})
    for src, dst in [("model.multi_modal_image_text.clip.projection_dim", "model.embed_dim"),
                     ("model.text.vocab_size", "model.text.vocab_size"),
                     ("model.text.context_length", "model.text.context_length"),
                     ("model.text.transformer.model_dim", "model.text.width"),
                     ("model.text.transformer.n_transformer_layers", "model.text.layers"),
                     ("model.text.transformer.n_heads_per_layer", "model.text.heads"),
                     ("model.activation_checkpointing", "model.grad_checkpointing")]:
        if r.has(src):
            _set(out, dst, r.get(src))
    ffn = r.flat.get("model.text.transformer.ffn_multiplier_per_layer")
    if isinstance(ffn, (int, float)):
        _set(out, "model.text.mlp_ratio", float(r.get("model.text.transformer.ffn_multiplier_per_layer")))
    if r.has("model.text.transformer.model_dim"):
        _set(out, "model.text", {**out["model"]["text"], "kind": "transformer", "act": "gelu", "ln_eps": 1e-5})
    ctx = r.flat.get("dataset.multi_modal_img_text.context_length")
    if ctx is not None and ctx == r.flat.get("model.text.context_length", ctx):
        r.get("dataset.multi_modal_img_text.context_length")
    aug = [r.flat.get(f"model.learn_augmentation.{n}") for n in ("brightness", "contrast", "noise")]
    if all(a is True for a in aug):  # RangeAugment as clipjob implements it: all three operations
        for n in ("brightness", "contrast", "noise"):
            r.get(f"model.learn_augmentation.{n}")
        _set(out, "model.range_augment", True)


def _loss(r: _Reader, out: dict) -> None:
    i = 0
    while r.has(f"loss.composite_loss.{i}.loss_category"):
        p = f"loss.composite_loss.{i}."
        cat, weight = r.flat[p + "loss_category"], r.flat.get(p + "loss_weight", 1.0)
        if cat == "multi_modal_image_text" and r.flat.get(p + "multi_modal_image_text.name") == "contrastive_loss_clip" \
                and weight == 1.0:
            for k in ("loss_category", "loss_weight", "multi_modal_image_text.name"):
                r.get(p + k)
            _set(out, "train.loss", "clip")
        if cat == "neural_augmentation" and weight == 1.0 and r.flat.get(p + "neural_augmentation.perceptual_metric") == "psnr" \
                and list(r.flat.get(p + "neural_augmentation.target_value") or []) == [40, 20] \
                and r.flat.get(p + "neural_augmentation.curriculum_method") == "cosine":
            for k in ("loss_category", "loss_weight", "neural_augmentation.perceptual_metric",
                      "neural_augmentation.target_value", "neural_augmentation.curriculum_method"):
                r.get(p + k)
        i += 1


def _train(r: _Reader, out: dict) -> None:
    for src, dst in [("dataset.train_batch_size0", "train.batch_size"), ("scheduler.max_iterations", "train.steps"),
                     ("scheduler.warmup_iterations", "train.warmup_steps"),
                     ("scheduler.warmup_init_lr", "train.warmup_init_lr"), ("scheduler.cosine.max_lr", "train.lr"),
                     ("scheduler.cosine.min_lr", "train.min_lr"), ("optim.weight_decay", "train.weight_decay"),
                     ("optim.adamw.eps", "train.eps"), ("common.save_interval_freq", "train.ckpt_every_steps"),
                     ("common.log_freq", "train.log_every"), ("common.accum_freq", "train.accum_steps")]:
        if r.has(src):
            _set(out, dst, r.get(src))
    if r.has("optim.adamw.beta1") or r.has("optim.adamw.beta2"):
        _set(out, "train.betas", [r.get("optim.adamw.beta1", 0.9), r.get("optim.adamw.beta2", 0.999)])
    if r.flat.get("scheduler.is_iteration_based") is True:
        r.get("scheduler.max_epochs")  # unused when the schedule counts iterations
    if r.has("ema.enable"):
        momentum = float(r.get("ema.momentum", 0.0001))  # read either way: without EMA it changes nothing
        _set(out, "train.ema_momentum", momentum if r.get("ema.enable") else 0.0)
    if r.has("common.mixed_precision"):
        dtype = r.get("common.mixed_precision_dtype", "float16")
        if dtype not in PRECISIONS:
            raise ConfigError(f"common.mixed_precision_dtype: {dtype!r} is not one of {', '.join(PRECISIONS)}")
        _set(out, "train.precision", PRECISIONS[dtype] if r.get("common.mixed_precision") else "fp32")


def _data(r: _Reader, out: dict) -> None:
    if r.has("image_augmentation.random_resized_crop.scale"):
        _set(out, "data.rrc_scale", list(r.get("image_augmentation.random_resized_crop.scale")))
    workers = r.flat.get("dataset.workers")
    if isinstance(workers, int) and workers >= 0:
        _set(out, "data.num_workers", r.get("dataset.workers"))
    vbs = "sampler.vbs."
    if r.flat.get("sampler.name") == "variable_batch_sampler":
        r.get("sampler.name")
        w, h = r.get(vbs + "crop_size_width", 224), r.get(vbs + "crop_size_height", 224)
        lo, hi = r.get(vbs + "min_crop_size_width", 160), r.get(vbs + "max_crop_size_width", 320)
        square = (w, lo, hi) == (h, r.get(vbs + "min_crop_size_height", 160), r.get(vbs + "max_crop_size_height", 320))
        if not square:
            raise ConfigError(f"{vbs}*: clipjob's multi-scale sampler uses square crops; width and height ranges differ")
        sizes = multiscale_sizes(w, lo, hi, int(r.get(vbs + "max_n_scales", 5)), int(r.get(vbs + "check_scale", 32)))
        _set(out, "data.multiscale", True)
        _set(out, "data.multiscale_sizes", sizes)
        _set(out, "model.vision.image_size", make_divisible(w, int(r.flat.get(vbs + "check_scale", 32))))
    elif r.flat.get("sampler.name") == "batch_sampler":
        r.get("sampler.name")
        _set(out, "model.vision.image_size", r.get("sampler.bs.crop_size_width", 224))
        r.get("sampler.bs.crop_size_height")
    base = out.get("model", {}).get("vision", {}).get("image_size", 224)
    crop = r.get("image_augmentation.center_crop.size")
    if crop is not None and crop != base:
        _set(out, "eval.resolution", crop)
    if r.flat.get("image_augmentation.resize.size") == (crop or base):
        r.get("image_augmentation.resize.size")
    root = r.flat.get("dataset.root_val")
    if root and r.flat.get("dataset.multi_modal_img_text.zero_shot_img_cls_dataset_name") == "imagenet":
        _set(out, "eval.data", f"imagenet:{r.get('dataset.root_val')}")
        r.get("dataset.multi_modal_img_text.zero_shot_img_cls_dataset_name")


def import_corenet(data: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """A CoreNet CLIP config (parsed YAML) -> (validated clipjob Config, {ignored dotted key: value}); only keys
    that cannot change the result are ignored, any other key clipjob does not map is a ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError("CoreNet config: expected a mapping at the top level")
    r = _Reader(flatten(data))
    out: dict[str, Any] = {}
    _model(r, out)
    _loss(r, out)
    _train(r, out)
    _data(r, out)
    for key, values in SAME_AS_CLIPJOB.items():
        if key in r.flat and r.flat[key] in values:
            r.used.add(key)
    unused = {k: v for k, v in r.flat.items() if k not in r.used and not k.startswith("_")}
    refused = {k: v for k, v in unused.items() if not _neutral(k)}
    if refused:
        listed = ", ".join(f"{k}={v!r}" for k, v in refused.items())
        raise ConfigError(f"CoreNet config: {len(refused)} key(s) would change what is trained and clipjob does not "
                          f"implement them (or does not know them: misspelled?): {listed}; remove them or use the "
                          f"values clipjob implements (docs/corenet.md)")
    cfg = from_dict(Config, merge(to_dict(Config()), out))
    validate(cfg)
    return cfg, unused


def corenet_yaml_to_clipjob(url: str) -> tuple[str, list[str]]:
    """(clipjob config YAML, lines listing the ignored result-neutral CoreNet keys) for a CoreNet YAML at any
    fsspec URL."""
    from clipjob.config import load_yaml

    cfg, ignored = import_corenet(load_yaml(url))
    header = f"# converted from CoreNet config {url} by `clipjob config from-corenet`\n"
    return header + to_yaml(cfg), [f"ignored: {k} = {v!r}" for k, v in ignored.items()]
