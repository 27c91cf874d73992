"""train/saver.py: host snapshots in reused buffers, one background save in flight, its error raised on the
training thread, a save still in flight when training fails. (The trainer's save flow: test_checkpoint.py.)"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

from clipjob.errors import ClipjobError, RetryableError
from clipjob.train.saver import CheckpointSaver, HostSnapshot


def test_should_copy_every_tensor_into_reused_buffers_when_snapshotting_twice():
    w, m = torch.arange(6.0), torch.ones(2, 3)
    tree = {"model": {"w": w, "n": torch.tensor(5)}, "opt": {"state": {0: {"m": m, "step": torch.tensor(3.0)}},
                                                             "groups": [{"lr": 0.1}]}, "step": 7, "bad": {"decode": 1}}
    snap = HostSnapshot()
    first = snap.take(tree)
    assert first["step"] == 7 and first["opt"]["groups"] == [{"lr": 0.1}] and first["bad"] == {"decode": 1}
    assert first["bad"] is not tree["bad"] and first["opt"]["groups"][0] is not tree["opt"]["groups"][0]
    assert first["model"]["w"].data_ptr() != w.data_ptr() and first["model"]["n"].item() == 5
    w.add_(100)  # the next optimizer step
    tree["bad"]["decode"] = 5
    assert first["model"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and first["bad"] == {"decode": 1}
    second = snap.take(tree)
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()  # no new allocation
    assert second["model"]["w"].tolist() == w.tolist()
    assert snap.nbytes() == (6 + 6 + 1) * 4 + 8


def _slow_write(seconds: float, spans: list):
    def write(tree) -> None:
        began = time.monotonic()
        time.sleep(seconds)
        spans.append((tree["step"], began, time.monotonic(), threading.current_thread().name))
    return write


def test_should_keep_one_save_in_flight_when_saves_come_faster_than_they_commit(capsys):
    spans: list = []
    with CheckpointSaver(background=True) as saver:
        stalls = [saver.save(step, _slow_write(0.3, spans), {"step": step}) for step in (1, 2, 3)]
        assert saver.in_flight
    assert [s[0] for s in spans] == [1, 2, 3] and all(s[3] == "clipjob-checkpoint-writer" for s in spans)
    assert all(a[2] <= b[1] for a, b in itertools.pairwise(spans))  # never two writes at once
    assert stalls[0] < 0.2 and stalls[1] >= 0.2 and stalls[2] >= 0.2  # each later save waited for the previous
    out = capsys.readouterr().out
    assert "checkpoint: step 1 committed in" in out and "for the previous save" in out.splitlines()[1], out


def test_should_write_on_the_calling_thread_without_a_snapshot_when_not_in_the_background(capsys):
    spans: list = []
    tree = {"step": 4, "w": torch.zeros(2)}
    seen: list = []
    for saver, background in ((CheckpointSaver(background=False), True), (CheckpointSaver(), False)):
        saver.save(4, lambda t: seen.append(t) or spans.append(threading.current_thread().name), tree, background)
        assert not saver.in_flight
    assert all(t is tree for t in seen) and spans == [threading.current_thread().name] * 2
    assert capsys.readouterr().out.count("checkpoint: step 4 committed in") == 2


@pytest.mark.parametrize("error", [RetryableError("s3://b/run/checkpoints/step-00000002/model.safetensors: "
                                                  "storage did not answer for 6 s"),
                                   ClipjobError("s3://b/run/checkpoints/step-00000002: train_state.pt missing")])
def test_should_raise_the_background_error_on_the_training_thread_when_a_write_fails(error):
    def failing(tree) -> None:
        raise error

    saver = CheckpointSaver()
    assert saver.save(2, failing, {"step": 2}) < 1.0  # the failure is not known yet
    while saver.in_flight:
        time.sleep(0.01)
    with pytest.raises(type(error)) as raised:  # the next step's check
        saver.raise_failure()
    assert raised.value is error and raised.value.exit_code == error.exit_code
    saver.raise_failure()  # raised once
    saver.save(4, failing, {"step": 4})
    with pytest.raises(type(error)):  # the next save (or the stop's wait) raises it before writing anything
        saver.save(6, lambda t: pytest.fail("wrote after a failed save"), {"step": 6})


def test_should_let_the_save_in_flight_commit_when_training_fails(capsys):
    spans: list = []
    with pytest.raises(ValueError, match="lost the data"), CheckpointSaver() as saver:
        saver.save(8, _slow_write(0.3, spans), {"step": 8})
        raise ValueError("lost the data")
    assert [s[0] for s in spans] == [8] and "checkpoint: step 8 committed" in capsys.readouterr().out

    def failing(tree) -> None:
        raise RetryableError("s3://b/run: storage did not answer for 6 s")

    with pytest.raises(ValueError, match="lost the data"), CheckpointSaver() as saver:  # the training error wins
        saver.save(8, failing, {"step": 8})
        raise ValueError("lost the data")
    assert "warning: the checkpoint save in flight failed too: s3://b/run: storage did not answer" in \
        capsys.readouterr().out


def test_should_not_wait_for_the_save_in_flight_when_interrupted_twice():
    release = threading.Event()
    with pytest.raises(KeyboardInterrupt), CheckpointSaver() as saver:
        saver.save(8, lambda t: release.wait(10), {"step": 8})
        raise KeyboardInterrupt
    assert saver.in_flight  # left behind (a daemon thread): the process ends without it
    release.set()
    saver.wait()
