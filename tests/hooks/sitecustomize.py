"""Fault-injection hooks for the tests, kept out of clipjob's code: tests/conftest.py puts this folder on
PYTHONPATH, so every Python process a test starts (torchrun agents, workers, `python -c`) imports this module
at start-up. It does nothing unless one of these variables is set:

- CLIPJOB_TEST_STEP_DELAY_S=S: each training step sleeps S seconds first (so a test can act mid-run).
- CLIPJOB_TEST_SAVE_DELAY_S=S: each checkpoint save first spends S seconds in a storage call (as slow as a
  multi-GiB upload; it runs under the same stall/stop bounds as the save's own calls).
- CLIPJOB_TEST_CRASH_DURING_SAVE=K: the K-th save of the process exits (os._exit(1)) right after writing the
  step's model.safetensors and before COMMITTED, on the first attempt only (a worker group restarted by the
  elastic agent saves normally).
- CLIPJOB_TEST_ABORT_IN_TEARDOWN=R: rank R dies of SIGABRT (os.abort()) when it tears down its process group at
  the end of training, after the final commit, as gloo's teardown once did in this suite ("terminate called
  without an active exception"); on the first attempt only.
"""

from __future__ import annotations

import functools
import os
import re
import time


def _install_step_delay(delay_s: float) -> None:
    from clipjob.train import trainer

    begin = trainer.begin_step

    @functools.wraps(begin)
    def slowed(*args, **kwargs):
        time.sleep(delay_s)
        return begin(*args, **kwargs)

    trainer.begin_step = slowed


def _install_save_delay(delay_s: float) -> None:
    from clipjob import checkpoint, fs

    save = checkpoint.save_checkpoint

    @functools.wraps(save)
    def slowed(run_dir, step, *args, **kwargs):
        fs.retry(lambda: time.sleep(delay_s), checkpoint.step_url(run_dir, step))
        return save(run_dir, step, *args, **kwargs)

    checkpoint.save_checkpoint = slowed


def _install_crash_during_save(nth: int) -> None:
    from clipjob import dist, fs

    write = fs.write_bytes
    weights = re.compile(r"/step-\d{8}/model\.safetensors$")
    saves = 0

    @functools.wraps(write)
    def crashing(url, data, *args, **kwargs):
        nonlocal saves
        out = write(url, data, *args, **kwargs)
        if weights.search(url):
            saves += 1
            if saves == nth and dist.restart_count() == 0:
                print(f"CLIPJOB_TEST_CRASH_DURING_SAVE: exiting during save {saves}", flush=True)
                os._exit(1)
        return out

    fs.write_bytes = crashing


def _install_abort_in_teardown(rank: int) -> None:
    from clipjob import dist

    cleanup = dist.cleanup

    @functools.wraps(cleanup)
    def aborting():
        if dist.restart_count() == 0 and int(os.environ.get("RANK", 0)) == rank:
            print(f"CLIPJOB_TEST_ABORT_IN_TEARDOWN: rank {rank} aborts", flush=True)
            os.abort()
        return cleanup()

    dist.cleanup = aborting


if os.environ.get("CLIPJOB_TEST_STEP_DELAY_S"):
    _install_step_delay(float(os.environ["CLIPJOB_TEST_STEP_DELAY_S"]))
if os.environ.get("CLIPJOB_TEST_SAVE_DELAY_S"):
    _install_save_delay(float(os.environ["CLIPJOB_TEST_SAVE_DELAY_S"]))
if os.environ.get("CLIPJOB_TEST_CRASH_DURING_SAVE"):
    _install_crash_during_save(int(os.environ["CLIPJOB_TEST_CRASH_DURING_SAVE"]))
if os.environ.get("CLIPJOB_TEST_ABORT_IN_TEARDOWN"):
    _install_abort_in_teardown(int(os.environ["CLIPJOB_TEST_ABORT_IN_TEARDOWN"]))
