"""tests/unit runs in-process: a test that starts a process (the CLI, torchrun, a fresh interpreter) belongs in
tests/integration, which runs the real CLI as a user would."""

from __future__ import annotations

import ast
from pathlib import Path

UNIT = Path(__file__).resolve().parent
STILL_STARTS_PROCESSES: set[str] = set()  # none: a module listed here must still import subprocess


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_should_import_subprocess_nowhere_when_a_module_is_in_tests_unit():
    offenders = sorted(p.name for p in UNIT.glob("*.py")
                       if p.name not in STILL_STARTS_PROCESSES and "subprocess" in imported_modules(p))
    assert not offenders, f"move the tests that start processes to tests/integration: {offenders}"


def test_should_list_only_modules_that_still_import_subprocess_when_excepting_them():
    stale = sorted(n for n in STILL_STARTS_PROCESSES if "subprocess" not in imported_modules(UNIT / n))
    assert not stale, f"no longer starts processes: drop {stale} from STILL_STARTS_PROCESSES"
