"""The one place clipjob touches storage: any fsspec URL (local path, file://, s3://, gs://, memory://, https://).

S3 endpoint and credentials come only from the standard AWS environment variables (AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), never from config files, and are never logged.

Waiting is bounded. Permanent errors (not found, access denied, ...) become a one-line ClipjobError naming the
URL at once. Transient ones (refused or dropped connections, timeouts, throttling, 5xx) are retried with
jittered backoff for as long as storage keeps failing, up to a bound (`configure(stall_s=...)`: the trainer
passes storage.stall_timeout_s, data reads data.stall_timeout_s; CLIPJOB_FS_STALL_S elsewhere); past it a
one-line RetryableError naming the URL (exit 203, retried by restart policies). Every request is cut off by
connect/read timeouts derived from the bound, so a server that accepts and never answers is an outage too.
Once the process is asked to stop (`configure(stop=...)`), no wait outlasts the stop grace: a save either
reaches storage within it or gives up with the RetryableError, leaving the previous commit intact.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import posixpath
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec

from clipjob.errors import ClipjobError, RetryableError

T = TypeVar("T")

BACKOFF_S = float(os.environ.get("CLIPJOB_FS_BACKOFF", "0.5"))  # first pause between attempts; doubles
MAX_BACKOFF_S = 5.0
UPLOAD_FLOOR_BPS = 8 << 20  # an upload slower than this may be cut off at the bound (see `retry`)
WARN_AFTER_S = 10.0  # storage silent this long: one warning line naming the URL (then at most one per WARN_EVERY_S)
WARN_EVERY_S = 30.0
_last_warning = [-math.inf]  # monotonic time of this process's last waiting line
STREAM_BLOCK = 4 << 20  # bytes per range request of a streamed shard; one more block is fetched ahead


@dataclass
class _Waits:
    """How long storage calls of this process may wait (see the module doc)."""

    stall_s: float = float(os.environ.get("CLIPJOB_FS_STALL_S", "60"))
    setting: str = "CLIPJOB_FS_STALL_S"  # what to change, named in the error
    requests_within_s: float = math.inf  # a smaller bound some reads use (data.stall_timeout_s)
    stop: Callable[[], bool] | None = None  # true once the process is asked to stop
    stop_grace_s: float = math.inf  # after which no storage wait continues
    stopped_at: float | None = None


_waits = _Waits()


class StopWaiting(Exception):
    """Raised instead of waiting on when the process was asked to stop during an interruptible wait (a data
    read: the trainer stops at its last completed step rather than wait for data it will not use)."""


def configure(stall_s: float, setting: str) -> None:
    """Set this process's storage wait bound and the config key that sets it (named in messages)."""
    _waits.stall_s, _waits.setting = float(stall_s), setting


def cap_request_timeouts(stall_s: float) -> None:
    """Make every request's timeouts fit a bound smaller than the process's (the data reads' bound)."""
    _waits.requests_within_s = min(_waits.requests_within_s, float(stall_s))


def on_stop(check: Callable[[], bool] | None, grace_s: float = math.inf) -> None:
    """Once `check()` is true (the process was asked to stop), storage waits end within `grace_s`; None: no
    check (DataLoader workers: their parent decides when to stop)."""
    _waits.stop, _waits.stop_grace_s, _waits.stopped_at = check, float(grace_s), None


def stall_bound() -> float:
    return _waits.stall_s


def _stop_deadline() -> float:
    """monotonic() time by which storage waits end because the process was asked to stop (inf: not asked)."""
    if _waits.stop is None or not _waits.stop():
        return math.inf
    if _waits.stopped_at is None:
        _waits.stopped_at = time.monotonic()
    return _waits.stopped_at + _waits.stop_grace_s


def request_timeouts(stall_s: float) -> tuple[float, float]:
    """(connect, read) timeouts of one storage request: short enough that a few attempts fit in the bound,
    never above botocore's (60 s)."""
    return min(10.0, max(1.0, stall_s / 4)), min(60.0, max(2.0, stall_s / 3))

# The only environment variables S3 settings come from (boto3's standard names). Values are never logged.
_S3_ENV = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY", "token": "AWS_SESSION_TOKEN"}
_session: tuple[int, Any] | None = None  # (pid, aiobotocore session): one per process, so s3fs caches clients


