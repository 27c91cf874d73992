"""Killing a process in the middle of a checkpoint save (tests/hooks/sitecustomize.py's
CLIPJOB_TEST_CRASH_DURING_SAVE: os._exit after model.safetensors): what was committed before stays loadable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from clipjob import checkpoint as ckpt


def _save(run: str, step: int) -> str:
    return ckpt.save_checkpoint(run, step, {"w": torch.full((2,), float(step))}, {"step": step}, "a: 1\n",
                                {"note": "x"})


def test_should_keep_the_previous_checkpoint_loadable_when_killed_during_a_save(tmp_path):
    run = str(tmp_path / "run")
    script = textwrap.dedent(f"""
        import torch
        from clipjob import checkpoint as ckpt
        for step in (1, 2):
            ckpt.save_checkpoint({run!r}, step, {{"w": torch.ones(3) * step}}, {{"step": step}}, "", {{}})
    """)
    p = subprocess.run([sys.executable, "-c", script], env={**os.environ, "CLIPJOB_TEST_CRASH_DURING_SAVE": "2"},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "exiting during save 2" in p.stdout
    assert os.listdir(ckpt.step_url(run, 2)) == ["model.safetensors"]
    assert ckpt.committed_steps(run) == [1]
    assert ckpt.load_weights(ckpt.resolve_checkpoint(run))["w"].tolist() == [1.0, 1.0, 1.0]


def test_should_uncommit_the_old_step_before_rewriting_it_when_a_re_save_is_killed(tmp_path):
    run = str(tmp_path / "run")
    _save(run, 1)
    _save(run, 2)
    script = textwrap.dedent(f"""
        import torch
        from clipjob import checkpoint as ckpt
        ckpt.save_checkpoint({run!r}, 2, {{"w": torch.ones(3) * 7}}, {{"step": 2}}, "", {{}})
    """)
    p = subprocess.run([sys.executable, "-c", script], env={**os.environ, "CLIPJOB_TEST_CRASH_DURING_SAVE": "1"},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "exiting during save 1" in p.stdout
    assert ckpt.committed_steps(run) == [1]  # step 2's old marker must not vouch for a half-written step 2
