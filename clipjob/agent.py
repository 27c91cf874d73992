"""The elastic agent: torchrun (`torch.distributed.run`), with one difference. When the agent is signalled
(SIGTERM on pod deletion or preemption), torchrun stops its workers, which commit a checkpoint, and then dies
of an uncaught SignalException: exit 1 and a traceback. Exit 1 reads as a permanent failure to the
PyTorchJob `ExitCode` restart policy (1-127) and a Job's pod failure policy. Here it exits 128 + signal, as
a process killed by that signal would (143 for SIGTERM: retryable), with one line saying so.

    python -m clipjob.agent <torchrun arguments>      (what `clipjob train` execs into; see dist.py)
"""

from __future__ import annotations

import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except SignalException as e:
        signum = int(e.sigval)
        print(f"elastic agent: stopped by signal {signum} (the workers saved their step); exit {128 + signum}",
              file=sys.stderr, flush=True)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
