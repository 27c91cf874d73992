"""The CLI's answer to what a user gives it, as a user runs it (a subprocess): exit code 2 and one line on stderr,
nothing written, no warning or traceback around it; a usable result on stdout with the notes on stderr. The
same refusals in-process: tests/unit/test_ckpt_safety.py, test_config.py, test_config_import.py."""

from __future__ import annotations

import pickle
import subprocess
import sys

import yaml

from clipjob.config import build_config
from corenet_recipe import VIT_B16
from pickle_payloads import RunsShell, evil_files


def clipjob(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipjob", *args], capture_output=True, text=True, timeout=300)


def test_should_refuse_through_the_cli_with_one_line_and_exit_code_2(tmp_path):
    path = evil_files(tmp_path)["zip"]
    for args in (["ckpt", "convert", str(path), str(tmp_path / "out")],
                 ["eval", "zeroshot", "--checkpoint", str(path), "--preset", "tiny-cpu-scratch",
                  "--data", "folder:/nope"]):
        r = clipjob(*args)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert "refusing to unpickle: it references" in lines[0] and "open" in lines[0], lines
        assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "out").exists()


def test_should_print_the_refusal_and_nothing_else_when_converting_a_raw_pickle(tmp_path):
    """A raw pickle (protocol 4) made torch warn on stderr before the one line: not any more."""
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"w": RunsShell()}, protocol=4))
    r = clipjob("ckpt", "convert", str(path), str(tmp_path / "out"))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "refusing to unpickle" in lines[0], r.stderr


def test_should_exit_2_with_one_line_and_write_nothing_when_the_cli_gets_a_bad_key(tmp_path):
    run = tmp_path / "run"
    p = clipjob("train", "--preset", "tiny-cpu", "--run-dir", str(run), "--set", "data.train=x",
                "--set", "train.nope=1")
    assert p.returncode == 2
    known = p.stderr.split("known: ")[1].strip()
    assert p.stderr.strip().splitlines() == [f"error: train.nope: unknown key (known: {known}"]
    assert not run.exists()


def test_should_print_a_usable_config_through_the_cli(tmp_path):
    src = tmp_path / "clip_vit_base.yaml"
    src.write_text(VIT_B16)
    r = clipjob("config", "from-corenet", str(src))
    assert r.returncode == 0, r.stderr
    (tmp_path / "clipjob.yaml").write_text(r.stdout)
    cfg = build_config(None, str(tmp_path / "clipjob.yaml"))
    assert cfg.model.vision.family == "corenet" and cfg.train.steps == 200_000 and cfg.data.multiscale
    assert "ignored: model.layer.conv_init = 'kaiming_uniform'" in r.stderr.splitlines()
    assert "ignored" not in r.stdout
    data = yaml.safe_load(VIT_B16)
    data["model"]["activation"]["name"] = "relu"
    src.write_text(yaml.safe_dump(data))
    r = clipjob("config", "from-corenet", str(src))
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout)
    assert r.stderr.count("\n") == 1 and "model.activation.name='relu'" in r.stderr, r.stderr
