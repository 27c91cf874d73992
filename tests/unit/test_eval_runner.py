"""eval/runner.py: which settings an evaluation takes from the checkpoint's config."""

from __future__ import annotations

import torch

from clipjob.config import build_config
from clipjob.eval import runner


def test_should_take_the_eval_batch_size_from_the_config_unless_the_command_line_gives_one(monkeypatch):
    seen = []
    monkeypatch.setattr(runner, "build_eval_set", lambda *a, **k: None)
    monkeypatch.setattr(runner, "format_result", lambda r: "")
    monkeypatch.setattr(runner, "evaluate", lambda model, tok, es, device, batch_size, *a, **k: seen.append(batch_size) or {})
    cfg = build_config("tiny-cpu", None, ["eval.batch_size=7"])
    model = torch.nn.Linear(1, 1)
    runner.evaluate_model(model, cfg, "run/checkpoints/step-00000003", ["folder:x"])
    runner.evaluate_model(model, cfg, "run/checkpoints/step-00000003", ["folder:x"], batch_size=5)
    assert seen == [7, 5]
