"""Errors a user or the environment can cause, and the exit codes they map to.

The exit code is chosen for the restart policy that reads it (docs/distributed.md, "Exit codes"): Kubeflow's
`ExitCode` policy and a Job's pod failure policy retry 128-255 and treat 1-127 as permanent.
- `ClipjobError` (bad config value, missing shard, corrupt data past its budget): a person must fix
  something, a restart cannot help -> one line and `EXIT_PERMANENT` (2).
- `RetryableError` (storage outage that outlasted its bounded wait, lost peer, rendezvous timeout): the same
  command can succeed later -> one line and `EXIT_RETRYABLE` (203 = 128 + EX_TEMPFAIL; no signal has it).
- Stopped by a signal (SIGTERM on preemption) after committing the step: 128 + signal (143).
"""

import sys

EXIT_PERMANENT = 2
EXIT_RETRYABLE = 203  # 128 + 75 (sysexits EX_TEMPFAIL): >= 128, so retried; above every signal number


class ClipjobError(Exception):
    """A problem the user can fix: bad config value, unreachable URL, corrupt checkpoint, ..."""

    exit_code = EXIT_PERMANENT


class ConfigError(ClipjobError):
    """A config key is unknown or its value is invalid; the message names the key."""


class RetryableError(ClipjobError):
    """A transient failure that outlasted its bounded wait (storage outage, lost peer): retrying the same
    command later can succeed, so the process exits with EXIT_RETRYABLE and restart policies retry it."""

    exit_code = EXIT_RETRYABLE


def whole_lines() -> None:
    """Every later print of this process (and of the DataLoader workers it forks) reaches stdout / stderr as
    one write per line, so lines of ranks sharing the agent's pipe never interleave. Under PYTHONUNBUFFERED=1
    (the image sets it) print writes its text and its newline separately; line buffering without write
    through joins them and still flushes at every newline, so logs stay live. One write of under PIPE_BUF
    bytes (4096 on Linux) reaches a pipe whole; without this, two ranks printing the same error merged into one
    garbled line ("...not founderror: ...not found", seen in CI)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a real text stream, not a test's replacement
            stream.reconfigure(write_through=False, line_buffering=True)
