#!/usr/bin/env bash
# Container smoke test without a Docker daemon: build the real Dockerfile with buildah and run the
# image with podman, as `docker build` + `docker run` would.
#
#   scripts/smoke_container.sh            # tools -> base -> image -> run -> preempt
#   scripts/smoke_container.sh base       # only (re)make the local base image
#   scripts/smoke_container.sh image run  # rebuild the clipjob image and run the smoke steps
#   scripts/smoke_container.sh clean      # remove the images and $SMOKE_WORK (~10 GB)
#
# run: `clipjob --help`, `data emoji`, 5 training steps, zero-shot eval, as a pod runs it (non-root,
# read-only root filesystem, HOME=/tmp, no network, all capabilities dropped).
# preempt: SIGTERM to a training container (podman stop, 120 s grace) must leave a committed checkpoint.
#
# No container registry is reachable here, so the base image is made locally: Debian bookworm
# (debootstrap --variant=minbase) + python3 + a venv at /opt/venv holding torch and torchvision, the way
# pytorch/pytorch images hold them. It is imported as $BASE_IMAGE and built once per torch version.
# All wheels (torch for the base; setuptools and clipjob's dependencies for the build) are fetched on
# this host with its pip configuration into $SMOKE_WORK/wheels (here: mostly files on local disk); the
# image build then sees only that folder, without network.
#
# Environment:
#   SMOKE_WORK     scratch directory (rootfs, wheel cache, run outputs)  [/var/tmp/clipjob-smoke]
#   CONTEXT        build context (a checkout of this repository)            [repo root]
#   BASE_IMAGE     base image name                                          [localhost/clipjob-base:torch-$TORCH]
#   IMAGE          image to build and run                                   [localhost/clipjob:smoke]
#   TORCH, TORCHVISION   versions put into the base                         [2.14.1, 0.29.1]
#   DEBIAN_MIRROR  debootstrap mirror                                       [http://deb.debian.org/debian]
#   PYTHON         python whose pip fetches the torch wheels                 [.venv/bin/python]
#   FORCE_BASE=1   rebuild the base even if it exists
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

SMOKE_WORK="${SMOKE_WORK:-/var/tmp/clipjob-smoke}"
CONTEXT="${CONTEXT:-$repo}"
TORCH="${TORCH:-2.14.1}"
TORCHVISION="${TORCHVISION:-0.29.1}"
BASE_IMAGE="${BASE_IMAGE:-localhost/clipjob-base:torch-$TORCH}"
IMAGE="${IMAGE:-localhost/clipjob:smoke}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x $PYTHON ]] || PYTHON=python3
EXTRAS="${CLIPJOB_EXTRAS:-emoji,minilm,effnet,tensorboard}"   # the Dockerfile's default extras
wheels="$SMOKE_WORK/wheels"
RUNC=/usr/sbin/runc
IMAGE_UID=10001   # the Dockerfile's default UID

t_start=$SECONDS
log() { printf '[smoke %4ds] %s\n' "$((SECONDS - t_start))" "$*"; }
die() { log "FAIL: $*" >&2; exit 1; }

# ---- tools: buildah (build), podman (run), runc (crun fails here), debootstrap (base rootfs) ----
ensure_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v podman >/dev/null || missing+=(podman)
  [[ -x $RUNC ]] || missing+=(runc)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root"
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # podman's default ulimits cannot be applied in this sandbox: run with none.
  mkdir -p "$SMOKE_WORK"
  printf '[containers]\ndefault_ulimits = []\n' >"$SMOKE_WORK/containers.conf"
  export CONTAINERS_CONF="$SMOKE_WORK/containers.conf"
  log "tools: $(buildah --version | cut -d' ' -f1-3), $(podman --version)"
}

