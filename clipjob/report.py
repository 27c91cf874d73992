"""`clipjob report RUN`: a run's curves over steps in one PNG (RUN/report.png).

Panels: contrastive loss, logit scale, learning rate, throughput (samples/s, all ranks), data wait (the fraction of
step time spent waiting for a batch), MFU, zero-shot accuracy (top-1 solid, top-5 dotted, chance 1/classes dashed,
one colour per eval set) and retrieval recall (R@1 and R@5, image->text solid, text->image dashed).
Sources: `metrics.jsonl` (a resumed run logs the steps after its checkpoint again: the last record of each step
wins, so every curve runs forward, one point per step) and `eval/results.jsonl` (likewise the last result of
each step, set and weights (EMA or not)).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from clipjob import fs
from clipjob.errors import ClipjobError
from clipjob.status import last_per_step
from clipjob.train.metrics import read_jsonl

# (metrics.jsonl key, panel title, scale of the plotted value)
METRIC_PANELS = [("loss", "contrastive loss", 1.0), ("logit_scale", "logit scale", 1.0), ("lr", "learning rate", 1.0),
                 ("samples_per_s", "throughput (samples/s)", 1.0),
                 ("data_wait_frac", "data wait (fraction of step time)", 1.0), ("mfu", "MFU (%)", 100.0)]
ACCURACY_TITLE = "zero-shot accuracy (%)"
RETRIEVAL_TITLE = "retrieval recall (%)"
PANELS = [title for _, title, _ in METRIC_PANELS] + [ACCURACY_TITLE, RETRIEVAL_TITLE]
RECALL_LINES = [("i2t_r1", "image->text R@1", "-", "o"), ("i2t_r5", "image->text R@5", ":", "o"),
                ("t2i_r1", "text->image R@1", "--", "^"), ("t2i_r5", "text->image R@5", "-.", "^")]
ACCURACY_LINES = [("top-1", "-", "o"), ("top-5", ":", "s"), ("chance 1/classes", "--", "")]
NO_DATA = {"mfu": "not measured (no peak FLOP/s known for this device)"}


def metric_series(rows: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values) for each panel's metric: one point per step, the last record of a step winning
    (a resumed run's), in step order; records without a number for the key are left out (MFU on a device
    without a known peak)."""
    records = last_per_step(rows)
    series = {}
    for key, _, scale in METRIC_PANELS:
        pts = [(r["step"], scale * r[key]) for r in records if _number(r.get(key))]
        series[key] = ([s for s, _ in pts], [v for _, v in pts])
    return series


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class EvalCurve:
    """One eval set's results over steps."""

    label: str  # the --data spec, "(EMA)" added for EMA weights
    steps: list[int]
    top1: list[float]  # % at `steps`; empty for a set without classes (captions:)
    top5: list[float]
    classes: int | None  # of the newest result
    recall: dict[str, list[float]] = field(default_factory=dict)  # i2t_r1 ... -> % at `steps` (retrieval sets)
    color: str = "C0"  # the same in every panel

    @property
    def chance(self) -> float | None:
        """Top-1 chance in %: 100 / classes."""
        return 100.0 / self.classes if self.classes else None


def eval_curves(results: list[dict[str, Any]]) -> list[EvalCurve]:
    """One curve per (set, EMA or not), one point per step (the last result written for it wins)."""
    last: dict[tuple[str, bool], dict[int, dict]] = {}
    for r in results:
        if isinstance(r.get("step"), int) and r.get("data"):
            last.setdefault((r["data"], bool(r.get("ema"))), {})[r["step"]] = r
    curves = []
    for i, ((data, ema), by_step) in enumerate(sorted(last.items())):
        rs = [by_step[s] for s in sorted(by_step)]
        classes = rs[-1].get("classes")
        recall = {key: _values(rs, key) for key, *_ in RECALL_LINES}
        curves.append(EvalCurve(f"{data} (EMA)" if ema else data, [r["step"] for r in rs], _values(rs, "top1"),
                                _values(rs, "top5"), classes if _number(classes) and classes > 0 else None,
                                {k: v for k, v in recall.items() if v}, color=f"C{i % 10}"))
    return curves


