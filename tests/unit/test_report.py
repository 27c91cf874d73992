"""report.py: the series a resumed run plots (one point per step, the resumed run's), the panels, top-5 beside
top-1 and the chance line at 1/classes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from clipjob.errors import ClipjobError
from clipjob.report import (ACCURACY_TITLE, PANELS, RETRIEVAL_TITLE, build_figure, draw_report, eval_curves,
                            metric_series)


def _record(step: int, resumed: bool) -> dict:
    """A metrics record whose values say which run wrote it: the first run's loss is the step, the resumed
    run's 100 + step."""
    return {"step": step, "loss": (100.0 if resumed else 0.0) + step, "lr": 1e-3, "logit_scale": 14.0,
            "samples_per_s": 500.0 + step, "data_wait_frac": 0.1, "mfu": 0.25 if resumed else None, "time": step}


RESUMED = [_record(s, False) for s in range(1, 31)] + [_record(s, True) for s in range(21, 41)]


def _result(step: int, data: str, top1: float, classes: int = 8, **extra) -> dict:
    return {"step": step, "data": data, "top1": top1, "top5": top1 + 30, "classes": classes, "ema": False, **extra}


def test_should_plot_one_point_per_step_with_the_resumed_values_when_a_run_resumed():
    series = metric_series(RESUMED)
    steps, loss = series["loss"]
    assert steps == list(range(1, 41)) and all(a < b for a, b in itertools.pairwise(steps))
    assert loss == [float(s) for s in range(1, 21)] + [100.0 + s for s in range(21, 41)]
    assert series["mfu"] == (list(range(21, 41)), [25.0] * 20)  # in %; the first run logged none
    assert series["samples_per_s"][0] == steps and series["data_wait_frac"][1] == [0.1] * 40


def test_should_keep_the_last_result_of_a_step_when_a_step_was_evaluated_again():
    results = [_result(20, "emoji-heldout:d", 10.0), _result(10, "emoji-heldout:d", 5.0),
               _result(20, "emoji-heldout:d", 12.0), _result(20, "emoji-heldout:d", 40.0) | {"ema": True}]
    plain, ema = eval_curves(results)
    assert (plain.label, plain.steps, plain.top1, plain.top5) == ("emoji-heldout:d", [10, 20], [5.0, 12.0], [35.0, 42.0])
    assert (ema.label, ema.top1, plain.chance) == ("emoji-heldout:d (EMA)", [40.0], 100 / 8)
    assert plain.recall == {} and plain.color != ema.color


def test_should_draw_every_panel_and_the_loss_forward_when_metrics_and_results_exist():
    results = [_result(s, "emoji-heldout:d", s / 2, i2t_r1=s / 3, i2t_r5=s, t2i_r1=s / 4, t2i_r5=s / 2)
               for s in (20, 40)]
    fig = build_figure(RESUMED, results, "run")
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == PANELS and len(PANELS) == 8
    assert {"throughput (samples/s)", "data wait (fraction of step time)", "MFU (%)"} <= set(PANELS)
    loss_steps = list(axes["contrastive loss"].lines[0].get_xdata())
    assert loss_steps == list(range(1, 41))
    recall = {line.get_label(): list(line.get_ydata()) for line in axes[RETRIEVAL_TITLE].lines}
    assert recall["emoji-heldout:d text->image R@1"] == [5.0, 10.0] and len(recall) == 4


def test_should_draw_top5_beside_top1_and_a_dashed_chance_line_at_one_over_the_classes():
    results = [_result(s, "emoji-heldout:d", s / 2, classes=8) for s in (20, 40)] + \
              [_result(s, "emoji-seen:d", s, classes=5) for s in (20, 40)]
    ax = {a.get_title(): a for a in build_figure(RESUMED, results, "run").axes}[ACCURACY_TITLE]
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines["emoji-heldout:d top-1"].get_ydata()) == [10.0, 20.0]
    assert list(lines["emoji-heldout:d top-5"].get_ydata()) == [40.0, 50.0]
    chance = {label: line for label, line in lines.items() if line.get_linestyle() == "--"}
    assert sorted(chance) == ["emoji-heldout:d chance 1/8 = 12.50%", "emoji-seen:d chance 1/5 = 20.00%"]
    assert set(chance["emoji-heldout:d chance 1/8 = 12.50%"].get_ydata()) == {100 / 8}
    assert set(chance["emoji-seen:d chance 1/5 = 20.00%"].get_ydata()) == {100 / 5}


def test_should_write_the_png_into_the_run_dir_and_refuse_a_run_without_metrics(tmp_path: Path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RESUMED))
    out = draw_report(str(tmp_path))
    assert out == str(tmp_path / "report.png") and (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ClipjobError, match="no metrics.jsonl"):
        draw_report(str(tmp_path / "empty"))
