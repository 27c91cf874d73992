#!/usr/bin/env bash
# ViT-B/16 CLIP training steps on one GPU, clipjob beside OpenCLIP: bf16 autocast, batch 256, eager and
# torch.compile; samples/s, MFU (H200/H100 dense bf16 peak 989 TFLOP/s) and peak GPU memory. Prints one JSON
# document on stdout (progress goes to stderr) and writes it to bench/results/gpu.json (and $OUT/gpu.json when
# $OUT is a folder, as on the device machine).
#
#   bash scripts/bench_venv.sh --gpu-wheels        # here, once: OpenCLIP's wheels for the offline GPU machine
#   bash bench/gpu.sh                              # there; carry bench/results/tmp/gpu-wheels; <= ~8 min
#   DEVICE=cpu MODEL=tiny BATCH=16 STEPS=2 WARMUP=1 bash bench/gpu.sh     # dry run of the same path on a CPU
#
# Both tools get synthetic in-memory tensors, so this measures the model step (forward, loss, backward,
# optimizer) as each tool's trainer runs it: bench/mfu.py `step` (clipjob's train/step.py functions; OpenCLIP's
# train_one_epoch body). Each configuration runs in its own process under `timeout`, inside an overall budget.
# Works offline: it uses whatever python has torch (+CUDA), clipjob from this working tree (needs only torch and
# pyyaml), and OpenCLIP if importable, else installed from carried wheels, else it is skipped. Anything that
# cannot run is listed under "skipped" with the reason; the script still prints its JSON and exits 0 when at
# least one configuration ran.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-vit-b-16}
BATCH=${BATCH:-256}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
PRECISION=${PRECISION:-bf16}
COMPILE_MODES=${COMPILE_MODES:-"off on"}
BUDGET_S=${BUDGET_S:-440}          # every configuration together (the budget for this script is 8 minutes)
EAGER_CAP_S=${EAGER_CAP_S:-90}     # one eager configuration, process start to JSON
COMPILE_CAP_S=${COMPILE_CAP_S:-150}
WHEELS=${GPU_WHEELS:-bench/results/tmp/gpu-wheels}
RESULT=${RESULT_JSON:-bench/results/gpu.json}
export DEVICE MODEL BATCH STEPS WARMUP PRECISION

start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
: > "$work/runs.jsonl"
: > "$work/skipped.jsonl"
say() { echo "[gpu.sh $(( $(date +%s) - start ))s] $*" >&2; }
json_str() { printf '%s' "$1" | tr '\n\t"\\' '  '"'"'/' | cut -c1-600; }
skip() { printf '{"config": "%s", "reason": "%s"}\n' "$1" "$(json_str "$2")" >> "$work/skipped.jsonl"; say "skipped $1: $2"; }

# -- a python with torch (and a GPU unless DEVICE=cpu) ----------------------------------------------------------
PY=""
for cand in ${PYTHON:-} python3 .venv/bin/python python; do
  command -v "$cand" >/dev/null 2>&1 || continue
  if "$cand" -c "import sys, torch; sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 3)" 2>/dev/null; then
    PY=$cand; break
  fi
done
if [[ -z "$PY" ]]; then
  msg="no python with torch$([[ $DEVICE == cpu ]] || echo ' and a visible CUDA device') (tried: ${PYTHON:-} python3 .venv/bin/python python)"
  printf '{"status": "error", "error": "%s", "device": "%s"}\n' "$(json_str "$msg")" "$DEVICE"
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
say "python: $(command -v "$PY") ($("$PY" -c 'import torch; print(torch.__version__)'))"

# -- which sides can run -------------------------------------------------------------------------------------------
SIDES=""
if err=$("$PY" -c "import yaml, clipjob.model, clipjob.train.step" 2>&1); then
  SIDES="clipjob"
else
  skip "clipjob (all)" "clipjob does not import: $(echo "$err" | tail -1)"