def _values(results: list[dict[str, Any]], key: str) -> list[float]:
    """`key` of each result (NaN where one lacks it); [] when none has it."""
    if not any(_number(r.get(key)) for r in results):
        return []
    return [float(r[key]) if _number(r.get(key)) else float("nan") for r in results]


def build_figure(rows: list[dict[str, Any]], results: list[dict[str, Any]], title: str):
    """The report's matplotlib Figure: one axes per entry of PANELS, titled as there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig = plt.figure(figsize=(15, 11))
    grid = fig.add_gridspec(3, 6)
    first = fig.add_subplot(grid[0, 0:2])  # every panel shares its step axis
    first.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes = [first] + [fig.add_subplot(grid[r, c:c + w], sharex=first)
                      for r, c, w in [(0, 2, 2), (0, 4, 2), (1, 0, 2), (1, 2, 2), (1, 4, 2), (2, 0, 3), (2, 3, 3)]]
    series = metric_series(rows)
    for ax, (key, name, _) in zip(axes, METRIC_PANELS):
        steps, values = series[key]
        ax.plot(steps, values, linewidth=1, marker="o" if len(steps) <= 30 else None, markersize=3)  # dots: few logs
        _titled(ax, name, bool(steps), NO_DATA.get(key, "no data"))
    curves = eval_curves(results)
    _accuracy_panel(axes[6], [c for c in curves if c.top1])
    _retrieval_panel(axes[7], [c for c in curves if c.recall])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _titled(ax, title: str, has_data: bool, empty: str = "no data") -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if not has_data:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_yticks([])


def _legend(ax, curves: list[EvalCurve], styles: list[tuple[str, str, str]]) -> None:
    """One entry per set (its colour) and one per line style (in gray): a short legend for many lines."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c.color, linewidth=3, label=c.label) for c in curves]
    handles += [Line2D([], [], color="gray", linestyle=ls, marker=m or None, label=name) for name, ls, m in styles]
    ax.legend(handles=handles, fontsize=7, loc="best")


def _accuracy_panel(ax, curves: list[EvalCurve]) -> None:
    """Top-1 (solid) and top-5 (dotted) per set in its colour, its chance 1/classes as a dashed line."""
    for c in curves:
        ax.plot(c.steps, c.top1, "-o", color=c.color, markersize=4, label=f"{c.label} top-1")
        ax.plot(c.steps, c.top5, ":s", color=c.color, markersize=3, label=f"{c.label} top-5")
        if c.chance is not None:
            ax.axhline(c.chance, linestyle="--", linewidth=1, color=c.color, alpha=0.7,
                       label=f"{c.label} chance 1/{c.classes} = {c.chance:.2f}%")
    _titled(ax, ACCURACY_TITLE, bool(curves), "no zero-shot results yet")
    if curves:
        ax.set_ylim(bottom=0)
        _legend(ax, curves, ACCURACY_LINES)


def _retrieval_panel(ax, curves: list[EvalCurve]) -> None:
    """R@1 and R@5 per set in its colour, each direction and K in its own line style."""
    for c in curves:
        for key, name, style, marker in RECALL_LINES:
            if key in c.recall:
                ax.plot(c.steps, c.recall[key], linestyle=style, marker=marker, markersize=3, color=c.color,
                        label=f"{c.label} {name}")
    _titled(ax, RETRIEVAL_TITLE, bool(curves), "no retrieval results (clipjob eval zeroshot --retrieval)")
    if curves:
        ax.set_ylim(bottom=0)
        _legend(ax, curves, [(name, style, marker) for _, name, style, marker in RECALL_LINES])


def draw_report(run_dir: str, out: str | None = None) -> str:
    """Draw RUN/report.png (or `out`, any fsspec URL) and return where it went."""
    rows = read_jsonl(fs.join(run_dir, "metrics.jsonl"))
    if not rows:
        raise ClipjobError(f"{run_dir}: no metrics.jsonl (has this run trained yet?)")
    fig = build_figure(rows, read_jsonl(fs.join(run_dir, "eval", "results.jsonl")), run_dir)
    out = out or fs.join(run_dir, "report.png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    fs.write_bytes(out, buf.getvalue())
    return out
