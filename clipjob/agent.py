"""The elastic agent: torchrun (`torch.distributed.run`) with exit codes chosen for the operator's restart
policy, and one line instead of a traceback (docs/distributed.md, "Failures and exit codes").

torchrun alone exits 1 with a traceback on every failure: a rendezvous timeout, a lost store, restarts used
up by a worker that the OOM killer took, a bad config found by the workers, SIGTERM on preemption. The
PyTorchJob `ExitCode` policy (and a Job's pod failure policy) treats 1-127 as permanent, so one transient
fault would fail a 32-node job for good. Here:

    signal S reached the agent (it forwards it; the workers commit their step)    -> 128 + S (143: SIGTERM)
    every worker stopped by signal S after committing (exit 128 + S)              -> 128 + S
    a worker's ClipjobError (exit 2: bad config, data past max_bad_fraction)      -> 2, its line repeated
    rendezvous timeout, rendezvous store lost, restarts used up by workers killed
      by a signal or exiting 203 (a lost peer, a storage outage past its wait)    -> 203 (EXIT_RETRYABLE)
    a worker's unexpected error (exit 1 and its traceback: a bug to report)       -> 1

Each outcome is one line that says what is committed, read from the run dir (`clipjob train` passes it in
CLIPJOB_RUN_DIR): the newest committed step, which is where the next start resumes.

    python -m clipjob.agent <torchrun arguments>      (what `clipjob train` execs into; see dist.py)
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any

from clipjob.dist import RUN_DIR_ENV
from clipjob.errors import EXIT_PERMANENT, EXIT_RETRYABLE, whole_lines

READ_TIMEOUT_S = 10.0  # reading the run dir must not eat the pod's grace period (storage may be down)


def main() -> int:
    # Each rendezvous round publishes a fresh store address that rank 0's worker hosts (dist._worker_store).
    # torch's default, reusing the agent's store across rounds, deadlocks when a replaced node joins: the
    # host never republishes MASTER_ADDR for the new round (docs/distributed.md, "Losing a node").
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    whole_lines()  # the agent's lines share the pipe with its workers': one write each
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # as the workers: stacks on stderr, goes on
    from torch.distributed.run import main as torchrun

    # torchrun's default log dir (workers' error files, per attempt) is a new folder in /tmp that it never
    # removes: one per pod start, hundreds over a test suite. Ours goes when the agent does (read by then).
    scratch = None
    if _launch_arg("log_dir", None) is None:
        scratch = tempfile.mkdtemp(prefix="clipjob-agent-")
        sys.argv[1:1] = ["--log-dir", scratch]
    try:
        return _run(torchrun)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _run(torchrun) -> int:
    """torchrun's main -> this agent's exit code, with one line on stderr for every failure."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (RendezvousClosedError, RendezvousError,
                                                          RendezvousTimeoutError)

    try:
        torchrun()
        return 0
    except SignalException as e:
        code, what = 128 + int(e.sigval), f"stopped by signal {int(e.sigval)}"
    except ChildFailedError as e:
        code, what = worker_failure(e.failures, _launch_arg("max_restarts", "?"))
    except RendezvousTimeoutError:
        code, what = EXIT_RETRYABLE, (f"rendezvous at {_launch_arg('rdzv_endpoint', '?')} (id "
                                      f"{_launch_arg('rdzv_id', '?')}) timed out before {_launch_arg('nnodes', '?')} "
                                      f"node(s) joined")
    except RendezvousClosedError:  # another node's agent gave up and closed it; it reopens with a new store host
        code, what = EXIT_RETRYABLE, (f"the rendezvous at {_launch_arg('rdzv_endpoint', '?')} (id "
                                      f"{_launch_arg('rdzv_id', '?')}) was closed by a node that gave up")
    except (RendezvousError, DistError) as e:
        code, what = EXIT_RETRYABLE, (f"lost the rendezvous store at {_launch_arg('rdzv_endpoint', '?')} "
                                      f"({type(e).__name__}: {_first_line(e)})")
    if code == EXIT_PERMANENT:  # the worker's own one line, as a lone process would print it
        print(f"error: {what}", file=sys.stderr, flush=True)
    else:
        print(f"elastic agent: {what}; {committed_summary(os.environ.get(RUN_DIR_ENV))}; exit {code} "
              f"({_MEANING.get(code, 'interrupted: a restart resumes from there')})", file=sys.stderr, flush=True)
    return code


