"""train/metrics.py: FLOPs per sample against OpenCLIP's published numbers, throughput rates, the peak, the
JSON-lines file and the optional TensorBoard writer."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from clipjob.config import build_config
from clipjob.train.flops import flops_per_sample, peak_flops
from clipjob.train.metrics import MetricsLogger, Throughput, read_jsonl


def test_should_match_openclips_gflops_when_vit_b16_at_224():
    cfg = build_config("openclip-vit-b16").model
    # OpenCLIP (FlopCounterMode, forward): image 35.13 + text 5.96 GFLOPs; training = 3x forward
    assert flops_per_sample(cfg, 224) / 3 == pytest.approx((35.13 + 5.96) * 1e9, rel=0.02)
    assert flops_per_sample(cfg, 320) > 1.9 * flops_per_sample(cfg, 224)  # the image side scales with area


def test_should_count_only_the_forward_of_a_frozen_text_tower():
    trained = build_config("openclip-vit-b32").model
    frozen = build_config("openclip-vit-b32", None, ["model.text.freeze=true"]).model
    text_fwd = (flops_per_sample(trained, 224) - flops_per_sample(frozen, 224)) / 2
    assert text_fwd == pytest.approx(5.96e9, rel=0.02)


def test_should_cover_the_corenet_stem_when_estimating():
    cfg = build_config("corenet-vit-b16").model
    assert flops_per_sample(cfg, 224) / 3 == pytest.approx(41.3e9, rel=0.03)


def _count_flops(fn) -> float:
    """torch's FlopCounterMode total of `fn()`, with the CPU's fused attention kernels counted by the formula
    of the CUDA ones (torch's table has none for them; bench/mfu.py does the same)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    custom = {aten._scaled_dot_product_flash_attention_for_cpu:
              lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
              aten._scaled_dot_product_flash_attention_for_cpu_backward:
              lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("preset, size", [("tiny-cpu-resnet", 96), ("tiny-cpu-resnet", 128)])
def test_should_count_the_resnet_towers_flops_as_torch_does(preset, size):
    from clipjob.model.resnet import ModifiedResNet
    from clipjob.train.flops import resnet_flops

    cfg = build_config(preset).model
    tower = ModifiedResNet(cfg.vision, cfg.embed_dim)
    images = torch.rand(2, 3, size, size)
    forward = resnet_flops(cfg.vision, cfg.embed_dim, size)
    # both count the convs, linear layers and attention at 2 FLOPs per multiply-add, nothing else: equal
    assert _count_flops(lambda: tower(images)) / 2 == forward
    # forward + backward = 3x forward (flops_per_sample's convention) within the other tests' 2 %: only the
    # first conv's input gradient is not computed (the images need none), 1/3 of a conv holding ~1.3 % of the forward
    assert _count_flops(lambda: tower(images).sum().backward()) / 2 == pytest.approx(3 * forward, rel=0.02)
    # a frozen MiniLM costs nothing (cached features): the sample's FLOPs are the image tower's, 3x
    assert flops_per_sample(cfg, size) == 3 * forward


def test_should_turn_counts_into_rates_when_taken(monkeypatch):
    clock = iter([0.0, 10.0, 10.0])
    monkeypatch.setattr("clipjob.train.metrics.time.monotonic", lambda: next(clock))
    t = Throughput(world_size=4, peak_flops=1e12)
    t.waited(2.5)
    for _ in range(5):
        t.stepped(8, 8 * 1e11)
    r = t.take()
    assert r["samples_per_s_per_device"] == 4.0 and r["samples_per_s"] == 16.0
    assert r["step_time_s"] == 2.0 and r["data_wait_frac"] == 0.25
    assert r["mfu"] == pytest.approx(0.4) and r["tflops_per_device"] == pytest.approx(0.4)


def test_should_measure_the_peak_again_when_the_rate_exceeds_the_one_measured_at_the_start(monkeypatch, capsys):
    """A peak measured while the cores were busy reads low: the first MFU above 1 measures it again (at most
    MAX_REMEASURES times), keeps the higher value and says so; a rate below the peak measures nothing."""
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr("clipjob.train.metrics.time.monotonic", lambda: float(next(clock)))
    peaks = iter([4e12, 1e12, 1e12, 1e12])
    t = Throughput(world_size=1, peak_flops=1e12, remeasure=lambda: next(peaks))
    t.stepped(8, 2e13)  # 2 TFLOP/s over 10 s: twice the peak of the start
    r = t.take()
    assert r["mfu"] == pytest.approx(0.5) and t.peak == 4e12 and t.remeasured == 1
    assert "above the peak measured at the start (1: the machine was busier then); peak measured again: 4" in \
        capsys.readouterr().out
    t.stepped(8, 2e13)
    assert t.take()["mfu"] == pytest.approx(0.5) and t.remeasured == 1  # below the new peak: nothing measured
    for _ in range(Throughput.MAX_REMEASURES + 2):  # a FLOP count that overstates: measured a bounded number of times
        t.stepped(8, 1e14)
        t.take()
    assert t.remeasured == Throughput.MAX_REMEASURES and t.peak == 4e12


def test_should_use_the_configured_peak_or_measure_one():
    assert peak_flops(torch.device("cpu"), "bf16", configured=5e12) == 5e12
    assert peak_flops(torch.device("cpu"), "fp32") > 1e8


def test_should_write_json_lines_and_skip_tensorboard_quietly_when_absent(tmp_path, capsys):
    run = str(tmp_path / "run")
    m = MetricsLogger(run, enabled=True, total_steps=10)
    m.log({"step": 1, "loss": 2.0, "lr": 0.1, "mfu": None})
    m.log({"step": 2, "loss": 1.5, "lr": 0.1, "mfu": 0.3})
    m.close()
    rows = read_jsonl(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["mfu"] == 0.3
    assert "step 2: loss=1.5 lr=0.1 mfu=0.3" in capsys.readouterr().err
    has_tb = importlib.util.find_spec("tensorboard") is not None
    assert os.path.isdir(os.path.join(run, "tb")) == has_tb
    MetricsLogger(str(tmp_path / "other"), enabled=False, total_steps=1).log({"step": 1})
    assert not (tmp_path / "other").exists()


def test_should_upload_tensorboard_events_when_the_run_dir_is_remote(s3_bucket):
    pytest.importorskip("tensorboard")
    from clipjob import fs

    run = fs.join(s3_bucket, "run")
    m = MetricsLogger(run, enabled=True, total_steps=3)
    m.log({"step": 1, "loss": 2.0})
    m.close()
    assert any(n.startswith("events.out.tfevents") for n in fs.ls(fs.join(run, "tb")))
    assert json.loads(fs.read_text(fs.join(run, "metrics.jsonl")))["loss"] == 2.0
    assert not os.path.exists(m.tb.local_dir), "the uploaded scratch copy must not stay in /tmp"


def test_should_remove_the_scratch_events_of_a_remote_run_when_the_writer_is_dropped_unclosed(s3_bucket):
    """An error path that never reaches close(): the scratch folder goes when the writer does, in the process
    that made it; a forked child (a DataLoader worker) dropping its copy leaves the parent's folder alone."""
    pytest.importorskip("tensorboard")
    import gc

    from clipjob import fs
    from clipjob.train.metrics import TensorBoard

    tb = TensorBoard(fs.join(s3_bucket, "run"))
    local = tb.local_dir
    tb.add({"step": 1, "loss": 2.0})
    pid = os.fork()
    if pid == 0:  # the child: drop its copy, as a worker's interpreter may, and leave without cleanup
        tb._scratch()
        os._exit(0 if os.path.isdir(local) else 1)
    assert os.waitpid(pid, 0)[1] == 0, "the child removed the parent's scratch folder"
    assert os.path.isdir(local)
    del tb
    gc.collect()
    assert not os.path.exists(local)


def test_should_tick_in_plain_lines_without_a_terminal_and_not_at_all_when_disabled(capsys):
    """Ticker (data build, zero-shot eval): a pod's log gets a line every `every_s` seconds, never a bar's
    carriage returns; the caller may count added items or give the total done."""
    from clipjob.train.metrics import Ticker

    t = Ticker(10, "data build", "sample", every_s=0.0)  # pytest's stderr is not a terminal
    t.update(4)
    t.update(3, done=8)
    t.close()
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(", eta")[0] for ln in lines] == ["data build: 4/10 (40.0%)", "data build: 8/10 (80.0%)"]
    assert all(ln.endswith(" samples") and "\r" not in ln for ln in lines), lines
    quiet = Ticker(10, "data build", "sample", enabled=False, every_s=0.0)
    quiet.update(10)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_should_skip_a_line_cut_short_with_one_warning_when_reading_json_lines(tmp_path, capsys):
    """`clipjob status`, `report` and `eval --watch` read metrics.jsonl / results.jsonl: a record cut short by a
    killed process or a full disk is skipped (a traceback there was the old behaviour), the rest kept."""
    url = str(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n[1, 2]\n{"step": 4, "l')
    assert [r["step"] for r in read_jsonl(url)] == [1, 3]
    assert capsys.readouterr().err == f"warning: {url}: skipped 3 unreadable line(s) (a write cut short?)\n"


def test_should_show_step_total_percent_and_eta_in_log_lines_without_a_terminal():
    """A pod's log has no TTY: each step line carries step/total, % and an ETA from the rate since the first
    step this process logged (a resumed run does not count the steps it did not do)."""
    from clipjob.train.metrics import Progress, format_duration

    now = [100.0]
    p = Progress(1000, clock=lambda: now[0])
    assert p.line(200) == "200/1000 (20.0%), eta ?"  # resumed at step 200: no rate yet
    now[0] += 50.0  # 50 steps in 50 s -> 750 steps left at 1 step/s
    assert p.line(250) == "250/1000 (25.0%), eta 12m30s"
    now[0] += 700.0
    assert p.line(950) == "950/1000 (95.0%), eta 50s"
    assert [format_duration(s) for s in (None, 59.4, 61, 3725)] == ["?", "59s", "1m01s", "1h02m"]
