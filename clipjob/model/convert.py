"""Loading weights from any supported checkpoint into a clipjob CLIP state dict."""

from __future__ import annotations

import torch

from clipjob.config import ModelConfig
from clipjob.train import checkpoint as ckpt


def load_any_weights(url: str, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """clipjob step folders, run dirs and single files. Foreign layouts are converted by their adapters."""
    return ckpt.load_weights(ckpt.resolve_checkpoint(url))