_MEANING = {EXIT_RETRYABLE: "retryable: a restarted pod resumes from there",
            1: "not retried: an unexpected error, see the worker's traceback above"}


def worker_failure(failures: dict[int, Any], max_restarts: Any) -> tuple[int, str]:
    """Exit code and description for a worker group that failed with no restart left. `failures` maps
    global rank -> torch's ProcessFailure (exitcode < 0: killed by that signal).

    A permanent error anywhere wins (a retry would meet it again). Workers that all stopped on a signal after
    committing (128 + S; those the agent SIGTERMed while they were still exiting count with them) pass that
    code on. Otherwise the cause decides: a worker killed by a signal (OOM
    killer, segfault) or exiting 203 -> retryable; an uncaught exception (exit 1) -> 1. The cause is the most
    telling failure, not the first one: the survivors of a crash exit 203 with "lost contact" (often before
    the agent notices the crash) or are SIGTERMed by the agent, and neither is why the group failed."""
    for rank, f in failures.items():
        if f.exitcode == EXIT_PERMANENT:
            return EXIT_PERMANENT, _worker_message(f) or f"rank {rank} exited {EXIT_PERMANENT} (its error is above)"
    stopped = [f.exitcode for f in failures.values() if 128 < f.exitcode <= 128 + signal.NSIG]
    if stopped and all(f.exitcode in stopped or f.exitcode == -signal.SIGTERM for f in failures.values()):
        # (-SIGTERM: a worker still exiting when the agent saw the first one stop, and stopped it itself)
        return stopped[0], f"the workers stopped on signal {stopped[0] - 128}"
    rank, root = min(failures.items(), key=lambda item: (_cause_order(item[1].exitcode), item[1].timestamp))
    code = root.exitcode
    spent = f"and no restart is left (--max-restarts {max_restarts})"
    if code < 0:
        return EXIT_RETRYABLE, f"rank {rank} was killed by {_signal_name(-code)} {spent}"
    if code > 128:
        why = _worker_message(root) or f"exited {code}"
        return EXIT_RETRYABLE, f"rank {rank} failed ({why}) {spent}"
    return 1, f"rank {rank} exited {code}"


def _cause_order(exitcode: int) -> int:
    if exitcode < 0 and exitcode != -signal.SIGTERM:
        return 0  # crashed or killed (SIGKILL from the OOM killer, SIGSEGV, SIGABRT)
    if 0 < exitcode <= 128:
        return 1  # an uncaught exception
    if exitcode > 128:
        return 2  # a retryable exit: lost contact with a peer, storage outage past its wait
    return 3  # SIGTERMed by the agent stopping the survivors


def committed_summary(run_dir: str | None, timeout_s: float = READ_TIMEOUT_S) -> str:
    """What a restart resumes from: the newest committed step of the run dir, read within `timeout_s`."""
    if not run_dir:
        return "run dir unknown, commits not checked"
    from clipjob import checkpoint as ckpt

    result: dict[str, Any] = {}

    def read() -> None:
        try:
            result["steps"] = ckpt.committed_steps(run_dir)
        except Exception as e:  # storage down, bad credentials: report it, the exit code stands
            result["error"] = f"{type(e).__name__}: {_first_line(e)}"

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if "steps" in result:
        steps = result["steps"]
        if not steps:
            return f"no committed checkpoint in {run_dir}"
        return f"newest committed checkpoint: step {max(steps)} ({ckpt.step_url(run_dir, max(steps))})"
    return f"could not read {run_dir} ({result.get('error', f'no answer within {timeout_s:.0f} s')})"


def _worker_message(failure: Any) -> str | None:
    """The one-line error a worker left in its torchelastic error file (dist.record_worker_error)."""
    if not os.path.isfile(failure.error_file):  # none written ("<N/A>"): torch made up a message
        return None
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message")
    return message.strip().splitlines()[0] if isinstance(message, str) and message.strip() else None


def _launch_arg(name: str, default: Any) -> Any:
    """One of this agent's torchrun options (for messages)."""
    from torch.distributed.run import parse_args

    try:
        return getattr(parse_args(sys.argv[1:]), name)
    except (SystemExit, Exception):
        return default


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or repr(e)
    return text.splitlines()[0][:300]


if __name__ == "__main__":
    sys.exit(main())