# ---- wheelhouse: every wheel the base and the image build need, fetched here with pip's own config ----
# The build then installs only from that folder (PIP_NO_INDEX): a hermetic, repeatable smoke test.
fetch_wheels() {
  mkdir -p "$wheels"
  if (($# > 6)); then log "wheels: pip download ${*:1:4} ... ($# arguments) -> $wheels"
  else log "wheels: pip download $* -> $wheels"; fi
  # This host's python must match the base's (cp311, x86_64 glibc): Debian bookworm's python3 is 3.11.
  "$PYTHON" -m pip download --quiet --dest "$wheels" --only-binary=:all: "$@" \
    2> >(grep -v 'is ignored' >&2)
}

# clipjob[$EXTRAS]'s dependency closure as name==version, read from $PYTHON's environment (the versions the
# tests ran with), without what the base image provides (torch, torchvision and their CUDA wheels): a
# --no-deps download of these skips resolving and re-hashing gigabytes of torch wheels. Fails if a
# dependency is missing there.
pinned_deps() {
  "$PYTHON" - "$CONTEXT/pyproject.toml" "$EXTRAS" <<'PY'
import importlib.metadata as md, re, sys, tomllib
from packaging.requirements import Requirement

def norm(name): return re.sub(r"[-_.]+", "-", name).lower()
base_provides = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
todo = [Requirement(r) for r in project["dependencies"]]
todo += [Requirement(r) for e in sys.argv[2].split(",") if e for r in project["optional-dependencies"][e]]
pins, seen = set(), set()
while todo:
    req = todo.pop()
    if norm(req.name) == norm(project["name"]):  # clipjob[extra] inside an extra
        todo += [Requirement(r) for e in req.extras for r in project["optional-dependencies"][e]]
        continue
    if base_provides.match(norm(req.name)) or (norm(req.name), frozenset(req.extras)) in seen:
        continue
    seen.add((norm(req.name), frozenset(req.extras)))
    try:
        dist = md.distribution(req.name)
    except md.PackageNotFoundError:
        sys.exit(f"wheels: {req.name} is not installed beside {sys.executable}")
    if not req.specifier.contains(dist.version, prereleases=True):
        sys.exit(f"{req.name} {dist.version} does not satisfy {req}")
    pins.add(f"{norm(req.name)}=={dist.version}")
    for r in map(Requirement, dist.requires or []):
        if r.marker is None or any(r.marker.evaluate({"extra": x}) for x in (req.extras or {""})):
            todo.append(r)
print("\n".join(sorted(pins)))
PY
}

# ---- base: debootstrap rootfs + venv with torch/torchvision, imported as $BASE_IMAGE ----
make_base() {
  if [[ -z ${FORCE_BASE:-} ]] && podman image exists "$BASE_IMAGE"; then
    log "base: $BASE_IMAGE exists (FORCE_BASE=1 rebuilds it)"
    return
  fi
  local rootfs="$SMOKE_WORK/rootfs"
  rm -rf "$rootfs"
  log "base: debootstrap bookworm minbase -> $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >"$SMOKE_WORK/debootstrap.log" 2>&1 ||
    die "debootstrap failed, see $SMOKE_WORK/debootstrap.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

  fetch_wheels "torch==$TORCH" "torchvision==$TORCHVISION"
  log "base: venv /opt/venv + torch $TORCH, torchvision $TORCHVISION"
  mkdir -p "$rootfs/tmp/wheels"
  cp -al "$wheels/." "$rootfs/tmp/wheels" 2>/dev/null || cp -a "$wheels/." "$rootfs/tmp/wheels"
  # A clean environment: this host's PIP_* settings name paths that do not exist in the rootfs.
  in_rootfs() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$rootfs" "$@"; }
  in_rootfs /usr/bin/python3 -m venv /opt/venv
  in_rootfs /opt/venv/bin/python -m pip install --quiet --no-index --find-links /tmp/wheels \
    --disable-pip-version-check --no-cache-dir "torch==$TORCH" "torchvision==$TORCHVISION"
  rm -rf "$rootfs/tmp/wheels"
  in_rootfs /opt/venv/bin/python -c "import torch, torchvision; print('base: torch', torch.__version__, 'torchvision', torchvision.__version__)"

  log "base: importing rootfs as $BASE_IMAGE ($(du -sh "$rootfs" | cut -f1))"
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  podman image prune -f >/dev/null  # a replaced base stays behind untagged
}

# ---- image: the real Dockerfile on that base ----
build_image() {
  [[ -f $CONTEXT/README.md ]] || die "$CONTEXT/README.md is missing (pyproject's readme); the wheel cannot build"
  # Build requirements (setuptools) and clipjob's dependencies; clipjob itself is built in the image.
  local pins stamp
  if pins="$(pinned_deps)"; then
    stamp="$wheels/.deps-$(printf '%s\n' "$pins" | sha256sum | cut -c1-16)"
    [[ -e $stamp ]] || { fetch_wheels --no-deps "setuptools>=68" wheel $pins && touch "$stamp"; }
  else
    log "wheels: $PYTHON lacks some of clipjob[$EXTRAS]'s dependencies; resolving them all (slower)"
    stamp="$wheels/.deps-$(cat "$CONTEXT/pyproject.toml" <(echo "$EXTRAS") | sha256sum | cut -c1-16)"
    [[ -e $stamp ]] || { fetch_wheels "setuptools>=68" wheel "$CONTEXT[$EXTRAS]" && touch "$stamp"; }
  fi
  rm -f "$wheels"/clipjob-*
  log "image: buildah bud $CONTEXT/Dockerfile --build-arg BASE_IMAGE=$BASE_IMAGE -> $IMAGE"
  # chroot isolation shares the host network; PIP_NO_INDEX keeps pip off it all the same.
  buildah bud --isolation chroot --runtime "$RUNC" --layers \
    --volume "$wheels:/wheels:ro" \
    --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_NO_INDEX=1 \
    --build-arg "CLIPJOB_EXTRAS=$EXTRAS" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "REVISION=$(git -C "$CONTEXT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -f "$CONTEXT/Dockerfile" -t "$IMAGE" "$CONTEXT"
  # Earlier builds and base imports leave untagged images (up to 6 GB each) behind: drop the untagged ones.
  podman image prune -f >/dev/null
  log "image: built $(podman image inspect "$IMAGE" --format '{{.Id}}' | cut -c1-12), $(podman image inspect "$IMAGE" --format '{{.Size}}' | numfmt --to=iec) in all"
}

# ---- run: the image as the chart runs it (non-root, read-only root, /tmp as HOME, no network) ----
in_image() {
  podman run --rm --runtime "$RUNC" --network none --security-opt no-new-privileges --cap-drop ALL \
    --read-only --tmpfs /tmp:rw,size=4g --shm-size 1g -e HOME=/tmp -v "$SMOKE_WORK/volume:/data" "$@"
}

run_image() {
  local data="$SMOKE_WORK/volume"
  rm -rf "$data" && mkdir -p "$data" && chown "$IMAGE_UID:$IMAGE_UID" "$data"

  log "run: identity and torch inside the image"
  local who; who="$(in_image --entrypoint id "$IMAGE" -u)"
  [[ $who != 0 ]] || die "image runs as root"
  in_image --entrypoint python "$IMAGE" -c \
    "import torch, torchvision; print('run: uid', $who, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
  [[ "$(in_image --entrypoint python "$IMAGE" -c 'import torch; print(torch.__version__)')" == "$TORCH"* ]] ||
    die "torch in the image differs from the base's $TORCH"

  log "run: clipjob --help"
  in_image "$IMAGE" --help
  log "run: clipjob data emoji"
  in_image "$IMAGE" data emoji --out /data/emoji
  log "run: clipjob train --preset tiny-cpu (5 steps)"
  in_image "$IMAGE" train --preset tiny-cpu --set data.train=/data/emoji --set train.steps=5 --run-dir /data/run
  [[ -e $data/run/checkpoints/step-00000005/COMMITTED ]] || die "no committed checkpoint at step 5 in $data/run"
  [[ -s $data/run/metrics.jsonl ]] || die "no metrics.jsonl in $data/run"
  log "run: clipjob eval zeroshot"
  in_image "$IMAGE" eval zeroshot --checkpoint /data/run --data emoji-heldout:/data/emoji | tee "$SMOKE_WORK/eval.log"
  grep -q "top1" "$SMOKE_WORK/eval.log" || die "eval printed no top1 line"
  log "run: run directory"
  (cd "$data" && find run -maxdepth 3 | sort | sed 's/^/  /')
}

# ---- preempt: SIGTERM during training (what a pod gets on eviction) must leave a committed checkpoint ----
preempt_image() {
  local data="$SMOKE_WORK/volume" name="clipjob-smoke-preempt"
  [[ -d $data/emoji ]] || die "run the 'run' stage first (it makes the demo data)"
  rm -rf "$data/preempt"
  podman rm -f "$name" >/dev/null 2>&1 || true
  log "preempt: training 100000 steps in the background, checkpoints only on SIGTERM"
  in_image -d --name "$name" --rm=false "$IMAGE" train --preset tiny-cpu --set data.train=/data/emoji \
    --set train.steps=100000 --set train.ckpt_every_steps=0 --set train.log_every=1 --run-dir /data/preempt >/dev/null
  local waited=0
  until [[ -s $data/preempt/metrics.jsonl ]]; do
    ((waited < 300)) || { podman logs "$name" | tail -20; die "no training step after 300 s"; }
    sleep 2; waited=$((waited + 2))
  done
  log "preempt: training is stepping; podman stop --time 120 (SIGTERM, then SIGKILL after the grace period)"
  local t0=$SECONDS
  podman stop --time 120 "$name" >/dev/null
  local code; code="$(podman inspect "$name" --format '{{.State.ExitCode}}')"
  podman logs "$name" 2>&1 | tail -3 | sed 's/^/  /'
  podman rm "$name" >/dev/null
  local steps; steps="$(ls "$data/preempt/checkpoints" 2>/dev/null | tr '\n' ' ')"
  log "preempt: exited with code $code after $((SECONDS - t0)) s; checkpoints: ${steps:-none}"
  compgen -G "$data/preempt/checkpoints/step-*/COMMITTED" >/dev/null || die "SIGTERM left no committed checkpoint"
}

# ---- clean: give the disk back (base image, smoke image, wheelhouse, scratch) ----
clean_all() {
  podman rmi -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true
  podman image prune -f >/dev/null
  rm -rf "$SMOKE_WORK"
  log "clean: removed $IMAGE, $BASE_IMAGE and $SMOKE_WORK"
}

stages=("$@")
((${#stages[@]})) || stages=(base image run preempt)
ensure_tools
for stage in "${stages[@]}"; do
  case "$stage" in
    base) make_base ;;
    image) build_image ;;
    run) run_image ;;
    preempt) preempt_image ;;
    clean) clean_all ;;
    *) die "unknown stage '$stage' (base, image, run, preempt, clean)" ;;
  esac
done
log "OK (${stages[*]})"
