"""train/trainer.py pieces: what follows the step number, the stop flag, when checkpoints are due."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch

from clipjob import dist
from clipjob.config import build_config
from clipjob.train import trainer

RUN = ["model.text.vocab_size=64", "train.steps=100", "train.warmup_steps=10"]  # with the tiny model (tiny_cfg)
CPU = dist.DistInfo(0, 0, 1, torch.device("cpu"))


def test_should_set_lr_rng_and_curriculum_from_the_step_when_a_step_begins(tiny_cfg):
    cfg = tiny_cfg(*RUN, "model.range_augment=true")
    parts = trainer.build_parts(cfg, CPU)
    lr = trainer.begin_step(cfg, parts, 25, rank=1)
    assert all(g["lr"] == lr for g in parts.opt.param_groups) and 0 < lr <= cfg.train.lr
    assert parts.model.image_augmentor.progress == pytest.approx(0.25)
    a = torch.rand(3)
    trainer.begin_step(cfg, parts, 25, rank=1)
    assert torch.equal(torch.rand(3), a)  # a resumed run redraws the same augmentation at step 25
    trainer.begin_step(cfg, parts, 25, rank=0)
    assert not torch.equal(torch.rand(3), a)  # ranks draw differently


def test_should_stop_at_the_first_sigterm_and_die_at_the_second():
    before = signal.getsignal(signal.SIGTERM)
    with trainer.StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.set
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert signal.getsignal(signal.SIGTERM) == before  # training over: signals act as usual again
    seen = []
    signal.signal(signal.SIGUSR1, lambda *a: seen.append("second"))
    try:
        stop = trainer.StopFlag()
        stop.SIGNALS = (signal.SIGUSR1,)
        with stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)  # the second goes to the previous handler
        assert stop.set and seen == ["second"]
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_should_save_every_n_steps_at_the_end_and_by_the_clock(monkeypatch, tiny_cfg):
    cfg = tiny_cfg(*RUN, "train.ckpt_every_steps=30", "train.ckpt_every_minutes=2")
    assert [s for s in range(1, 101) if trainer.save_due(cfg, s)] == [30, 60, 90, 100]
    monkeypatch.setattr(trainer.time, "monotonic", lambda: 1000.0)
    assert trainer.minutes_due(cfg, last_save=1000.0 - 121) and not trainer.minutes_due(cfg, last_save=1000.0 - 60)
    never = tiny_cfg(*RUN, "train.ckpt_every_steps=0")
    assert [s for s in range(1, 101) if trainer.save_due(never, s)] == [100]
    assert not trainer.minutes_due(never, last_save=0.0)


def test_should_agree_on_flags_every_step_on_the_cpu_and_every_tenth_on_gpus():
    cfg = build_config("tiny-cpu", None, ["train.steps=25"])
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # only the device type is read: no GPU needed
    # (checked before the step after s: the end of the run needs no agreement, its save is due anyway)
    assert all(trainer.agree_due(cfg, s, cpu, 4) for s in range(0, 25))
    assert [s for s in range(0, 25) if trainer.agree_due(cfg, s, gpu, 4)] == [0, 10, 20]
    assert all(trainer.agree_due(cfg, s, gpu, 1) for s in range(0, 25))  # one process: nothing to wait for
    every3 = build_config("tiny-cpu", None, ["train.steps=25", "train.agree_every=3"])
    assert [s for s in range(1, 10) if trainer.agree_due(every3, s, cpu, 2)] == [3, 6, 9]


def test_should_give_the_stop_steps_save_the_shutdown_window_minus_a_margin(monkeypatch):
    """After SIGTERM, storage calls (the stop step's save) may take the agent's whole window less 5 s: with the
    chart's 165 s window a 2 GiB upload is not cut off at a fixed 20 s. An explicit storage.stop_wait_s wins."""
    from clipjob.config import build_config
    from clipjob.train.trainer import stop_grace_s

    cfg = build_config("tiny-cpu-scratch", None, [])
    for var in ("CLIPJOB_SHUTDOWN_WINDOW_S", "PET_SHUTDOWN_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    assert stop_grace_s(cfg) == 25  # torchrun's default window, 30 s
    monkeypatch.setenv("PET_SHUTDOWN_TIMEOUT", "90")
    assert stop_grace_s(cfg) == 85
    monkeypatch.setenv("CLIPJOB_SHUTDOWN_WINDOW_S", "165")  # what `clipjob train --shutdown-timeout 165` hands down
    assert stop_grace_s(cfg) == 160
    assert stop_grace_s(build_config("tiny-cpu-scratch", None, ["storage.stop_wait_s=7"])) == 7


class _Stop:
    set, signum = False, 0


def test_should_join_one_all_reduce_per_agreed_step_when_waiting_for_a_batch(monkeypatch, tiny_cfg):
    """The stop and clock flags of a step travel in one all-reduce, after the batch wait and before the
    forward pass; between agreed steps (every 10th on GPUs) there is none."""
    cfg = tiny_cfg(*RUN, "train.ckpt_every_minutes=1")
    calls = []

    def any_flags(flags, device):
        calls.append(list(flags))
        return [f or len(calls) == 3 for f in flags[:2]] + flags[2:]  # 3rd exchange: another rank saw a stop

    monkeypatch.setattr(trainer.dist, "any_flags", any_flags)
    two_ranks = dist.DistInfo(0, 0, 2, torch.device("cpu"))
    stop, batches = _Stop(), iter(["b0", "b1", "b2", "b3"])
    assert trainer.wait_for_batch(batches, stop, cfg, two_ranks, 0, last_save=1e18) == ("b0", False, "")
    assert calls == [[False, False, False]]  # one exchange: [stop here, save by the clock, no batch here]
    got = trainer.wait_for_batch(batches, stop, cfg, two_ranks, 1, last_save=0.0)
    assert got == ("b1", True, "") and calls[-1] == [False, True, False]
    got = trainer.wait_for_batch(batches, stop, cfg, two_ranks, 2, last_save=1e18)
    assert got.batch is None and got.stop_note == "" and len(calls) == 3  # every rank stops at step 2
    on_gpus = dist.DistInfo(0, 0, 2, torch.device("cuda", 0))  # only the device type is read: no GPU needed
    assert trainer.wait_for_batch(batches, stop, cfg, on_gpus, 7, last_save=0.0) == ("b3", False, "")
    assert len(calls) == 3  # step 7 is not an agreed step on GPUs: no collective at all


def test_should_say_waiting_for_data_on_every_rank_when_any_rank_starved(monkeypatch, tiny_cfg):
    """Rank 0 has its batch and waits in the exchange while rank 1 still waits for data when SIGTERM comes:
    rank 0 (which prints the stop line) says the group stopped while waiting for data, as rank 1 does."""
    cfg = tiny_cfg(*RUN)
    other_rank = [True, False, True]  # rank 1: its wait ended by the stop request, without a batch

    def any_flags(flags, device):
        return [a or b for a, b in zip(flags, other_rank, strict=True)]

    monkeypatch.setattr(trainer.dist, "any_flags", any_flags)
    two_ranks = dist.DistInfo(0, 0, 2, torch.device("cpu"))
    got = trainer.wait_for_batch(iter(["b0"]), _Stop(), cfg, two_ranks, 6, last_save=1e18)
    assert got == (None, False, " while waiting for data")
    other_rank[:] = [True, False, False]  # rank 1 had its batch too: a plain stop request
    assert trainer.wait_for_batch(iter(["b0"]), _Stop(), cfg, two_ranks, 6, last_save=1e18) == (None, False, "")


def test_should_exit_128_plus_the_signal_when_stopped_and_0_when_done(tiny_cfg):
    cfg = tiny_cfg(*RUN, "storage.run_dir=/runs/a")
    code, line = trainer.outcome(cfg, trainer.TrainState(step=40, stopped_by=signal.SIGTERM))
    assert code == 143 and line.startswith("stopped by signal 15 at step 40 of 100") and line.endswith("exit 143")
    assert trainer.outcome(cfg, trainer.TrainState(step=100, samples_seen=800)) == \
        (0, "done: step 100, 800 samples; run dir /runs/a")


def test_should_take_bf16_for_auto_only_where_bf16_matmuls_are_measurably_faster():
    from clipjob.train.flops import choose_precision

    cpu = torch.device("cpu")
    speed = {torch.float32: 150e9, torch.bfloat16: 670e9}  # this machine kind's AMD CPU (4.5x)
    measure = lambda device, dtype, seconds: speed[dtype]  # noqa: E731
    assert choose_precision(cpu, "auto", measure) == ("bf16", "bf16 matmul 4.5x fp32 on this CPU")
    speed[torch.bfloat16] = 180e9  # a CPU without bf16 units: emulated, barely faster
    assert choose_precision(cpu, "auto", measure)[0] == "fp32"
    assert choose_precision(cpu, "fp16", measure) == ("fp16", "")  # an explicit choice stays


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_should_measure_a_matmul_rate_in_well_under_a_minute_even_where_the_dtype_is_emulated(dtype):
    """On a CPU without AVX512-BF16/AMX one 2048² bf16 matmul took ~65 s (0.3 GFLOP/s): the measurement
    starts at 256² and grows only while a run is cheap, and times at least one run (it returned 0 when the
    warm-up alone outlasted its window, so `auto` printed 'bf16 matmul 0.0x fp32')."""
    from clipjob.train.flops import measure_matmul_flops

    t0 = time.monotonic()
    rate = measure_matmul_flops(torch.device("cpu"), dtype, seconds=0.0)
    assert rate > 0 and math.isfinite(rate)
    assert time.monotonic() - t0 < 20  # 256² at 0.3 GFLOP/s is ~0.1 s a run; the bug's path is minutes


def test_should_write_the_precision_auto_chose_into_the_config(tiny_cfg, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "choose_precision", lambda device, requested: ("bf16", "bf16 matmul 4.0x fp32"))
    cfg = trainer.settle_precision(tiny_cfg("train.precision=auto"), CPU)
    assert cfg.train.precision == "bf16"
    assert "train.precision: auto -> bf16 (bf16 matmul 4.0x fp32)" in capsys.readouterr().out
    assert trainer.settle_precision(tiny_cfg("train.precision=fp32"), CPU).train.precision == "fp32"
