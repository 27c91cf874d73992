"""eval/zeroshot.py: progress lines in a pod's log (no terminal) while evaluating."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from clipjob.config import build_config
from clipjob.eval.zeroshot import EvalSet, evaluate
from clipjob.model import build_model, build_tokenizer

TINY = ["model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2", "model.vision.image_size=16",
        "model.vision.patch_size=8", "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
        "model.text.context_length=16", "model.embed_dim=16"]


def test_should_print_progress_lines_with_an_eta_when_no_terminal_is_attached(capsys):
    cfg = build_config("tiny-cpu-scratch", None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    es = EvalSet("tiny", ["cat", "dog", "bird"], ["a photo of a {}."],
                 TensorDataset(images, torch.tensor([0, 1, 2] * 4)), size=12)
    r = evaluate(model, build_tokenizer(cfg.model), es, torch.device("cpu"), batch_size=4, workers=0,
                 progress_every_s=0.0)  # pytest's stderr is not a terminal: lines, not a bar
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("zero-shot tiny:")]
    assert lines[0].startswith("zero-shot tiny: 4/12 (33.3%), eta ") and lines[-1].startswith("zero-shot tiny: 12/12 (100.0%)")
    assert len(lines) == 3 and r["images"] == 12
