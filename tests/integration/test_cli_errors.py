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


def test_should_fail_in_one_line_and_leave_no_partial_file_when_a_local_write_is_refused(tmp_path):
    """A local run dir whose disk refuses a write (full: ENOSPC; here the process's file-size limit, EFBIG, which
    needs no root to set up): a one-line ClipjobError naming the file, and the half-written temp file removed, so
    a full disk gets no fuller. (`clipjob train` on a 3 MB tmpfs: `error: .../step-00000010/model.safetensors: no
    space left on the device (...)`, exit 2.)"""
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # the limit then fails the write with EFBIG
              "from clipjob import fs\n"
              "from clipjob.errors import ClipjobError\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
              "try:\n    fs.write_bytes(sys.argv[1], bytes(100_000))\n"
              "except ClipjobError as e:\n    print(e)\n    sys.exit(2)\n")
    target = tmp_path / "run" / "model.safetensors"
    p = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout.splitlines() == [f"{target}: OSError: [Errno 27] File too large"], p
    assert list((tmp_path / "run").iterdir()) == []  # no target, no temp file
