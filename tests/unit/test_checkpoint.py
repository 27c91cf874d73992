"""checkpoint.py and the trainer's save/restore: commit marker last, newest committed wins, pruning,
a crash mid-save, incomplete folders never committed, S3, EMA weights for eval, resume of the full state."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

from clipjob import dist, fs
from clipjob.config import to_yaml
from clipjob.errors import ClipjobError
from clipjob import checkpoint as ckpt
from conftest import tiny_config

TINY = ["model.text.vocab_size=64"]  # with the tests' tiny model (conftest.TINY_MODEL)
CPU = dist.DistInfo(0, 0, 1, torch.device("cpu"))


def _save(run: str, step: int, **kw) -> str:
    return ckpt.save_checkpoint(run, step, {"w": torch.full((2,), float(step))}, {"step": step}, "a: 1\n",
                                {"note": "x"}, **kw)


def test_should_find_the_newest_committed_step_when_saved(tmp_path):
    run = str(tmp_path / "run")
    for s in (2, 4):
        _save(run, s, extra_weights={ckpt.EMA_FILE: {"w": torch.zeros(2)}})
    assert ckpt.committed_steps(run) == [2, 4]
    latest = ckpt.latest_checkpoint(run)
    assert latest == ckpt.step_url(run, 4)
    assert ckpt.load_weights(latest)["w"].tolist() == [4.0, 4.0]
    assert ckpt.load_train_state(latest) == {"step": 4}
    assert ckpt.load_ema(latest)["w"].tolist() == [0.0, 0.0]
    assert ckpt.load_meta(latest)["step"] == 4
    assert sorted(os.listdir(latest)) == sorted(["COMMITTED", "config.yaml", "ema.safetensors", "meta.json",
                                                 "model.safetensors", "train_state.pt"])


def test_should_ignore_a_step_folder_when_it_has_no_marker(tmp_path):
    run = str(tmp_path / "run")
    _save(run, 2)
    partial = ckpt.step_url(run, 6)
    fs.write_bytes(fs.join(partial, "model.safetensors"), b"half")
    assert ckpt.latest_checkpoint(run) == ckpt.step_url(run, 2)
    with pytest.raises(ClipjobError, match="not committed"):
        ckpt.resolve_checkpoint(partial)


def test_should_keep_the_newest_k_and_drop_stale_partials_when_pruning(tmp_path):
    run = str(tmp_path / "run")
    for s in (1, 2, 4, 5):
        _save(run, s)
    fs.write_bytes(fs.join(ckpt.step_url(run, 3), "model.safetensors"), b"crashed")  # older than newest
    fs.write_bytes(fs.join(ckpt.step_url(run, 9), "model.safetensors"), b"in progress")  # newer: left alone
    assert ckpt.prune_checkpoints(run, keep=2) == [1, 2, 3]
    assert ckpt.committed_steps(run) == [4, 5]
    assert sorted(os.listdir(ckpt.checkpoints_url(run))) == ["step-00000004", "step-00000005", "step-00000009"]


def test_should_not_commit_when_a_written_file_is_missing(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    real = fs.write_bytes
    lose_train_state = lambda url, data: None if url.endswith("train_state.pt") else real(url, data)  # noqa: E731
    monkeypatch.setattr(fs, "write_bytes", lose_train_state)
    with pytest.raises(ClipjobError, match="train_state.pt missing"):
        _save(run, 3)
    assert ckpt.committed_steps(run) == []


def test_should_commit_prune_and_load_when_the_run_dir_is_on_s3(s3_bucket):
    run = fs.join(s3_bucket, "runs", "a")
    for s in (10, 20, 30):
        _save(run, s, extra_weights={ckpt.EMA_FILE: {"w": torch.ones(2)}})
        ckpt.prune_checkpoints(run, keep=2)
    assert ckpt.committed_steps(run) == [20, 30]
    latest = ckpt.resolve_checkpoint(run)
    assert latest == f"{run}/checkpoints/step-00000030"
    assert ckpt.load_weights(latest)["w"].tolist() == [30.0, 30.0]
    assert ckpt.ema_weights_url(latest).endswith("step-00000030/ema.safetensors")


def test_should_evaluate_the_ema_weights_when_asked(tmp_path):
    from clipjob.eval.runner import load_for_eval
    from clipjob.model import build_model

    cfg = tiny_config(*TINY)
    model = build_model(cfg.model, pretrained=False)
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    run = str(tmp_path / "run")
    ckpt.save_checkpoint(run, 5, model.state_dict(), {}, to_yaml(cfg), {}, {ckpt.EMA_FILE: ema})
    raw, _, _ = load_for_eval(run, device=torch.device("cpu"))
    averaged, _, _ = load_for_eval(run, device=torch.device("cpu"), ema=True)
    torch.testing.assert_close(averaged.logit_scale, raw.logit_scale + 1.0)
    _save(str(tmp_path / "plain"), 1)
    with pytest.raises(ClipjobError, match="no ema.safetensors"):
        ckpt.ema_weights_url(ckpt.resolve_checkpoint(str(tmp_path / "plain")))


# -- the trainer's save / restore ---------------------------------------------------------------------------


def _parts_after_one_step(cfg):
    from clipjob.train.step import forward_backward, optimizer_step
    from clipjob.train.trainer import build_parts, restore

    parts = build_parts(cfg, CPU)
    state = restore(cfg, parts, CPU)
    images, tokens = torch.rand(4, 3, 16, 16), torch.randint(1, 64, (4, 8))
    forward_backward(parts.model, parts.model, parts.loss_fn, images, tokens, accum_steps=1,
                     precision=cfg.train.precision, scaler=parts.scaler)
    optimizer_step(parts.opt, parts.scaler, parts.params, list(parts.loss_fn.parameters()), 0.0)
    parts.ema.update(parts.model)
    state.step, state.samples_seen = 1, 4
    return parts, state


def test_should_restore_the_full_train_state_when_resuming(tmp_path, capsys):
    from clipjob.train.trainer import build_parts, restore, save

    cfg = tiny_config(*TINY, *[f"storage.run_dir={tmp_path / 'run'}", "train.loss=siglip",
                                                         "train.precision=fp16", "train.ema_momentum=0.5"])
    parts, state = _parts_after_one_step(cfg)
    with torch.no_grad():
        parts.loss_fn.logit_bias.fill_(-7.5)  # (fp16's first steps may be skipped by the scaler)
    save(cfg, parts, state, CPU)
    fresh = build_parts(cfg, CPU)
    got = restore(cfg, fresh, CPU)
    assert f"resumed from {ckpt.step_url(cfg.storage.run_dir, 1)} (step 1)" in capsys.readouterr().out
    assert (got.step, got.samples_seen) == (1, 4)
    for a, b in zip(parts.model.state_dict().values(), fresh.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert fresh.loss_fn.logit_bias.item() == -7.5
    assert fresh.opt.state_dict()["state"].keys() == parts.opt.state_dict()["state"].keys()
    assert fresh.opt.state_dict()["param_groups"] == parts.opt.state_dict()["param_groups"]
    assert fresh.scaler.state_dict() == parts.scaler.state_dict()
    for k, v in parts.ema.state_dict().items():
        torch.testing.assert_close(fresh.ema.state_dict()[k], v)


def _run_with_steps_1_and_2(tmp_path):
    """A run dir with committed steps 1 and 2 (with EMA); its config."""
    from clipjob.train.trainer import save

    cfg = tiny_config(*TINY, *[f"storage.run_dir={tmp_path / 'run'}",
                                                         "train.ema_momentum=0.5"])
    parts, state = _parts_after_one_step(cfg)
    save(cfg, parts, state, CPU)
    state.step = 2
    save(cfg, parts, state, CPU)
    return cfg


def test_should_fall_back_to_an_older_checkpoint_when_the_newest_is_unreadable(tmp_path, capsys):
    from clipjob.train.trainer import build_parts, restore

    cfg = _run_with_steps_1_and_2(tmp_path)
    with open(fs.join(ckpt.step_url(cfg.storage.run_dir, 2), "model.safetensors"), "wb") as f:
        f.write(b"garbage")
    got = restore(cfg, build_parts(cfg, CPU), CPU)
    said = capsys.readouterr()
    assert got.step == 1 and "step-00000001 (step 1)" in said.out, said
    assert said.err.startswith("warning: skipping checkpoint step 2, it does not load: "), said


def test_should_say_the_checkpoint_does_not_fit_when_the_model_changed(tmp_path):
    from clipjob.train.trainer import build_parts, restore, save

    run = f"storage.run_dir={tmp_path / 'run'}"
    cfg = tiny_config(*TINY, *[run, "train.ema_momentum=0.5"])
    parts, state = _parts_after_one_step(cfg)
    save(cfg, parts, state, CPU)
    wider = tiny_config(*TINY, *[run, "model.embed_dim=8"])
    with pytest.raises(ClipjobError, match="none of the committed checkpoints"):
        restore(wider, build_parts(wider, CPU), CPU)


# ---------------------------------------------------------------------------------------------------------
# re-saves, corrupt committed steps, readers that fall back (issue 12, item 8)


def test_should_clear_an_interrupted_saves_leftovers_when_the_step_is_saved_again(tmp_path):
    run = str(tmp_path / "run")
    url = ckpt.step_url(run, 2)
    os.makedirs(url)
    for name, data in (("model.safetensors.tmp-4242-77", b"x" * 1000), ("model.safetensors", b"half"),
                       ("ema.safetensors", b"from an older run"), (ckpt.MARKER, b"2\n")):
        with open(os.path.join(url, name), "wb") as f:
            f.write(data)
    _save(run, 2)
    assert sorted(os.listdir(url)) == sorted(["COMMITTED", "config.yaml", "meta.json", "model.safetensors",
                                              "train_state.pt"])
    assert ckpt.load_weights(url)["w"].tolist() == [2.0, 2.0]


def _flip_last_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


def test_should_record_sizes_and_checksums_when_saving(tmp_path):
    run = str(tmp_path / "run")
    url = _save(run, 3, extra_weights={ckpt.EMA_FILE: {"w": torch.zeros(2)}})
    files = ckpt.load_meta(url)["files"]
    assert sorted(files) == ["config.yaml", "ema.safetensors", "model.safetensors", "train_state.pt"]
    for name, rec in files.items():
        data = open(os.path.join(url, name), "rb").read()
        assert rec["bytes"] == len(data)
        import zlib

        assert rec["crc32"] == f"{zlib.crc32(data):08x}"


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.pt", ckpt.EMA_FILE])
def test_should_refuse_a_committed_step_when_a_file_changed_after_the_commit(tmp_path, name):
    run = str(tmp_path / "run")
    url = _save(run, 3, extra_weights={ckpt.EMA_FILE: {"w": torch.arange(64, dtype=torch.float32)}})
    _flip_last_byte(os.path.join(url, name))  # a flipped bit in the tensor data: the format still parses
    load = {"model.safetensors": ckpt.load_weights, "train_state.pt": ckpt.load_train_state,
            ckpt.EMA_FILE: ckpt.load_ema}[name]
    with pytest.raises(ClipjobError, match=rf"{name}: crc32 [0-9a-f]{{8}} differs from the [0-9a-f]{{8}} recorded"):
        load(url)


def test_should_refuse_a_committed_step_when_a_file_was_truncated(tmp_path):
    run = str(tmp_path / "run")
    url = _save(run, 3)
    path = os.path.join(url, "model.safetensors")
    n = os.path.getsize(path)
    os.truncate(path, n - 5)
    with pytest.raises(ClipjobError, match=rf"model.safetensors: {n - 5} bytes, but {n} were written"):
        ckpt.load_weights(url)


def test_should_load_a_step_saved_before_checksums_were_recorded(tmp_path):
    import json

    run = str(tmp_path / "run")
    url = _save(run, 3)
    meta = ckpt.load_meta(url)
    del meta["files"]
    fs.write_text(fs.join(url, "meta.json"), json.dumps(meta))
    assert ckpt.load_weights(url)["w"].tolist() == [3.0, 3.0]


def test_should_fall_back_to_the_newest_step_that_loads_when_reading_a_run_dir(tmp_path, capsys):
    run = str(tmp_path / "run")
    for s in (2, 4, 6):
        _save(run, s)
    _flip_last_byte(os.path.join(ckpt.step_url(run, 6), "model.safetensors"))
    os.truncate(os.path.join(ckpt.step_url(run, 4), "model.safetensors"), 10)
    url, w = ckpt.load_newest(run, ckpt.load_weights)
    assert url == ckpt.step_url(run, 2) and w["w"].tolist() == [2.0, 2.0]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("warning: skipping checkpoint step 6, it does not load: ")
    assert ckpt.step_url(run, 6) in err[0]
    assert err[1].startswith("warning: skipping checkpoint step 4")
    os.truncate(os.path.join(ckpt.step_url(run, 2), "model.safetensors"), 10)
    with pytest.raises(ClipjobError, match=r"none of the committed checkpoints \(steps 2, 4, 6\) loads"):
        ckpt.load_newest(run, ckpt.load_weights)
    with pytest.raises(ClipjobError, match="no committed checkpoint found"):
        ckpt.load_newest(str(tmp_path / "nope"), ckpt.load_weights)


def test_should_not_skip_a_step_when_storage_is_unavailable(tmp_path):
    from clipjob.errors import RetryableError

    run = str(tmp_path / "run")
    for s in (2, 4):
        _save(run, s)

    def outage(url: str):
        raise RetryableError(f"{url}: storage endpoint unreachable")

    with pytest.raises(RetryableError):  # an outage is not a corrupt checkpoint: never fall back to step 2
        ckpt.load_newest(run, outage)


def test_should_prune_only_up_to_the_saved_step_when_a_stale_newer_step_exists(tmp_path):
    run = str(tmp_path / "run")
    for s in (2, 4):
        _save(run, s)
    os.truncate(os.path.join(ckpt.step_url(run, 4), "model.safetensors"), 10)  # the trainer resumed from 2
    _save(run, 3)
    assert ckpt.prune_checkpoints(run, keep=1) == [2]
    assert ckpt.committed_steps(run) == [3, 4]  # the step just saved survives; stale 4 waits for its re-save
    assert ckpt.load_weights(ckpt.step_url(run, 3))["w"].tolist() == [3.0, 3.0]
    _save(run, 4)
    assert ckpt.prune_checkpoints(run, keep=1) == [3]
    assert ckpt.load_weights(ckpt.step_url(run, 4))["w"].tolist() == [4.0, 4.0]


def test_should_not_resume_from_an_older_step_when_storage_fails_while_restoring(tmp_path, monkeypatch):
    from clipjob.errors import RetryableError
    from clipjob.train.trainer import build_parts, restore

    cfg = _run_with_steps_1_and_2(tmp_path)
    real = ckpt.load_weights

    def outage_at_step_2(url: str):
        if "step-00000002" in url:
            raise RetryableError(f"{url}: storage endpoint unreachable")
        return real(url)

    monkeypatch.setattr(ckpt, "load_weights", outage_at_step_2)
    with pytest.raises(RetryableError):  # resuming from step 1 would redo work and prune around a good step 2
        restore(cfg, build_parts(cfg, CPU), CPU)


# ---------------------------------------------------------------------------------------------------------
# background saves (train.ckpt_async, issue 16 item 2): the trainer's save flow; the saver itself: test_saver.py


def _slowed_saves(monkeypatch, seconds: float) -> list[tuple[int, float, float]]:
    """Every save_checkpoint first sleeps `seconds`; returns the (step, began, committed) of each save."""
    real, spans = ckpt.save_checkpoint, []

    def slow(run_dir, step, *args, **kwargs):
        began = time.monotonic()
        time.sleep(seconds)
        url = real(run_dir, step, *args, **kwargs)
        spans.append((step, began, time.monotonic()))
        return url

    monkeypatch.setattr(ckpt, "save_checkpoint", slow)
    return spans


def test_should_commit_the_snapshot_when_training_changes_the_state_during_a_background_save(tmp_path, monkeypatch,
                                                                                            capsys):
    from clipjob.train.saver import CheckpointSaver
    from clipjob.train.trainer import build_parts, restore, save

    cfg = tiny_config(*TINY, *[f"storage.run_dir={tmp_path / 'run'}",
                                                         "train.ema_momentum=0.5"])
    parts, state = _parts_after_one_step(cfg)
    weights = {k: v.clone() for k, v in parts.model.state_dict().items()}
    moments = {i: s["exp_avg"].clone() for i, s in parts.opt.state_dict()["state"].items()}
    _slowed_saves(monkeypatch, 0.5)
    saver = CheckpointSaver(background=True)
    save(cfg, parts, state, CPU, saver, background=True)
    assert saver.in_flight and state.ckpt_stall_s < 0.5  # back before the save is written
    with torch.no_grad():  # the next steps, while the save is in flight
        for p in parts.model.parameters():
            p.add_(1.0)
        for s in parts.opt.state.values():
            s["exp_avg"].zero_()
    state.step, state.samples_seen = 2, 8
    saver.wait()
    assert "checkpoint: step 1 committed in" in capsys.readouterr().out
    fresh = build_parts(cfg, CPU)
    got = restore(cfg, fresh, CPU)
    assert (got.step, got.samples_seen) == (1, 4)
    for k, v in fresh.model.state_dict().items():
        torch.testing.assert_close(v, weights[k])
    for i, s in fresh.opt.state_dict()["state"].items():
        torch.testing.assert_close(s["exp_avg"], moments[i])


def test_should_wait_for_the_save_in_flight_and_commit_the_stop_step_when_stopping(tmp_path, monkeypatch):
    from clipjob.train.saver import CheckpointSaver
    from clipjob.train.trainer import save, settle

    cfg = tiny_config(*TINY, *[f"storage.run_dir={tmp_path / 'run'}",
                                                         "train.ema_momentum=0.5"])
    run = cfg.storage.run_dir
    parts, state = _parts_after_one_step(cfg)
    spans = _slowed_saves(monkeypatch, 0.4)
    saver = CheckpointSaver(background=True)
    save(cfg, parts, state, CPU, saver, background=True)  # step 1 in the background
    state.step = 2
    save(cfg, parts, state, CPU, saver)  # the stop step: after step 1, committed on return
    assert ckpt.committed_steps(run) == [1, 2] and not saver.in_flight
    (s1, _, committed1), (s2, began2, _) = spans
    assert (s1, s2) == (1, 2) and committed1 <= began2
    state.step = 3
    save(cfg, parts, state, CPU, saver, background=True)
    assert ckpt.committed_steps(run) == [1, 2]
    settle(saver, CPU)  # a stop at the step whose save is in flight: wait for its commit
    assert ckpt.committed_steps(run) == [1, 2, 3]
    assert ckpt.load_train_state(ckpt.step_url(run, 3))["step"] == 3


@pytest.mark.parametrize("outage", [False, True])
def test_should_raise_a_failed_background_save_with_its_exit_code_when_training_saves_next(tmp_path, monkeypatch,
                                                                                          outage):
    from clipjob.errors import RetryableError
    from clipjob.train.saver import CheckpointSaver
    from clipjob.train.trainer import save

    cfg = tiny_config(*TINY, *[f"storage.run_dir={tmp_path / 'run'}",
                                                         "train.ema_momentum=0.5"])
    parts, state = _parts_after_one_step(cfg)
    real = fs.write_bytes

    def broken(url, data):
        if url.endswith("train_state.pt"):
            if outage:
                raise RetryableError(f"{url}: storage did not answer for 6 s")
            return None  # lost: the listing check refuses to commit
        return real(url, data)

    monkeypatch.setattr(fs, "write_bytes", broken)
    saver = CheckpointSaver(background=True)
    save(cfg, parts, state, CPU, saver, background=True)  # returns: the failure comes later
    state.step = 2
    with pytest.raises(ClipjobError) as raised:
        save(cfg, parts, state, CPU, saver)
    assert raised.value.exit_code == (203 if outage else 2)
    assert re.search(r"step-00000001(/|: )train_state.pt", str(raised.value)), raised.value
    assert ckpt.committed_steps(cfg.storage.run_dir) == []  # step 2 was not written after step 1 failed
