"""`clipjob report RUN`: loss, logit scale, lr and eval accuracy over steps, in one PNG."""

from __future__ import annotations

import io

from clipjob import fs
from clipjob.errors import ClipjobError
from clipjob.train.metrics import read_jsonl


def draw_report(run_dir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(fs.join(run_dir, "metrics.jsonl"))
    if not rows:
        raise ClipjobError(f"{run_dir}: no metrics.jsonl (has this run trained yet?)")
    evals = read_jsonl(fs.join(run_dir, "eval", "results.jsonl"))
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, key, title in [(axes[0, 0], "loss", "contrastive loss"), (axes[0, 1], "logit_scale", "logit scale"),
                           (axes[1, 0], "lr", "learning rate")]:
        ax.plot(steps, [r.get(key, float("nan")) for r in rows])
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes[1, 1]
    for name in sorted({e["data"] for e in evals}):
        pts = sorted((e["step"], e["top1"]) for e in evals if e["data"] == name and e.get("step") is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{name} top-1")
    ax.set_title("zero-shot accuracy (%)" if evals else "zero-shot accuracy (no eval results yet)")
    ax.set_xlabel("step")
    if evals:
        ax.legend(fontsize=7)
    fig.suptitle(run_dir)
    fig.tight_layout()
    out = out or fs.join(run_dir, "report.png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    fs.write_bytes(out, buf.getvalue())
    return out
