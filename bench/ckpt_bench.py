"""Checkpoint stall: how long a save holds up the training thread, synchronous vs in the background (issue 16,
item 2; train.ckpt_async, clipjob/train/saver.py).

    .venv/bin/python bench/ckpt_bench.py                # local dir, then the loopback S3 server (~20 min on 2 cores)
    .venv/bin/python bench/ckpt_bench.py --no-s3        # local dir only (~5 min)

The state is the corenet-vit-b16 preset's CLIP built for real (149.8 M parameters, its real state-dict keys),
AdamW's two moments per parameter (filled, not trained) and the EMA: 2.4 GB of fp32 tensors, the recipe's
~2.2 GiB checkpoint. Each (storage, mode) runs in a process of its own (so its peak RSS is its own) and calls
the trainer's own `save`:
  sync   train.ckpt_async=false: rank 0 serialises, writes and commits on the training thread;
  async  the default: rank 0 copies the state into host buffers (kept from one save to the next) and the
         writer thread commits that copy.
Between saves the training thread runs a stand-in step (two 768x3072x768 matmuls on the same intra-op
threads) until the save has committed, then a few more: the step times while a background save is in flight,
against those without one, show what the writer costs a step that shares the CPU cores with it (on a GPU host
the step runs on the device and only the Python side competes).

Reported: the stall per save (time in `save` on the training thread; the first background save also allocates
the snapshot buffers, reported apart; the ratio uses the median of the others), the time to commit, the stand-in step time with and without a save in
flight, peak RSS, and the ratio async stall / sync save time (goal < 5 %). Results: bench/results/ckpt.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CLIPJOB_PY, ROOT, TMP, loadavg, machine_info, run_env, write_result  # noqa: E402

PRESET = "corenet-vit-b16"


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return machine_info()["cpu"]
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else machine_info()["cpu"]


# -- one (storage, mode) in its own process -------------------------------------------------------------------


def build_state(run_dir: str, background: bool):
    """The trainer's parts for the preset, with AdamW state and EMA as after a training step."""
    import torch

    from clipjob import dist
    from clipjob.config import build_config
    from clipjob.train.ema import EMA
    from clipjob.train.trainer import TrainState, build_parts

    cfg = build_config(PRESET, None, [f"storage.run_dir={run_dir}", "train.keep_last=2",
                                      f"train.ckpt_async={str(background).lower()}"])
    d = dist.DistInfo(0, 0, 1, torch.device("cpu"))
    parts = build_parts(cfg, d)
    for group in parts.opt.param_groups:
        for p in group["params"]:
            parts.opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": p.detach().clone(),
                                  "exp_avg_sq": p.detach().clone()}
    parts.ema = EMA(parts.model, cfg.train.ema_momentum or 0.0005)
    return cfg, parts, TrainState(step=1000, samples_seen=1000 * 256), d


def stand_in_step(a, b) -> float:
    t0 = time.monotonic()
    (a @ b) @ a
    return time.monotonic() - t0


def run_one(mode: str, run_dir: str, saves: int, threads: int) -> dict:
    from clipjob.hostmem import tune_malloc

    tune_malloc()  # as `clipjob train` does before any tensor (CPU: freed buffers stay mapped)
    import torch

    from clipjob import checkpoint as ckpt
    from clipjob import fs
    from clipjob.train.saver import CheckpointSaver
    from clipjob.train.trainer import StopFlag, bound_storage_waits, save

    torch.set_num_threads(threads)
    background = mode == "async"
    t0 = time.monotonic()
    cfg, parts, state, d = build_state(run_dir, background)
    bound_storage_waits(cfg, StopFlag())  # storage.stall_timeout_s and its request timeouts, as in training
    state_bytes = sum(t.numel() * t.element_size() for t in parts.model.state_dict().values())
    state_bytes += sum(t.numel() * t.element_size() for s in parts.opt.state.values() for t in s.values())
    state_bytes += sum(t.numel() * t.element_size() for t in parts.ema.state_dict().values())
    built_s = time.monotonic() - t0
    a, b = torch.randn(768, 3072), torch.randn(3072, 768)
    baseline = [stand_in_step(a, b) for _ in range(15)][3:]
    stalls, commits, in_flight_steps, after_steps = [], [], [], []
    with CheckpointSaver(background) as saver:
        for _ in range(saves):
            state.step += 100
            began = time.monotonic()
            save(cfg, parts, state, d, saver, background=background)
            stalls.append(time.monotonic() - began)
            while saver.in_flight:  # training goes on until the save has committed
                in_flight_steps.append(stand_in_step(a, b))
            saver.wait()
            commits.append(time.monotonic() - began)
            after_steps += [stand_in_step(a, b) for _ in range(5)]
    folder = ckpt.step_url(run_dir, state.step)
    files = {n: fs.size(fs.join(folder, n)) for n in fs.ls(folder)}
    return {"mode": mode, "run_dir": run_dir, "saves": saves, "threads": threads, "state_bytes": state_bytes,
            "checkpoint_bytes": sum(files.values()), "files": files, "build_s": round(built_s, 1),
            "stall_s": [round(s, 3) for s in stalls], "commit_s": [round(s, 2) for s in commits],
            "step_ms_baseline": round(1e3 * statistics.median(baseline), 1),
            "step_ms_after_saves": round(1e3 * statistics.median(after_steps), 1),
            "step_ms_in_flight": round(1e3 * statistics.median(in_flight_steps), 1) if in_flight_steps else None,
            "steps_in_flight": len(in_flight_steps),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "committed": ckpt.committed_steps(run_dir)}