def _s3_session() -> Any:
    """An aiobotocore session that never reads ~/.aws/config or ~/.aws/credentials (profiles there could
    carry credentials or an endpoint). Credentials still come from the environment, web identity tokens
    (EKS IRSA, named by environment variables) or the container/instance role."""
    global _session
    if _session is None or _session[0] != os.getpid():
        from aiobotocore.session import AioSession

        # (config name, env var, default, converter): no profile (AWS_PROFILE names a file's section), no files
        s = AioSession(session_vars={"profile": (None, None, None, None),
                                     "config_file": (None, None, os.devnull, None),
                                     "credentials_file": (None, None, os.devnull, None)})
        _session = (os.getpid(), s)
    return _session[1]


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for a URL. For S3: endpoint (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) and credentials
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) from the environment only."""
    proto = protocol(url)
    if proto in ("s3", "s3a"):
        # one attempt per call, cut off by timeouts: `retry` is the only retry loop, so its bound holds
        connect, read = request_timeouts(min(_waits.stall_s, _waits.requests_within_s))
        opts: dict[str, Any] = {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"},
                                                  "connect_timeout": connect, "read_timeout": read},
                                "session": _s3_session()}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        opts.update({k: os.environ[v] for k, v in _S3_ENV.items() if os.environ.get(v)})
        return opts
    return {}


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol(url) == "file"


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    if protocol(url) in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own loop (5 attempts, each up to the read timeout) would outlast the bound
    return fs, path


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts) if "://" in url else os.path.join(url, *parts)


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)):
        return False
    name = type(e).__name__
    text = str(e)
    if any(s in text for s in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        return False
    return isinstance(e, (ConnectionError, TimeoutError, OSError)) or "Timeout" in name or "Connect" in name \
        or "EndpointConnectionError" in name or "ServiceUnavailable" in text or "SlowDown" in text


def describe(e: BaseException, url: str) -> str:
    """One line saying what went wrong with a URL and what to do."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        return f"{url}: bucket does not exist (create it, or check the URL and AWS_ENDPOINT_URL_S3)"
    if isinstance(e, FileNotFoundError) or "NoSuchKey" in text or "Not Found" in text:
        return f"{url}: not found"
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"{url}: access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket policy)"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{url}: no space left on the device (free some, or point the run dir at a larger volume)"
    if isinstance(e, OSError) and e.errno == errno.EROFS:
        return f"{url}: read-only file system (mount it writable, or point the run dir elsewhere)"
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return f"{url}: credentials rejected (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
    if "Could not connect" in text or "EndpointConnectionError" in type(e).__name__ or isinstance(e, ConnectionError):
        return f"{url}: storage endpoint unreachable (check AWS_ENDPOINT_URL_S3 / network): {text}"
    return f"{url}: {type(e).__name__}: {text}"


def retry(fn: Callable[[], T], url: str, stall_s: float | None = None, setting: str | None = None,
          interruptible: bool = False, nbytes: int = 0) -> T:
    """Run fn, retrying transient storage errors with jittered exponential backoff while storage keeps failing
    for less than `stall_s` (default: the process's bound), then a RetryableError naming the URL; permanent
    errors are a ClipjobError at once. Once the process is asked to stop, waits end after the stop grace, or at
    once (StopWaiting) when `interruptible`.

    One call that never returns counts as storage not answering: request timeouts do not cover every case (an
    upload to a server that accepts the connection and never reads has no timeout in aiohttp), so each attempt
    ends at the bound, or for an upload of `nbytes` after the time it takes at UPLOAD_FLOOR_BPS if longer."""
    bound = _waits.stall_s if stall_s is None else stall_s
    first_failure, attempt = None, 0
    while True:
        began = time.monotonic()
        limit = max((first_failure or began) + bound - began, nbytes / UPLOAD_FLOOR_BPS)
        try:
            return _call(fn, interruptible, began + limit)
        except (ClipjobError, StopWaiting):
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if not _is_transient(e):
                raise ClipjobError(describe(e, url)) from e
            now = time.monotonic()
            first_failure = first_failure or began  # storage has not answered since this attempt began
            stop_at = _stop_deadline()
            if interruptible and stop_at < math.inf:
                raise StopWaiting(url) from e
            if now >= min(first_failure + bound, stop_at):
                raise RetryableError(_stalled(e, url, now - first_failure, bound, setting, stop_at < math.inf)) from e
            _warn_waiting(url, first_failure, bound, setting, describe(e, url).removeprefix(f"{url}: "))
            pause = min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt) * (0.5 + random.random())
            _sleep_until(min(now + pause, first_failure + bound), interruptible)
            attempt += 1


def _warn_waiting(url: str, since: float, bound: float, setting: str | None, why: str) -> None:
    """One line once storage has failed every attempt for WARN_AFTER_S (a wrong endpoint, an outage), so a wait
    up to the bound (minutes by default) is not silent; at most one per WARN_EVERY_S in this process. Only failed
    attempts count: a call still running may be a large upload or download (a hung one ends at the bound)."""
    now = time.monotonic()
    if now - since < WARN_AFTER_S or now - _last_warning[0] < WARN_EVERY_S:
        return
    _last_warning[0] = now
    print(f"warning: {url}: storage not answering for {now - since:.0f} s ({why}); retrying for up to {bound:g} s "
          f"({setting or _waits.setting})", file=sys.stderr, flush=True)


