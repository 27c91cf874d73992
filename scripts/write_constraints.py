"""Write constraints.txt: the exact version of every package in a venv built without constraints (`make lock`).

    .lock-venv/bin/python scripts/write_constraints.py > constraints.txt

`make venv` / `make venv-dev` install with `-c constraints.txt`, so every install (CI's fresh clone, the demo)
gets the set of versions the suite last passed with instead of whatever the registry holds that day: a new
release of a transitive dependency can no longer change what CI runs. Left out: clipjob itself, the installers
(pip, setuptools, uv, wheel) and the torch stack (torch, torchvision, triton, nvidia-*, cuda-*), which the
Makefile pins on its own (TORCH_PINS) and a container takes from its base image."""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

from packaging.utils import canonicalize_name

NOT_PINNED = re.compile(r"(clipjob|pip|setuptools|uv|wheel|torch|torchvision|triton|nvidia-.*|cuda-.*)")


def pins() -> list[str]:
    found = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}
    return [f"{name}=={version}" for name, version in sorted(found.items()) if not NOT_PINNED.fullmatch(name)]


def main() -> None:
    v = sys.version_info
    print(f"# Written by `make lock` (scripts/write_constraints.py) from a venv of clipjob[dev] on Python "
          f"{v.major}.{v.minor}; every `make venv` installs with `-c constraints.txt`. torch and torchvision: "
          f"the Makefile's TORCH_PINS.")
    print("\n".join(pins()))


if __name__ == "__main__":
    main()
