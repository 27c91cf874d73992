"""The stop budget: one setting (terminationGracePeriodSeconds) gives both the pod's grace period and the elastic
agent's shutdown window (`clipjob train --shutdown-timeout`, how long the agent lets the workers commit their
step before SIGKILL), so the two can never disagree. tests/integration/test_stop.py shows the window at work."""

from __future__ import annotations

import pytest

from clipjob import agent

from .conftest import values_files
from .test_chart_render import arg_after, render_notes

MARGIN_S = 15  # grace - window: the agent reports what is committed (agent.READ_TIMEOUT_S at most) and exits


def window_and_grace(r) -> tuple[int, int]:
    return int(arg_after(r.container()["args"], "--shutdown-timeout")), r.pod_template()["spec"]["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("values", [(), *((v,) for v in values_files())])
def test_should_end_the_agents_window_15_s_before_the_grace_period_when_a_values_file_is_used(render, values):
    window, grace = window_and_grace(render(*values))
    assert window == grace - MARGIN_S and window >= 15, (window, grace)


@pytest.mark.parametrize("workload", ["pytorchjob", "trainJob", "indexedJob"])
def test_should_follow_the_grace_period_when_it_is_set(render, workload):
    r = render(sets={"terminationGracePeriodSeconds": "600", "workload": workload})
    assert window_and_grace(r) == (585, 600)


def test_should_leave_the_agent_time_to_report_before_the_kubelets_sigkill_when_the_window_ends():
    assert MARGIN_S > agent.READ_TIMEOUT_S + 2  # its read of the run dir is bounded; a second or two to exit


def test_should_tell_the_stop_budget_that_was_rendered_when_installed(helm, render, tmp_path):
    window, grace = window_and_grace(render())
    assert f"commit their step on SIGTERM within {window}s of the {grace}s grace period" in render_notes(helm, tmp_path)
