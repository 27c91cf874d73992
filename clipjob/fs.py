"""The one place clipjob touches storage: any fsspec URL (local path, file://, s3://, gs://, memory://, https://).

S3 endpoint and credentials come only from the standard AWS environment variables (AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), never from config files, and are never logged. Transient errors
are retried with exponential backoff; permanent ones become a one-line ClipjobError naming the URL.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import random
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec

from clipjob.errors import ClipjobError

T = TypeVar("T")

RETRIES = int(os.environ.get("CLIPJOB_FS_RETRIES", "5"))
BACKOFF_S = float(os.environ.get("CLIPJOB_FS_BACKOFF", "0.5"))
STREAM_BLOCK = 4 << 20  # read-ahead of streamed shards: few, large range requests

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
        opts: dict[str, Any] = {"config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"}},
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
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return f"{url}: credentials rejected (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
    if "Could not connect" in text or "EndpointConnectionError" in type(e).__name__ or isinstance(e, ConnectionError):
        return f"{url}: storage endpoint unreachable (check AWS_ENDPOINT_URL_S3 / network): {text}"
    return f"{url}: {type(e).__name__}: {text}"


def retry(fn: Callable[[], T], url: str, retries: int = RETRIES) -> T:
    """Run fn, retrying transient storage errors with jittered exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except ClipjobError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if attempt == retries or not _is_transient(e):
                raise ClipjobError(describe(e, url)) from e
            time.sleep(BACKOFF_S * (2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


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


def open_stream(url: str, block_size: int = STREAM_BLOCK) -> IO[bytes]:
    """A binary read stream for sequential reading (webdataset's gopen handler); the caller closes it."""
    return retry(lambda: fsspec.open(url, "rb", block_size=block_size, **storage_options(url)).open(), url)


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
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{random.randrange(1 << 30)}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, path = get_fs(url)
    retry(lambda: fs.pipe_file(path, data), url)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def append_text(url: str, text: str) -> None:
    """Append to a text object (read-modify-write on object stores; only rank 0 appends)."""
    if is_local(url):
        os.makedirs(os.path.dirname(os.path.abspath(url)) or ".", exist_ok=True)
        with open(url, "a", encoding="utf-8") as f:
            f.write(text)
        return
    old = read_text(url) if exists(url) else ""
    write_text(url, old + text)


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
