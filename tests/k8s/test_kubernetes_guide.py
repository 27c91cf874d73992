"""docs/kubernetes.md stays true to what CI checks."""

from __future__ import annotations

import re
import shlex

import yaml

from .conftest import REPO, VALUES_DIR
from .test_chart_render import render_notes

GUIDE = REPO / "docs" / "kubernetes.md"


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)


def test_should_show_the_tested_corenet_recipe_values_when_reading_the_kubernetes_guide():
    (block,) = [b for b in yaml_blocks() if b.startswith("# vit-b16-32x8.yaml")]
    assert yaml.safe_load(block) == yaml.safe_load((VALUES_DIR / "corenet-vit-b16-32x8.yaml").read_text())


def test_should_name_only_files_that_exist_when_the_guide_points_at_the_repository():
    for path in set(re.findall(r"`((?:charts|k8s|tests|scripts|docs)/[\w./-]+)`", GUIDE.read_text())):
        assert (REPO / path).exists(), f"docs/kubernetes.md names {path}, which does not exist"


def bash_block_after(heading: str) -> list[str]:
    """The commands of the first bash block after `heading`, comments dropped, one per line."""
    section = GUIDE.read_text().split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)[1]
    return [ln.split(" #", 1)[0].strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_should_walk_an_operator_from_install_through_status_eval_and_stop_to_resume_when_reading_the_guide():
    lines = bash_block_after("## 5. The run from install to resume")
    steps = [next(i for i, ln in enumerate(lines) if ln.startswith(prefix))
             for prefix in ("helm -n clip install", "clipjob status", "kubectl -n clip apply -f k8s/eval-job.yaml",
                            "helm -n clip uninstall clip-train")]
    assert steps == sorted(steps), lines
    assert lines[steps[-1] + 1:][0] == lines[steps[0]], "resume is the same install again"
    run_dir = yaml.safe_load((VALUES_DIR / "corenet-vit-b16-32x8.yaml").read_text())["runDir"]
    status = [ln for ln in lines if ln.startswith("clipjob status")]
    assert status and all(shlex.split(ln)[2] == run_dir for ln in status), "the run dir of the section 4 values"
    assert all("-f vit-b16-32x8.yaml" in ln for ln in lines if ln.startswith("helm -n clip install"))


def test_should_accept_every_clipjob_command_of_the_guide_when_the_cli_parses_it():
    import typer.main

    from clipjob import cli

    group = typer.main.get_command(cli.app)
    commands = re.findall(r"^(clipjob \S.*)$", GUIDE.read_text(), flags=re.MULTILINE)
    assert any(c.startswith("clipjob status") for c in commands)
    for line in commands:
        name, *args = shlex.split(line, comments=True)[1:]
        group.commands[name].make_context(name, list(args))  # raises on an unknown option or a missing value


def test_should_show_the_watch_commands_helm_prints_when_the_guide_lists_them_per_workload(helm, tmp_path):
    by_workload: dict[str, list[str]] = {}
    section = GUIDE.read_text().split("### Watch with kubectl", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)[1]
    for line in block.splitlines():
        if m := re.match(r"# workload: (\w+)", line):
            workload = m[1]
        elif line.startswith("kubectl"):
            by_workload.setdefault(workload, []).append(line.split(" #", 1)[0].strip())
    assert set(by_workload) == {"pytorchjob", "trainJob"}
    for workload, lines in by_workload.items():
        notes = render_notes(helm, tmp_path / workload, "--set", f"workload={workload}")
        for line in lines:
            assert line in notes, f"{workload}: {line}"
