"""Training throughput and peak memory: `clipjob train` vs OpenCLIP's `open_clip_train.main`, same model, shards,
batch size, data workers and threads, each run as its user would run it (a CLI process of its own).

    .venv/bin/python bench/train_bench.py            # fp32 + bf16 (needs .venv-bench: scripts/bench_venv.sh)
    .venv/bin/python bench/train_bench.py --precisions bf16 --timed 8 --warmup 2     # a quick look

Model: bench/common.py TINY (ViT 6 x 256, patch 8 at 64 px; text transformer 6 x 256, context 32; embed 256),
built by clipjob from preset tiny-cpu-scratch + `--set` overrides and by OpenCLIP from a model config JSON
registered with `open_clip.add_model_config` before `open_clip_train.main.main(argv)` runs. Same optimiser
settings (AdamW 5e-4, betas 0.9/0.98, eps 1e-6, wd 0.2, 10 warmup steps), no grad clipping, no checkpoints
until the end, resampled shards on both sides, same shuffle buffer (OpenCLIP's fixed 5000).

Samples/s: each tool logs every step (clipjob: metrics.jsonl `step_time_s`; OpenCLIP: its "Batch (t)" log
field, the wall time between consecutive steps); steps 1..warmup are dropped and the next `timed` steps are
summed, so both sides are timed over the same step indices, data waits included. Peak memory: the process
tree (trainer + DataLoader workers), polled from /proc. Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (CLIPJOB_PY, OPENCLIP_MODEL_NAME, PEER_PY, ROOT, TINY, TMP, ModelSpec,  # noqa: E402
                          default_precisions, exit_on_sigterm, machine_info, ratio, run_env, run_monitored, tail,
                          versions, write_result)

OPENCLIP_SHUFFLE = 5000  # open_clip_train.data._SAMPLE_SHUFFLE_SIZE (not a flag); clipjob is set to match
LR, WD, BETAS, EPS, WARMUP_LR_STEPS = 5e-4, 0.2, (0.9, 0.98), 1e-6, 10
# A third side: OpenCLIP with the host-allocator setting clipjob makes itself (clipjob/hostmem.py: no mmap'd
# chunks, 1 GiB trim threshold), given through glibc's tunables, so the table shows how much of clipjob's lead
# is that setting and how much is the rest.
PEER_MALLOC = "openclip+malloc"
PEER_MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"

# open_clip_train.main with a model config registered first (its CLI takes only known model names)
OPENCLIP_MAIN = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                 "from open_clip_train.main import main; main(sys.argv[2:])")


# -- data -------------------------------------------------------------------------------------------------------


def emoji_shards(folder: Path) -> Path:
    """The embedded emoji dataset (`clipjob data emoji`), built once into the bench's scratch folder."""
    if not (folder / "manifest.json").exists():
        r = subprocess.run([str(CLIPJOB_PY), "-m", "clipjob", "data", "emoji", "--out", str(folder)], cwd=ROOT,
                           env=run_env(2), capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"clipjob data emoji failed:\n{r.stdout}\n{r.stderr}")
    return folder


def shard_pattern(folder: Path) -> str:
    """The shards of a manifest as OpenCLIP's --train-data wants them: a brace range when the names are
    numbered consecutively (train-{000000..000012}.tar), else paths joined with '::'."""
    names = [s["name"] for s in json.loads((folder / "manifest.json").read_text())["shards"]]
    m = [re.fullmatch(r"(.*?)(\d+)\.tar", n) for n in names]
    if all(m) and len({x.group(1) for x in m}) == 1:
        nums = [x.group(2) for x in m]
        if [int(n) for n in nums] == list(range(int(nums[0]), int(nums[0]) + len(nums))):
            return str(folder / f"{m[0].group(1)}{{{nums[0]}..{nums[-1]}}}.tar")
    return "::".join(str(folder / n) for n in names)


# -- the two commands -------------------------------------------------------------------------------------------


def clipjob_cmd(spec: ModelSpec, data: Path, run_dir: Path, precision: str, a: argparse.Namespace) -> list[str]:
    steps = a.warmup + a.timed
    sets = spec.clipjob_sets() + [
        f"data.train={data}", f"data.num_workers={a.workers}", f"data.shuffle_buffer={OPENCLIP_SHUFFLE}",
        "data.rrc_scale=[0.9,1.0]", "data.multiscale=false",
        f"train.batch_size={a.batch_size}", f"train.steps={steps}", f"train.lr={LR}", "train.min_lr=0",
        f"train.warmup_steps={WARMUP_LR_STEPS}", f"train.weight_decay={WD}", f"train.betas=[{BETAS[0]},{BETAS[1]}]",
        f"train.eps={EPS}", f"train.precision={precision}", "train.log_every=1", "train.ckpt_every_steps=0",
        "train.ckpt_every_minutes=0", f"train.threads={a.threads}", "train.grad_clip=0", "train.ema_momentum=0",
        "train.compile=false", "train.accum_steps=1", "train.seed=0", "eval.data="]
    return [str(CLIPJOB_PY), "-m", "clipjob", "train", "--preset", "tiny-cpu-scratch", "--run-dir", str(run_dir),
            *[x for s in sets for x in ("--set", s)]]