class NoAnswer(TimeoutError):
    """A storage call still running at its deadline (the bound, see `retry`) or when the stop grace ran out;
    left to finish (or not) in its thread."""


def _call(fn: Callable[[], T], interruptible: bool, deadline: float) -> T:
    """fn(), in a daemon thread, so that a request the server never answers cannot hold the process past
    `deadline` (monotonic) or the stop grace: both end every call still running then, slow or hung (left to
    finish or not in its thread; past the grace the agent's SIGKILL would end it anyway)."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="clipjob-storage-call").start()
    while not done.wait(0.25):
        stop_at = _stop_deadline()
        if interruptible and stop_at < math.inf:
            raise StopWaiting()
        if time.monotonic() >= min(stop_at, deadline):
            raise NoAnswer("no answer to the request")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _sleep_until(t: float, interruptible: bool) -> None:
    """Back off until monotonic time t, in slices, ending early at the stop grace (or at once on a stop
    request when interruptible)."""
    while (now := time.monotonic()) < t:
        stop_at = _stop_deadline()
        if stop_at < math.inf and (interruptible or now >= stop_at):
            return
        time.sleep(min(0.25, t - now))


def _stalled(e: BaseException, url: str, waited: float, bound: float, setting: str | None, stopping: bool) -> str:
    why = describe(e, url).removeprefix(f"{url}: ")
    if stopping:
        since = time.monotonic() - (_waits.stopped_at or time.monotonic())
        return (f"{url}: storage did not answer within the stop grace ({since:.0f} s after the stop request, "
                f"storage.stop_wait_s={_waits.stop_grace_s:g}; {why}); exiting as retryable, the previous "
                f"committed checkpoint is intact")
    return (f"{url}: storage did not answer for {waited:.0f} s ({setting or _waits.setting}={bound:g}; {why}); "
            f"exiting as retryable: a restart resumes from the newest committed checkpoint")


@contextlib.contextmanager
def open_url(url: str, mode: str = "rb", **kw: Any) -> Iterator[IO]:
    """Open a file at any URL; errors become one-line ClipjobErrors naming the URL."""
    if "w" in mode and is_local(url):
        os.makedirs(os.path.dirname(os.path.abspath(url)) or ".", exist_ok=True)
    f = retry(lambda: fsspec.open(url, mode, **storage_options(url), **kw).open(), url)
    try:
        yield f
    finally:
        try:
            f.close()
        except Exception as e:  # noqa: BLE001 - a failed upload on close is a real error
            raise ClipjobError(describe(e, url)) from e


def open_stream(url: str, block_size: int = STREAM_BLOCK, stall_s: float | None = None, setting: str | None = None,
                interruptible: bool = False) -> IO[bytes]:
    """A binary read stream for sequential reading (webdataset's gopen handler); the caller closes it. Object
    stores are read in `block_size` range requests, the next one fetched while the current one is consumed;
    a request that fails transiently is retried within the bound (`retry`), so an outage shorter than it
    costs nothing but time. Missing or refused objects fail here, on open."""
    if is_local(url):
        return open(url[len("file://"):] if url.startswith("file://") else url, "rb")
    return RangeStream(url, block_size, stall_s, setting, interruptible)


class RangeStream(io.RawIOBase):
    """A read-only, forward-only stream of one object in fixed-size range requests, one block fetched ahead
    by a background thread: at most two blocks in memory, each GET `block_size` bytes (fsspec.open's
    `block_size` is a filesystem option, not a file one: s3fs read 50 MB blocks whatever it was given)."""

    def __init__(self, url: str, block_size: int, stall_s: float | None, setting: str | None, interruptible: bool):
        super().__init__()
        self.url, self.block = url, block_size
        self._retry = dict(stall_s=stall_s, setting=setting, interruptible=interruptible)
        self._fs, self._path = get_fs(url)
        self.size = retry(lambda: self._fs.size(self._path), url, **self._retry)  # HEAD: not found fails here
        self._buf, self._off, self._next_start = b"", 0, 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="clipjob-readahead")
        self._ahead: Future | None = self._fetch_async()

    def _fetch_async(self) -> Future | None:
        start = self._next_start
        if start >= self.size:
            return None
        end = min(start + self.block, self.size)
        self._next_start = end
        return self._pool.submit(retry, lambda: self._fs.cat_file(self._path, start=start, end=end), self.url,
                                 **self._retry)

    def readable(self) -> bool:
        return True

    def _next_block(self) -> bytes:
        """The block fetched ahead; an interruptible stream stops waiting for it on a stop request."""
        assert self._ahead is not None
        while True:
            try:
                return self._ahead.result(timeout=0.25)
            except FutureTimeout:
                if self._retry["interruptible"] and _stop_deadline() < math.inf:
                    raise StopWaiting(self.url) from None

    def read(self, n: int = -1) -> bytes:
        parts = []
        while n != 0:
            if self._off >= len(self._buf):
                if self._ahead is None:
                    break
                self._buf, self._off = self._next_block(), 0
                self._ahead = self._fetch_async()
                if not self._buf:  # the object got shorter than its HEAD said: end here
                    self._ahead = None
                    break
            take = len(self._buf) - self._off if n < 0 else min(n, len(self._buf) - self._off)
            parts.append(self._buf[self._off:self._off + take])
            self._off += take
            n -= take if n > 0 else 0
        return b"".join(parts)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._buf, self._ahead = b"", None
        super().close()


def read_bytes(url: str) -> bytes:
    def go() -> bytes:
        with fsspec.open(url, "rb", **storage_options(url)) as f:
            return f.read()

    return retry(go, url)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object. Local files are written to a temp name and renamed (atomic); object stores
    make a PUT visible atomically already."""
    if is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        tmp = f"{path}.tmp-{os.getpid()}-{random.randrange(1 << 30)}"
        with _local_errors(url, tmp):
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return
    fs, path = get_fs(url)
    retry(lambda: fs.pipe_file(path, data), url, nbytes=len(data))


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


@contextlib.contextmanager
def _local_errors(url: str, partial: str | None = None) -> Iterator[None]:
    """A local write's OSError (disk full, read-only, no permission) as a one-line ClipjobError naming the URL,
    never a traceback; the `partial` file it was writing is removed, so a full disk gets no fuller."""
    try:
        yield
    except OSError as e:
        if partial is not None:
            with contextlib.suppress(OSError):
                os.remove(partial)
        raise ClipjobError(describe(e, url)) from e


def append_text(url: str, text: str) -> None:
    """Append to a text object (read-modify-write on object stores; only rank 0 appends). The text starts on a
    line of its own even after a write that was cut short (a killed process, a full disk), so one partial line
    never swallows the next record."""
    if is_local(url):
        with _local_errors(url):
            os.makedirs(os.path.dirname(os.path.abspath(url)) or ".", exist_ok=True)
            with open(url, "a+b") as f:
                if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                    text = "\n" + text
                f.write(text.encode("utf-8"))
        return
    old = read_text(url) if exists(url) else ""
    write_text(url, old + ("\n" if old and not old.endswith("\n") else "") + text)


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return retry(lambda: fs.exists(path), url)


def ls(url: str) -> list[str]:
    """Names (not paths) of the entries directly under a directory URL; [] if it does not exist."""
    fs, path = get_fs(url)

    def go() -> list[str]:
        try:
            entries = fs.ls(path, detail=False, refresh=True) if not is_local(url) else fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(e.rstrip("/")) for e in entries})

    return retry(go, url)