# -- the driver -------------------------------------------------------------------------------------------------


def summarise(sync: dict, asyn: dict) -> dict:
    """Medians over the saves; the async steady state leaves out its first save (buffer allocation)."""
    sync_s = statistics.median(sync["stall_s"])
    steady = asyn["stall_s"][1:] or asyn["stall_s"]
    async_s = statistics.median(steady)
    return {"sync_save_s": round(sync_s, 2), "async_stall_s": round(async_s, 3), "async_stall_max_s": max(steady),
            "async_first_stall_s": asyn["stall_s"][0], "async_commit_s": round(statistics.median(asyn["commit_s"]), 2),
            "ratio": round(async_s / sync_s, 4), "goal": "< 0.05",
            "step_ms_baseline": asyn["step_ms_baseline"], "step_ms_in_flight": asyn["step_ms_in_flight"],
            "peak_rss_mib": {"sync": sync["peak_rss_mib"], "async": asyn["peak_rss_mib"]}}


def spawn(mode: str, run_dir: str, a: argparse.Namespace, env: dict[str, str]) -> dict:
    cmd = [str(CLIPJOB_PY), str(Path(__file__).resolve()), "--one", mode, "--run-dir", run_dir,
           "--saves", str(a.saves), "--threads", str(a.threads)]
    print(f"== {mode}: {run_dir} (load {loadavg()})", flush=True)
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    sys.stdout.write("".join(f"   {line}\n" for line in p.stdout.splitlines() if not line.startswith("{")))
    if p.returncode != 0:
        raise SystemExit(f"error: {mode} on {run_dir} failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")
    result = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    print(f"   stall per save {result['stall_s']} s, committed after {result['commit_s']} s, "
          f"peak RSS {result['peak_rss_mib']} MiB", flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saves", type=int, default=4, help="Saves per mode")
    ap.add_argument("--threads", type=int, default=2, help="Intra-op threads of the stand-in step")
    ap.add_argument("--no-s3", action="store_true", help="Local directory only (no loopback S3 server)")
    ap.add_argument("--one", choices=("sync", "async"), help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.run_dir, a.saves, a.threads)), flush=True)
        return 0

    info = {**machine_info(), "lscpu_model_name": lscpu_model()}
    print(f"CPU {info['lscpu_model_name']} x {info['cpus']}, {info['mem_gib']} GiB; load {info['loadavg']}", flush=True)
    env = run_env(a.threads)
    results: dict[str, dict] = {}
    local = TMP / "ckpt"
    wheres = [("local", str(local))]
    server = None
    if not a.no_s3:
        sys.path.insert(0, str(ROOT / "tests"))
        from s3server import S3Server

        server = S3Server().start()
        env.update(server.env())
        wheres.append(("s3", server.make_bucket("ckpt-bench")))
    try:
        for where, base in wheres:
            runs = {}
            for mode in ("sync", "async"):
                run_dir = f"{base}/{mode}"
                runs[mode] = spawn(mode, run_dir, a, env)
                if where == "local":
                    shutil.rmtree(run_dir, ignore_errors=True)
            results[where] = {**runs, "summary": summarise(runs["sync"], runs["async"])}
    finally:
        if server is not None:
            server.stop()
    info["loadavg_end"] = loadavg()
    payload = {"what": "checkpoint stall per save, sync vs background (bench/ckpt_bench.py)", "machine": info,
               "preset": PRESET, "command": " ".join([".venv/bin/python", "bench/ckpt_bench.py", *sys.argv[1:]]),
               "results": results}
    path = write_result("ckpt", payload)
    print(f"\n{'storage':8s} {'sync save s':>11s} {'async stall s':>13s} {'first':>6s} {'commit s':>8s} "
          f"{'ratio':>7s} {'step ms':>8s} {'in flight':>9s}  (async stall / sync save; goal < 0.05)")
    for where, r in results.items():
        s = r["summary"]
        print(f"{where:8s} {s['sync_save_s']:11.2f} {s['async_stall_s']:13.3f} {s['async_first_stall_s']:6.2f} "
              f"{s['async_commit_s']:8.2f} {s['ratio']:7.4f} {s['step_ms_baseline']:8.1f} "
              f"{s['step_ms_in_flight'] or 0:9.1f}")
    print(f"\nCPU {info['lscpu_model_name']}; load {info['loadavg']} at start, {info['loadavg_end']} at end; "
          f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