def openclip_cmd(cfg_dir: Path, data: Path, logs: Path, precision: str, a: argparse.Namespace) -> list[str]:
    steps = a.warmup + a.timed
    return [str(PEER_PY), "-c", OPENCLIP_MAIN, str(cfg_dir),
            "--train-data", shard_pattern(data), "--dataset-type", "webdataset", "--dataset-resampled",
            "--train-num-samples", str(steps * a.batch_size), "--model", OPENCLIP_MODEL_NAME,
            "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--epochs", "1",
            "--precision", "amp_bf16" if precision == "bf16" else "fp32",
            "--lr", str(LR), "--wd", str(WD), "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]), "--eps", str(EPS),
            "--warmup", str(WARMUP_LR_STEPS), "--seed", "0", "--log-every-n-steps", "1",
            "--logs", str(logs), "--name", "run", "--save-frequency", "0", "--report-to", ""]


# -- reading each tool's per-step times ---------------------------------------------------------------------------


def clipjob_steps(run_dir: Path) -> list[dict]:
    """Per-step records of metrics.jsonl: step, wall seconds, data-wait seconds, the tool's own samples/s."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out.append({"step": r["step"], "step_s": r["step_time_s"], "data_s": r["data_wait_frac"] * r["step_time_s"],
                    "reported_sps": r["samples_per_s"]})
    return out


OPENCLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), "
                           r"([\d.]+)/s")


def openclip_steps(log: Path, batch_size: int) -> list[dict]:
    """Per-step "Train Epoch" lines of OpenCLIP's log (with --log-every-n-steps 1): Batch (t) is the wall time
    since the previous step ended, Data (t) the part spent waiting for the batch."""
    out = []
    for m in OPENCLIP_LINE.finditer(log.read_text(errors="replace") if log.exists() else ""):
        out.append({"step": int(m.group(1)) // batch_size, "step_s": float(m.group(3)),
                    "data_s": float(m.group(2)), "reported_sps": float(m.group(4))})
    return out


def steady_state(steps: list[dict], warmup: int, timed: int, batch_size: int) -> dict:
    window = [s for s in steps if warmup < s["step"] <= warmup + timed]
    if len(window) < timed:
        return {"error": f"only {len(window)} of {timed} timed steps logged"}
    seconds = sum(s["step_s"] for s in window)
    reported = sorted(s["reported_sps"] for s in window)
    median_step = sorted(s["step_s"] for s in window)[len(window) // 2]
    return {"samples_per_s": round(timed * batch_size / seconds, 2),
            "samples_per_s_median_step": round(batch_size / median_step, 2), "timed_steps": timed,
            "timed_s": round(seconds, 2), "step_s_mean": round(seconds / timed, 4),
            "step_s_min": round(min(s["step_s"] for s in window), 4),
            "data_wait_s_per_step": round(sum(s["data_s"] for s in window) / timed, 4),
            "tool_reported_samples_per_s_median": reported[len(reported) // 2],
            "all_steps_s": round(sum(s["step_s"] for s in steps), 2)}


def matmul_peak(precision: str, threads: int) -> float | None:
    """TFLOP/s of a 2048 x 2048 matmul in this precision and thread count, measured just before a run."""
    r = subprocess.run([str(CLIPJOB_PY), "bench/mfu.py", "peak", "--precision", precision, "--threads", str(threads)],
                       cwd=ROOT, env=run_env(threads), capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])["peak_tflops"]
    except (IndexError, ValueError, KeyError):
        return None


# -- main ---------------------------------------------------------------------------------------------------------


def run_one(side: str, precision: str, spec: ModelSpec, data: Path, a: argparse.Namespace, rep: int = 0) -> dict:
    work = TMP / "train" / f"{side}-{precision}-{rep}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = run_env(a.threads)
    if side == "clipjob":
        cmd = clipjob_cmd(spec, data, work / "run", precision, a)
    else:
        if side == PEER_MALLOC:  # OpenCLIP given clipjob's host-allocator setting through glibc's own tunables
            env["GLIBC_TUNABLES"] = PEER_MALLOC_TUNABLES
        cmd = openclip_cmd(spec.write_openclip_config(work / "model_configs").parent, data, work / "logs",
                           precision, a)
    peak = matmul_peak(precision, a.threads)  # this run's own yardstick: the machine's load drifts
    res = run_monitored(cmd, env=env, log=work / "out.log", timeout_s=a.timeout)
    res["peak_tflops_before"] = peak
    res["peak_tflops_after"] = after = matmul_peak(precision, a.threads)
    res["peak_tflops"] = max((x for x in (peak, after) if x), default=None)  # the machine's capability
    steps = clipjob_steps(work / "run") if side == "clipjob" else openclip_steps(work / "out.log", a.batch_size)
    res.update(steady_state(steps, a.warmup, a.timed, a.batch_size))
    if "all_steps_s" in res:
        res["startup_and_exit_s"] = round(res["wall_s"] - res["all_steps_s"], 2)
    if res["rc"] != 0 or "error" in res:
        res["log_tail"] = tail(work / "out.log")
    prefix = f"GLIBC_TUNABLES={PEER_MALLOC_TUNABLES} " if side == PEER_MALLOC else ""
    res["command"] = prefix + " ".join(cmd)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default=None, type=lambda s: s.split(","))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (both tools)")
    ap.add_argument("--warmup", type=int, default=3, help="Steps not timed")
    ap.add_argument("--timed", type=int, default=10, help="Steps timed after the warm-up")
    ap.add_argument("--data", default="", help="Shard folder with manifest.json (default: build the emoji shards)")
    ap.add_argument("--repeats", type=int, default=1, help="Runs per side and precision (sides alternate; best counts)")
    ap.add_argument("--timeout", type=float, default=600, help="Seconds before a run is killed")
    ap.add_argument("--no-peer-malloc", dest="peer_malloc", action="store_false",
                    help=f"Skip the extra OpenCLIP run with GLIBC_TUNABLES={PEER_MALLOC_TUNABLES}")
    ap.add_argument("--out", default="train", help="Result name under bench/results/ ('' = do not write)")
    a = ap.parse_args(argv)
    if getattr(a, "precisions", 0) is None:
        a.precisions = default_precisions()  # bf16 only where it is fast here
    exit_on_sigterm()

    data = Path(a.data) if a.data else emoji_shards(TMP / "emoji")
    runs: dict[str, dict[str, dict]] = {}  # the best run per precision and side
    every: dict[str, dict[str, list[dict]]] = {}
    for i, precision in enumerate(a.precisions):
        sides = ["clipjob", "openclip"] + ([PEER_MALLOC] if a.peer_malloc else [])
        every[precision] = {s: [] for s in sides}
        for rep in range(a.repeats):
            order = sides if (i + rep) % 2 == 0 else sides[::-1]  # alternate who runs first
            for side in order:
                r = run_one(side, precision, TINY, data, a, rep)
                every[precision][side].append(r)
                sps = r.get("samples_per_s")
                print(f"  train {precision:4s} {side:15s} run {rep + 1}: " + (
                    f"{sps:7.1f} samples/s ({r['samples_per_s_median_step']:.1f} from the median step), peak "
                    f"tree PSS {r['peak_tree_pss_mib']:.0f} MiB, wall {r['wall_s']:.0f} s, load {r['loadavg_after']}"
                    if sps else f"FAILED (rc {r['rc']}): {r.get('error', '')}\n{r.get('log_tail', '')}"), flush=True)
        runs[precision] = {side: max(rs, key=lambda x: x.get("samples_per_s") or 0)
                           for side, rs in every[precision].items()}
    out = {"what": "end-to-end training throughput (samples/s) and peak memory, clipjob train vs open_clip_train.main",
           "machine": machine_info(), "versions": versions(), "model": TINY,
           "setup": {"data": str(data), "openclip_train_data": shard_pattern(data), "batch_size": a.batch_size,
                     "threads": a.threads, "workers": a.workers, "warmup_steps": a.warmup, "timed_steps": a.timed,
                     "repeats": a.repeats,
                     "shuffle_buffer": OPENCLIP_SHUFFLE, "lr": LR, "weight_decay": WD, "betas": BETAS, "eps": EPS,
                     "rrc_scale": [0.9, 1.0]},
           "runs": runs, "all_runs": every,
           "ratios_clipjob_over_openclip": {
               p: {"samples_per_s": ratio(r["clipjob"].get("samples_per_s"), r["openclip"].get("samples_per_s")),
                   "samples_per_s_median_step": ratio(r["clipjob"].get("samples_per_s_median_step"),
                                                      r["openclip"].get("samples_per_s_median_step")),
                   "peak_tree_pss": ratio(r["clipjob"]["peak_tree_pss_mib"], r["openclip"]["peak_tree_pss_mib"]),
                   "peak_tree_rss": ratio(r["clipjob"]["peak_tree_rss_mib"], r["openclip"]["peak_tree_rss_mib"])}
               for p, r in runs.items()}}
    if a.out:
        write_result(a.out, out)
    return out


if __name__ == "__main__":
    main()