fi
if ! "$PY" -c "import open_clip" >/dev/null 2>&1 && compgen -G "$WHEELS/*.whl" >/dev/null; then
  say "installing OpenCLIP from $WHEELS (offline)"
  if "$PY" -m pip install -q --no-index --no-deps --target "$work/site" "$WHEELS"/*.whl >"$work/pip.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$work/site"
  else
    say "pip install from $WHEELS failed: $(tail -1 "$work/pip.log")"
  fi
fi
if err=$("$PY" -c "import open_clip" 2>&1); then
  SIDES="$SIDES openclip"
else
  skip "openclip (all)" "open_clip does not import ($(echo "$err" | tail -1)); make its wheels with 'bash scripts/bench_venv.sh --gpu-wheels' and carry $WHEELS"
fi

# -- the configurations, each in its own process --------------------------------------------------------------------
for mode in $COMPILE_MODES; do
  for side in $SIDES; do
    cfg="$side compile=$mode"
    left=$(( BUDGET_S - ($(date +%s) - start) ))
    cap=$EAGER_CAP_S; [[ $mode == on ]] && cap=$COMPILE_CAP_S
    (( cap > left )) && cap=$left
    if (( cap < 20 )); then skip "$cfg" "out of time: ${left}s of the ${BUDGET_S}s budget left"; continue; fi
    flag=""; [[ $mode == on ]] && flag="--compile"
    say "running $cfg (limit ${cap}s)"
    timeout -k 10 "$cap" "$PY" bench/mfu.py step --side "$side" --model "$MODEL" --device "$DEVICE" \
      --precision "$PRECISION" --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" $flag \
      > "$work/out.json" 2> "$work/err.log"
    rc=$?
    if [[ $rc -eq 0 ]] && tail -1 "$work/out.json" | "$PY" -c "import json, sys; json.loads(sys.stdin.read())" 2>/dev/null; then
      tail -1 "$work/out.json" >> "$work/runs.jsonl"
      say "$cfg: $(tail -1 "$work/out.json" | "$PY" -c "import json, sys; r = json.load(sys.stdin); print(f\"{r['samples_per_s']} samples/s, MFU {r['mfu']}, peak mem {r.get('peak_mem_gib', '-')} GiB\")")"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
      skip "$cfg" "timed out after ${cap}s; last output: $(grep -v '^\s*$' "$work/err.log" | tail -1)"
    else
      skip "$cfg" "exit $rc: $(grep -v '^\s*$' "$work/err.log" | tail -1)"
    fi
  done
done

# -- one JSON document --------------------------------------------------------------------------------------------------
"$PY" - "$work" "$RESULT" "$(( $(date +%s) - start ))" <<'PY'
import datetime, json, os, platform, sys
from pathlib import Path

work, result, elapsed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
runs = [json.loads(l) for l in (work / "runs.jsonl").read_text().splitlines() if l.strip()]
skipped = [json.loads(l) for l in (work / "skipped.jsonl").read_text().splitlines() if l.strip()]
by = {(r["side"], r["compile"]): r for r in runs}

def ratio(a, b, key):
    return round(a[key] / b[key], 3) if a and b and a.get(key) and b.get(key) else None

ratios = {}
for c in (False, True):
    cj, oc = by.get(("clipjob", c)), by.get(("openclip", c))
    ratios[f"clipjob_over_openclip_{'compiled' if c else 'eager'}"] = {
        "samples_per_s": ratio(cj, oc, "samples_per_s"), "mfu": ratio(cj, oc, "mfu"),
        "peak_mem": ratio(cj, oc, "peak_mem_gib")}
for side in ("clipjob", "openclip"):
    ratios[f"{side}_compile_speedup"] = ratio(by.get((side, True)), by.get((side, False)), "samples_per_s")
import torch
versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
try:
    import importlib.metadata as md
    versions["open_clip_torch"] = md.version("open_clip_torch")
except Exception:
    versions["open_clip_torch"] = None
doc = {"what": "CLIP training step (synthetic tensors): clipjob vs OpenCLIP, eager and torch.compile",
       "status": "ok" if runs else "error",
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "host": platform.node(), "device": os.environ.get("DEVICE", "cuda"),
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "python": sys.executable, "versions": versions,
       "config": {k: os.environ.get(k, d) for k, d in (("MODEL", "vit-b-16"), ("BATCH", "256"), ("PRECISION", "bf16"),
                                                        ("STEPS", "20"), ("WARMUP", "5"))},
       "elapsed_s": elapsed, "runs": runs, "skipped": skipped, "ratios": ratios}
text = json.dumps(doc, indent=1)
print(text)
try:
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(text + "\n")
    out = os.environ.get("OUT")
    if out and Path(out).is_dir():
        (Path(out) / "gpu.json").write_text(text + "\n")
except OSError as e:
    print(f"could not write {result}: {e}", file=sys.stderr)
sys.exit(0 if runs else 1)
PY
