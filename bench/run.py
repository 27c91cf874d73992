"""`make bench`: clipjob beside OpenCLIP on this machine, same model, data, batch size, workers and threads.

    make bench                                   # = .venv/bin/python bench/run.py  (~10-12 min on 2 cores)
    .venv/bin/python bench/run.py --quick        # fewer steps and repeats (~5 min), for a look
    .venv/bin/python bench/run.py --only train,eval
    .venv/bin/python bench/run.py --wait-quiet 1200   # first wait (up to 20 min) for a 1-min load average < 2

Parts, each its own script and process (see bench/README.md for what each measures and how it is kept fair):
  mfu    bench/mfu.py cpu      model FLOPs (FlopCounterMode), isolated training step samples/s, MFU vs a measured matmul
  train  bench/train_bench.py  `clipjob train` vs `open_clip_train.main`: samples/s, peak memory of the process tree
  data   bench/data_bench.py   the data pipelines alone (decode + augment + tokenise), same workers
  eval   bench/eval_bench.py   `clipjob eval zeroshot` vs OpenCLIP's zero-shot path: images/s
  ablate bench/ablate.py       (only when asked: --only ablate) clipjob's step with each speed-up undone alone
OpenCLIP runs from .venv-bench/ (scripts/bench_venv.sh: open_clip_torch[training]==3.3.0, same torch wheels).
Each part writes bench/results/{part}.json; this script adds bench/results/summary.json and prints the table of
ratios (clipjob / OpenCLIP: > 1 means clipjob is faster, or uses more memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (CLIPJOB_PY, RESULTS, ROOT, exit_on_sigterm, loadavg, machine_info,  # noqa: E402
                          ratio, run_env, run_part, versions, wait_for_quiet, write_result)

PARTS = ("mfu", "train", "data", "eval")
EXTRA_PARTS = ("ablate",)  # not in the default run: clipjob alone, each speed-up undone (bench/ablate.py)


def part_commands(a: argparse.Namespace) -> dict[str, list[str]]:
    py = str(CLIPJOB_PY)
    t = str(a.threads)
    if a.quick:
        return {"mfu": [py, "bench/mfu.py", "cpu", "--threads", t, "--steps", "2", "--warmup", "1"],
                "train": [py, "bench/train_bench.py", "--threads", t, "--warmup", "2", "--timed", "5"],
                "data": [py, "bench/data_bench.py", "--images", "500", "--batches", "8", "--repeats", "1", "--no-s3"],
                "eval": [py, "bench/eval_bench.py", "--threads", t, "--repeats", "1", "--per-class", "25"],
                "ablate": [py, "bench/ablate.py", "--threads", t, "--steps", "3", "--warmup", "1"]}
    return {"mfu": [py, "bench/mfu.py", "cpu", "--threads", t, "--steps", "4", "--warmup", "1"],
            "train": [py, "bench/train_bench.py", "--threads", t, "--warmup", "3", "--timed", "10",
                      "--repeats", str(a.train_repeats)],
            "data": [py, "bench/data_bench.py", "--repeats", "5"],
            "eval": [py, "bench/eval_bench.py", "--threads", t, "--repeats", "2"],
            "ablate": [py, "bench/ablate.py", "--threads", t]}


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


# -- the table -----------------------------------------------------------------------------------------------------


def rows(parts_run: list[str]) -> list[dict]:
    """One row per metric: clipjob, OpenCLIP, ratio. Only from the result files this run wrote."""
    mfu = load("mfu") if "mfu" in parts_run else {}
    train = load("train") if "train" in parts_run else {}
    data = load("data") if "data" in parts_run else {}
    ev = load("eval") if "eval" in parts_run else {}
    out: list[dict] = []

    def add(metric: str, unit: str, cj, oc, better: str = "higher") -> None:
        if cj is None and oc is None:
            return
        out.append({"metric": metric, "unit": unit, "clipjob": cj, "openclip": oc, "ratio": ratio(cj, oc),
                    "better": better})

    for p, r in train.get("runs", {}).items():
        add(f"train throughput {p}", "samples/s", r["clipjob"].get("samples_per_s"), r["openclip"].get("samples_per_s"))
        add(f"train throughput {p}, from the median step", "samples/s", r["clipjob"].get("samples_per_s_median_step"),
            r["openclip"].get("samples_per_s_median_step"))
        if "openclip+malloc" in r:  # the peer given clipjob's allocator setting (bench/train_bench.py)
            add(f"train throughput {p}, OpenCLIP with clipjob's malloc setting", "samples/s",
                r["clipjob"].get("samples_per_s"), r["openclip+malloc"].get("samples_per_s"))
    for p, r in mfu.get("runs", {}).items():
        add(f"model step alone {p}", "samples/s", r["clipjob"]["samples_per_s"], r["openclip"]["samples_per_s"])
    for p, r in train.get("runs", {}).items():
        m = mfu.get("runs", {}).get(p)
        if not m:
            continue
        mfus = {}
        for s in ("clipjob", "openclip"):  # each run against the best matmul rate measured around it
            sps, peak = r[s].get("samples_per_s"), r[s].get("peak_tflops") or r[s].get("peak_tflops_before")
            mfus[s] = round(sps * m[s]["flops_per_sample"] / (peak * 1e12), 4) if sps and peak else None
        add(f"MFU training {p} (vs matmul around each run)", "fraction", mfus["clipjob"], mfus["openclip"])
    for p, r in mfu.get("runs", {}).items():
        peak = mfu.get("peak_tflops", {}).get(p, 0)
        add(f"MFU model step alone {p} (vs {peak * 1e3:.0f} GFLOP/s)", "fraction", r["clipjob"]["mfu"],
            r["openclip"]["mfu"])
        if "mfu_vs_shape_peak" in r["clipjob"]:
            add(f"MFU model step alone {p} (vs each model's matmul-shape peak: {r['clipjob']['shape_peak_tflops'] * 1e3:.0f}"
                f" / {r['openclip']['shape_peak_tflops'] * 1e3:.0f} GFLOP/s)", "fraction",
                r["clipjob"]["mfu_vs_shape_peak"], r["openclip"]["mfu_vs_shape_peak"])
    for p, r in mfu.get("runs", {}).items():
        add(f"model FLOPs/sample fwd+bwd {p}", "GFLOP", round(r["clipjob"]["flops_per_sample"] / 1e9, 4),
            round(r["openclip"]["flops_per_sample"] / 1e9, 4), "equal")
        if "executed_flops_per_sample" in r["clipjob"]:
            add(f"executed FLOPs/sample fwd+bwd {p}", "GFLOP", round(r["clipjob"]["executed_flops_per_sample"] / 1e9, 4),
                round(r["openclip"].get("executed_flops_per_sample", r["openclip"]["flops_per_sample"]) / 1e9, 4),
                "lower")
    for p, r in train.get("runs", {}).items():
        add(f"train peak memory {p} (process tree PSS)", "MiB", r["clipjob"]["peak_tree_pss_mib"],
            r["openclip"]["peak_tree_pss_mib"], "lower")
        add(f"train peak memory {p} (process tree RSS)", "MiB", r["clipjob"]["peak_tree_rss_mib"],
            r["openclip"]["peak_tree_rss_mib"], "lower")
    for where, r in data.get("results", {}).items():
        peer = r.get("openclip_wds") or r.get("openclip") or {}
        px = data.get("setup", {}).get("image_size", "?")
        add(f"data pipeline ({where} shards, {px} px)", "samples/s", r.get("clipjob", {}).get("samples_per_s"),
            peer.get("samples_per_s"))
        add(f"data pipeline CPU per sample ({where})", "ms", r.get("clipjob", {}).get("cpu_ms_per_sample"),
            peer.get("cpu_ms_per_sample"), "lower")
    for p, b in ev.get("best", {}).items():
        add(f"zero-shot eval {p}", "images/s", b["clipjob"].get("images_per_s"), b["openclip"].get("images_per_s"))
        add(f"zero-shot eval {p}, whole process", "images/s", b["clipjob"].get("images_per_s_wall"),
            b["openclip"].get("images_per_s_wall"))
    for p, b in ev.get("best", {}).items():
        add(f"zero-shot eval peak memory {p} (tree PSS)", "MiB", b["clipjob"].get("peak_tree_pss_mib"),
            b["openclip"].get("peak_tree_pss_mib"), "lower")
    return out


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v < 10:
        return f"{v:.3f}"
    return f"{v:,.1f}" if isinstance(v, float) else str(v)


def print_table(table: list[dict]) -> None:
    w = max([len(r["metric"]) for r in table] + [10])
    print(f"\n{'metric':{w}s} {'unit':>9s} {'clipjob':>10s} {'OpenCLIP':>10s} {'ratio':>7s}  (clipjob / OpenCLIP)")
    print("-" * (w + 50))
    for r in table:
        note = {"higher": "", "lower": " (lower is better)", "equal": " (should be 1)"}[r["better"]]
        print(f"{r['metric']:{w}s} {r['unit']:>9s} {fmt(r['clipjob']):>10s} {fmt(r['openclip']):>10s} "
              f"{fmt(r['ratio']):>7s}{note}")


def markdown_table(table: list[dict]) -> str:
    """The README's table, from a summary's rows."""
    lines = ["| metric | unit | clipjob | OpenCLIP | ratio |", "|---|---|---|---|---|"]
    for r in table:
        note = {"higher": "", "lower": " (lower is better)", "equal": " (should be 1)"}[r["better"]]
        lines.append(f"| {r['metric']}{note} | {r['unit']} | {fmt(r['clipjob'])} | {fmt(r['openclip'])} | "
                     f"{fmt(r['ratio'])} |")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(PARTS), help=f"Comma-separated parts ({', '.join(PARTS)})")
    ap.add_argument("--quick", action="store_true", help="Fewer steps and repeats (numbers are noisier)")
    ap.add_argument("--threads", type=int, default=2, help="Intra-op threads of every benchmarked process")
    ap.add_argument("--wait-quiet", type=float, default=0, help="Seconds to wait for a quiet machine first")
    ap.add_argument("--max-load", type=float, default=2.0, help="1-minute load average counted as quiet")
    ap.add_argument("--train-repeats", type=int, default=1, help="Training runs per side and precision (best counts)")
    ap.add_argument("--markdown", action="store_true", help="Print bench/results/summary.json's table as Markdown; run nothing")
    a = ap.parse_args()
    if a.markdown:
        print(markdown_table(load("summary").get("table", [])))
        return 0
    exit_on_sigterm()
    only = [p for p in a.only.split(",") if p]
    unknown = set(only) - set(PARTS) - set(EXTRA_PARTS)
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; known: {', '.join(PARTS + EXTRA_PARTS)}")
    if not CLIPJOB_PY.exists():
        ap.error(f"{CLIPJOB_PY} not found: run `make venv-dev` first")

    t0 = time.monotonic()
    if {"train", "eval"} & set(only):
        print("== OpenCLIP's venv (.venv-bench)", flush=True)
        if subprocess.run(["bash", "scripts/bench_venv.sh"], cwd=ROOT).returncode != 0:
            print("error: scripts/bench_venv.sh failed; the OpenCLIP side cannot run", file=sys.stderr)
            return 2
    quiet = wait_for_quiet(a.max_load, a.wait_quiet) if a.wait_quiet > 0 else {"load_when_started": loadavg()}
    load_start = quiet["load_when_started"]
    if load_start[0] >= a.max_load:
        print(f"warning: load average {load_start} >= {a.max_load} on {os.cpu_count()} CPUs: other processes compete "
              "for the cores and the numbers (both sides) will be low and noisy", flush=True)
    cmds = part_commands(a)
    parts: dict[str, dict] = {}
    for name in only:
        print(f"== {name}: {' '.join(cmds[name][1:])}  (load {loadavg()})", flush=True)
        ts = time.monotonic()
        rc = run_part(cmds[name], env=run_env(a.threads))
        parts[name] = {"rc": rc, "seconds": round(time.monotonic() - ts, 1), "command": " ".join(cmds[name]),
                       "load_after": loadavg()}
        if rc != 0:
            print(f"warning: part {name} failed (exit {rc}); its numbers are left out", flush=True)
    ok = [n for n in only if parts[n]["rc"] == 0]
    if not set(only) & set(PARTS):  # extra parts only (ablate): summary.json and its table stay as they are
        print(f"\n{time.monotonic() - t0:.0f} s in all; wrote " + ", ".join(f"bench/results/{n}.json" for n in ok))
        return 0 if len(ok) == len(only) else 1
    table = rows(ok)
    summary = {"what": "clipjob / OpenCLIP side-by-side benchmark (bench/README.md)", "machine": machine_info(),
               "versions": versions(), "quick": a.quick, "threads": a.threads, "quiet": quiet,
               "load_at_start": load_start, "load_at_end": loadavg(), "parts": parts,
               "total_s": round(time.monotonic() - t0, 1), "table": table}
    path = write_result("summary", summary)
    print_table(table)
    print(f"\nload average at start {load_start}, at end {loadavg()}; {summary['total_s']:.0f} s in all; "
          f"wrote {path.relative_to(ROOT)} (+ {', '.join(f'{n}.json' for n in ok)})")
    return 0 if len(ok) == len(only) else 1


if __name__ == "__main__":
    sys.exit(main())
