#!/usr/bin/env bash
# The peer's environment for `make bench`: OpenCLIP with its training app (open_clip_train), in its own venv.
#
#   bash scripts/bench_venv.sh               # creates/updates .venv-bench/ (idempotent; ~2-4 min the first time)
#   BENCH_VENV=/tmp/v bash scripts/bench_venv.sh
#   bash scripts/bench_venv.sh --gpu-wheels  # only: OpenCLIP's wheels for bench/gpu.sh on the offline GPU machine
#
# A separate venv because open_clip_torch[training] pins webdataset<=0.2.86 and clipjob needs webdataset>=1.0.
# No --system-site-packages: the peer sees only what it installs itself. torch/torchvision come from the
# wheels on this machine's disk (the same builds as clipjob's .venv), so both sides run the same kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${BENCH_VENV:-.venv-bench}
TORCH_PINS=${TORCH_PINS:-$(sed -n "s/^TORCH_PINS ?= //p" Makefile)}  # the torch clipjob's .venv has
[[ $TORCH_PINS == *torch==* ]] || { echo "bench_venv: no TORCH_PINS in the Makefile" >&2; exit 2; }
OPENCLIP_VERSION=${OPENCLIP_VERSION:-3.3.0}
GPU_WHEELS=${GPU_WHEELS:-bench/results/tmp/gpu-wheels}
STAMP="$VENV/.installed-bench"
WANT="$TORCH_PINS open_clip_torch[training]==$OPENCLIP_VERSION"

if [[ "${1:-}" == "--gpu-wheels" ]]; then
  # The GPU machine has torch, timm, regex and huggingface_hub but not open_clip or ftfy, and no network:
  # bench/gpu.sh installs these from the folder when it is carried there (carry: bench/results/tmp/gpu-wheels).
  mkdir -p "$GPU_WHEELS"
  py=$PYTHON; test -x "$VENV/bin/python" && py="$VENV/bin/python"
  "$py" -m pip download -q --no-deps -d "$GPU_WHEELS" "open_clip_torch==$OPENCLIP_VERSION" ftfy wcwidth
  ls -1 "$GPU_WHEELS"
  exit 0
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "bench venv: $VENV up to date ($WANT)"
  exit 0
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $TORCH_PINS
"$VENV/bin/python" -m pip install -q "open_clip_torch[training]==$OPENCLIP_VERSION"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import open_clip_train.main  # noqa: F401  (the training entry point must import)
print("bench venv: " + ", ".join(f"{p} {md.version(p)}" for p in ("torch", "torchvision", "open_clip_torch", "webdataset")))
PY
echo "$WANT" > "$STAMP"