def glob(url: str) -> list[str]:
    fs, path = get_fs(url)
    found = retry(lambda: fs.glob(path), url)
    proto = protocol(url)
    return sorted(p if proto == "file" else f"{proto}://{p}" for p in found)


def find(url: str) -> list[str]:
    """URLs of all files under a directory URL, recursively, sorted; [] if it does not exist."""
    fs_, path = get_fs(url)

    def go() -> list[str]:
        try:
            return fs_.find(path)
        except FileNotFoundError:
            return []

    proto = protocol(url)
    return sorted(p if proto == "file" else f"{proto}://{p}" for p in retry(go, url))


def bucket_missing(url: str) -> bool:
    """True when an object-store URL's bucket surely does not exist; False when it does, for local paths, and
    whenever it cannot be told (e.g. a policy that allows reading objects but not looking at the bucket)."""
    if protocol(url) not in ("s3", "s3a"):
        return False
    fs_, path = get_fs(url)
    try:
        fs_.call_s3("head_bucket", Bucket=path.split("/", 1)[0])
    except FileNotFoundError:
        return True
    except Exception:  # noqa: BLE001 - no answer is not a "no"; the reads that follow will say what is wrong
        return False
    return False


def makedirs(url: str) -> None:
    fs, path = get_fs(url)
    retry(lambda: fs.makedirs(path, exist_ok=True), url)


def rm(url: str, recursive: bool = True) -> None:
    fs, path = get_fs(url)

    def go() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    retry(go, url)


def size(url: str) -> int:
    fs, path = get_fs(url)
    return retry(lambda: fs.size(path), url)
