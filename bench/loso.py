"""Leave-one-style-out check of the demo recipe: for each emoji style in turn, build the embedded dataset with
that style left out of training (`clipjob data emoji --leave-out STYLE`), train the demo preset on everything
else, and evaluate held-out concepts in the seen style, held-out concepts in the left-out style, seen
concepts in the left-out style, and the held-out concepts in every training emoji style (the larger set: 0.15
point per picture against 0.65). Mean of the seeds given. Noto Color Emoji is never a style here (reserved).

    .venv/bin/python bench/loso.py                                   # both styles, seeds 0 1 (~30 min, 2 cores)
    .venv/bin/python bench/loso.py --styles openmoji --seeds 0 --set data.grayscale_p=0.2
    .venv/bin/python bench/loso.py --data-styles twemoji,openmoji,fluent,glyph --out loso-fluent
    .venv/bin/python bench/loso.py --styles twemoji --seeds 0 --ema --set train.ema_momentum=0.004  # raw and EMA
    .venv/bin/python bench/loso.py --styles twemoji --out loso-x --eval-only   # re-score loso-x's kept runs

Writes bench/results/loso.json (`--out NAME`: NAME.json) and prints a markdown table (top-1 / top-5 beside chance).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CLIPJOB_PY, ROOT, TMP, machine_info, write_result  # noqa: E402

SETS = (("held-out, seen style", "emoji-heldout:{d}"), ("held-out, left-out style", "emoji-heldout:{d}/unseen"),
        ("seen, left-out style", "emoji-seen:{d}/unseen"), ("held-out, all seen styles", "emoji-heldout-styles:{d}"))


def clipjob(*args: str, log: Path) -> None:
    with log.open("a") as f:
        r = subprocess.run([str(CLIPJOB_PY), "-m", "clipjob", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"clipjob {' '.join(args[:2])} failed (exit {r.returncode}); see {log}")


DEFAULT_DATA_STYLES = "twemoji,openmoji,glyph"


def one(style: str, seed: int, sets: list[str], preset: str, log: Path, data_styles: str = DEFAULT_DATA_STYLES,
        named: int = -1, out: str = "loso", ema: bool = False, eval_only: bool = False, data: Path | None = None) -> dict:
    tag = "" if data_styles == DEFAULT_DATA_STYLES else "-" + data_styles.replace(",", "-")
    tag += f"-named{named}" if named >= 0 else ""
    if data and not (data / "heldout_styles" / "manifest.json").exists():  # a variant is never rebuilt here
        raise SystemExit(f"--data {data}: no heldout_styles/ (built before it existed?); rebuild the variant")
    data = data or TMP / f"loso-{style}{tag}"
    if not (data / "heldout_styles" / "manifest.json").exists():  # built deterministically: older builds gain the set
        clipjob("data", "emoji", "--out", str(data), "--leave-out", style, "--styles", data_styles,
                "--named-captions-per-concept", str(named), log=log)
    run = TMP / f"{out}-{style}-seed{seed}"  # one per result name: variants never share a run dir
    train_s, rebuild = None, []
    if eval_only:
        # the model from the preset and the run's own model.* settings, not from the stored config: a run of a
        # training option since removed stores a key today's config refuses
        rebuild = ["--preset", preset, *[x for i in range(0, len(sets), 2) if sets[i + 1].startswith("model.")
                                         for x in sets[i:i + 2]]]
        if not (run / "checkpoints").is_dir():
            raise SystemExit(f"--eval-only: {run} has no checkpoints (run the check without --eval-only first)")
    else:
        subprocess.run(["rm", "-rf", str(run)], check=True)
        t0 = time.monotonic()
        clipjob("train", "--preset", preset, "--set", f"data.train={data}", "--set", f"train.seed={seed}",
                "--set", "train.ckpt_every_steps=1000000", *sets, "--run-dir", str(run), log=log)
        train_s = round(time.monotonic() - t0, 1)
    args = [a for _, spec in SETS for a in ("--data", spec.format(d=data))]
    row = {"style": style, "seed": seed, "data_styles": data_styles, "train_s": train_s}
    evals = [("sets", [])] + ([("ema_sets", ["--ema"])] if ema else [])
    for key, flags in evals:
        out = run / f"loso-eval{'-ema' if flags else ''}.json"
        clipjob("eval", "zeroshot", "--checkpoint", str(run), *args, *flags, *rebuild, "--out", str(out), log=log)
        results = json.loads(out.read_text())  # one result per --data, in order
        row[key] = {name: {k: r[k] for k in ("top1", "top5", "classes")} for (name, _), r in zip(SETS, results)}
    return row


def table(rows: list[dict]) -> str:
    """One line per left-out style (and one more for its EMA weights, when evaluated): mean of the seeds."""
    lines = ["| left-out style | seeds | " + " | ".join(f"{n} top-1 / top-5" for n, _ in SETS) + " | chance top-1 |",
             "|---|---|" + "---|" * (len(SETS) + 1)]
    for style in dict.fromkeys(r["style"] for r in rows):
        mine = [r for r in rows if r["style"] == style]
        for key, label in (("sets", style), ("ema_sets", f"{style}, EMA weights")):
            if key not in mine[0]:
                continue
            cells = []
            for name, _ in SETS:
                t1 = statistics.mean(r[key][name]["top1"] for r in mine)
                t5 = statistics.mean(r[key][name]["top5"] for r in mine)
                cells.append(f"{t1:.2f} / {t5:.2f}")
            chance = 100 / mine[0][key][SETS[1][0]]["classes"]
            lines.append(f"| {label} | {len(mine)} | " + " | ".join(cells) + f" | {chance:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--styles", nargs="+", default=["openmoji", "twemoji"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--preset", default="tiny-cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for training")
    ap.add_argument("--data-styles", default=DEFAULT_DATA_STYLES,
                    help="styles of the dataset (clipjob data emoji --styles); the left-out one is evaluated only")
    ap.add_argument("--named-captions", type=int, default=-1,
                    help="training samples per icon / symbol concept (clipjob data emoji --named-captions-per-concept)")
    ap.add_argument("--out", default="loso", help="Result name under bench/results/ (e.g. loso-resnet: a variant's "
                    "rows beside the demo's, not over them)")
    ap.add_argument("--ema", action="store_true", help="Also evaluate the EMA weights (needs --set "
                    "train.ema_momentum=M): the same run's raw and averaged weights side by side")
    ap.add_argument("--data", type=Path, help="A dataset `clipjob data emoji` (or a variant of it) already built "
                    "with the one --styles style left out, instead of building it here")
    ap.add_argument("--eval-only", action="store_true", help="Evaluate the kept runs of an earlier check with the same "
                    "--out on today's sets instead of training (its train_s is kept)")
    a = ap.parse_args()
    TMP.mkdir(parents=True, exist_ok=True)
    log = TMP / f"{a.out}.log"
    earlier = {}
    if a.eval_only:
        log = TMP / f"{a.out}-eval.log"
        old = ROOT / "bench" / "results" / f"{a.out}.json"
        before = json.loads(old.read_text()) if old.exists() else {}
        earlier = {(r["style"], r["seed"]): r for r in before.get("rows", [])}
        if before:  # the earlier check's training settings (its model.* ones rebuild the model)
            a.sets, a.preset = before["sets"], before["preset"]
    log.write_text("")
    sets = [x for s in a.sets for x in ("--set", s)]
    rows = []
    for style in a.styles:
        for seed in a.seeds:
            rows.append(one(style, seed, sets, a.preset, log, a.data_styles, a.named_captions, a.out, a.ema,
                            a.eval_only, a.data))
            if a.eval_only and (style, seed) in earlier:
                rows[-1]["train_s"] = earlier[(style, seed)]["train_s"]
            print(json.dumps(rows[-1]), flush=True)
            # written after every run, so a stopped check keeps the runs it finished
            head = {"machine": machine_info(), "preset": a.preset, "sets": a.sets, **({"data": a.data} if a.data else {})}
            if a.eval_only and before:  # trained then, scored now
                head = {"machine": before["machine"], "preset": before["preset"], "sets": before["sets"],
                        "rescored_on": machine_info()}
            write_result(a.out, {**head, "named_captions": a.named_captions, "rows": rows, "table": table(rows)})
    print(table(rows))


if __name__ == "__main__":
    main()
