"""constraints.txt, the versions every `make venv` installs: it pins each dependency pyproject.toml names (in a
version pyproject allows), leaves the torch stack to the Makefile's TORCH_PINS, and is what this suite runs on."""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canonical

REPO = Path(__file__).resolve().parents[2]
TORCH_STACK = re.compile(r"torch|torchvision|triton|nvidia-.*|cuda-.*")


def constraints() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and canonical(name) not in found, f"constraints.txt: {line!r}"
            found[canonical(name)] = version
    return found


def declared() -> list[Requirement]:
    """Every requirement in pyproject.toml (dependencies and each extra), but clipjob's references to itself."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [r for r in map(Requirement, specs) if canonical(r.name) != "clipjob"]


def test_should_pin_every_declared_dependency_in_a_version_pyproject_allows():
    pinned = constraints()
    for req in declared():
        if TORCH_STACK.fullmatch(canonical(req.name)):
            continue
        assert canonical(req.name) in pinned, f"{req.name}: in pyproject.toml, not in constraints.txt (make lock)"
        assert req.specifier.contains(pinned[canonical(req.name)], prereleases=True), \
            f"constraints.txt pins {req.name}=={pinned[canonical(req.name)]}, outside pyproject's {req}"


def test_should_leave_the_torch_stack_to_the_makefiles_pins():
    """torch and its CUDA wheels come from TORCH_PINS (and a container's base image): a second pin here could only
    disagree with them."""
    assert not [n for n in constraints() if TORCH_STACK.fullmatch(n)]
    (line,) = [ln for ln in (REPO / "Makefile").read_text().splitlines() if ln.startswith("TORCH_PINS")]
    torch_pins = dict(p.split("==") for p in line.split("?=")[1].split())
    for req in declared():
        if canonical(req.name) in torch_pins:
            assert req.specifier.contains(torch_pins[canonical(req.name)]), (req, line)


def test_should_run_on_the_pinned_versions_when_installed_by_make():
    """The venv this suite runs in has each pinned package at its pinned version (`make venv-dev` reinstalls when
    constraints.txt changes); a package not installed here (another platform's) is not checked."""
    off = {}
    for name, version in constraints().items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            continue
        if installed != version:
            off[name] = f"{installed} installed, {version} pinned"
    if off and Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"not the venv `make venv-dev` makes ({sys.prefix}): {len(off)} versions differ")
    assert not off, f"this venv is not the locked one (run `make venv-dev`): {off}"
