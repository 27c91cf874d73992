"""fs.py: S3 settings from the environment only, retries on transient errors, one-line errors naming the URL,
against the loopback S3 server (real HTTP through s3fs)."""

from __future__ import annotations

import asyncio
import errno
import math
import os
import re
import socket
import threading
import time

import pytest

from clipjob import fs
from clipjob.errors import ClipjobError, RetryableError
from s3server import S3Server, apply_env, free_port


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text, text
    return text


def test_should_take_s3_endpoint_and_credentials_from_the_environment_when_set(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    opts = fs.storage_options("s3://bucket/key")
    assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9"}
    assert (opts["key"], opts["secret"]) == ("AKIDENV", "secret-from-env") and "token" not in opts
    assert fs.storage_options("/local/path") == {} and fs.storage_options("memory://x") == {}


def test_should_ignore_aws_config_and_credentials_files_when_resolving_s3_credentials(tmp_path, monkeypatch):
    creds, config = tmp_path / "credentials", tmp_path / "config"
    creds.write_text("[default]\naws_access_key_id = AKIDFILE\naws_secret_access_key = from-file\n")
    config.write_text("[default]\nendpoint_url = http://evil.invalid\nregion = eu-west-1\n")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
              "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "default")  # names a section of those files: ignored, not an error
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(fs, "_session", None)
    opts = fs.storage_options("s3://bucket/key")
    assert "key" not in opts and "client_kwargs" not in opts
    session = opts["session"]
    assert asyncio.run(session.get_credentials()) is None  # the file's keys are never picked up
    assert session.get_config_variable("region") != "eu-west-1"


def test_should_retry_transient_errors_with_backoff_when_a_call_fails_then_succeeds(monkeypatch):
    monkeypatch.setattr(fs, "BACKOFF_S", 0.01)
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "ok"

    assert fs.retry(flaky, "s3://b/k") == "ok" and len(calls) == 3
    assert calls[1] - calls[0] >= 0.004 and calls[2] - calls[1] >= 0.009  # backed off, longer each time


def test_should_not_retry_when_the_error_is_permanent():
    calls = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(ClipjobError) as e:
        fs.retry(missing, "s3://b/k")
    assert len(calls) == 1 and one_line(e.value) == "s3://b/k: not found"


def test_should_name_the_url_when_the_bucket_does_not_exist(s3_server):
    with pytest.raises(ClipjobError) as e:
        fs.read_bytes("s3://no-such-bucket-x1/a/b.tar")
    assert one_line(e.value).startswith("s3://no-such-bucket-x1/a/b.tar: bucket does not exist")


def test_should_tell_a_missing_bucket_from_an_existing_one(s3_bucket, tmp_path):
    assert fs.bucket_missing("s3://no-such-bucket-x1/a/{0..9}.tar")
    assert not fs.bucket_missing(f"{s3_bucket}/nothing/here") and not fs.bucket_missing(str(tmp_path / "x"))


def test_should_name_the_url_when_the_key_does_not_exist(s3_bucket):
    url = f"{s3_bucket}/missing.tar"
    for call in (fs.read_bytes, fs.open_stream):
        with pytest.raises(ClipjobError) as e:
            call(url)
        assert one_line(e.value) == f"{url}: not found"


class _LateProxy:
    """A TCP forwarder on loopback that refuses connections until `delay` seconds have passed (an S3
    endpoint that is briefly down), then pipes bytes to the real server."""

    def __init__(self, target_port: int, delay: float):
        self.port, self.target, self.delay = free_port(), target_port, delay
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        time.sleep(self.delay)
        srv = socket.create_server(("127.0.0.1", self.port))
        srv.settimeout(0.2)
        while not self.stop.is_set():
            try:
                client, _ = srv.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
        srv.close()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_should_read_an_object_when_the_endpoint_comes_up_after_a_few_failed_connections(s3_server, s3_bucket,
                                                                                        monkeypatch):
    url = f"{s3_bucket}/k.bin"
    fs.write_bytes(url, b"payload")
    proxy = _LateProxy(s3_server.port, delay=1.5)
    monkeypatch.setattr(fs, "BACKOFF_S", 0.2)
    try:
        apply_env({**s3_server.env(), "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{proxy.port}"})
        t0 = time.monotonic()
        assert fs.read_bytes(url) == b"payload"
        assert time.monotonic() - t0 >= 1.0  # it had to wait for the endpoint
    finally:
        proxy.stop.set()
        apply_env(s3_server.env())


def test_should_report_access_denied_without_printing_secrets_when_the_request_is_refused(monkeypatch):
    """A second moto server that enforces IAM: a user without any policy is refused."""
    import boto3
    from botocore.exceptions import ClientError

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "30")  # setup calls below run unauthenticated
    server = S3Server().start()
    monkeypatch.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
    old = {k: os.environ.get(k) for k in server.env()}
    try:
        root = dict(endpoint_url=server.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                    region_name="us-east-1")
        boto3.client("s3", **root).create_bucket(Bucket="locked")
        boto3.client("s3", **root).put_object(Bucket="locked", Key="a.tar", Body=b"x")
        boto3.client("iam", **root).create_user(UserName="nobody")
        key = boto3.client("iam", **root).create_access_key(UserName="nobody")["AccessKey"]
        nobody = boto3.client("s3", **{**root, "aws_access_key_id": key["AccessKeyId"],
                                       "aws_secret_access_key": key["SecretAccessKey"]})
        for _ in range(40):  # use up the unauthenticated allowance until the server starts refusing
            try:
                nobody.head_object(Bucket="locked", Key="a.tar")
            except ClientError:
                break
        else:
            pytest.fail("the IAM-enforcing server never refused the request")
        apply_env({**server.env(), "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                   "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]})
        for call in (fs.read_bytes, fs.open_stream):
            with pytest.raises(ClipjobError) as e:
                call("s3://locked/a.tar")
            msg = one_line(e.value)
            assert msg.startswith("s3://locked/a.tar: access denied")
            assert key["SecretAccessKey"] not in msg and key["AccessKeyId"] not in msg
        assert not fs.bucket_missing("s3://locked/a.tar")  # refused is not "missing"
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        apply_env({})


def test_should_list_files_recursively_when_finding_under_a_directory(tmp_path, s3_bucket):
    for base in (str(tmp_path), s3_bucket):
        fs.write_text(fs.join(base, "a", "1.txt"), "1")
        fs.write_text(fs.join(base, "a", "b", "2.txt"), "2")
        assert fs.find(fs.join(base, "a")) == [fs.join(base, "a", "1.txt"), fs.join(base, "a", "b", "2.txt")]
    assert fs.find(str(tmp_path / "nothing")) == []


def test_should_raise_a_retryable_error_naming_the_url_when_storage_stays_down_past_the_bound(monkeypatch):
    monkeypatch.setattr(fs, "BACKOFF_S", 0.05)
    calls = []

    def down() -> None:
        calls.append(time.monotonic())
        raise ConnectionError("connection refused")

    with pytest.raises(RetryableError) as e:
        fs.retry(down, "s3://b/k", stall_s=0.6, setting="data.stall_timeout_s")
    msg = one_line(e.value)
    assert msg.startswith("s3://b/k: storage did not answer for ") and "data.stall_timeout_s=0.6" in msg, msg
    # retried until the bound (the last pause is cut to end at it, then one last attempt), not longer
    assert 0.59 <= calls[-1] - calls[0] < 0.6 + 0.1 and len(calls) >= 3, calls


def test_should_say_once_that_storage_is_not_answering_when_it_fails_past_the_warning_time(monkeypatch, capsys):
    """A wrong endpoint or an outage waits up to the bound (minutes by default): after WARN_AFTER_S of failed
    attempts one line names the URL, the cause and the bound (at most one per WARN_EVERY_S); a shorter blip says
    nothing."""
    monkeypatch.setattr(fs, "BACKOFF_S", 0.02)
    monkeypatch.setattr(fs, "WARN_AFTER_S", 0.3)
    monkeypatch.setattr(fs, "_last_warning", [-math.inf])
    t0 = time.monotonic()

    def down_until(t: float):
        def call() -> str:
            if time.monotonic() < t:
                raise ConnectionError("connection refused")
            return "ok"
        return call

    assert fs.retry(down_until(t0 + 0.15), "s3://b/blip", stall_s=5) == "ok"
    assert capsys.readouterr().err == ""  # under the warning time: silent
    assert fs.retry(down_until(time.monotonic() + 0.8), "s3://b/k", stall_s=5, setting="storage.stall_timeout_s") == "ok"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines  # one line, not one per attempt
    m = re.fullmatch(r"warning: s3://b/k: storage not answering for (\d+) s \(.*connection refused.*\); retrying for "
                     r"up to 5 s \(storage.stall_timeout_s\)", lines[0])
    # said at the first failure past 0.3 s. Pause k is 0.02 x 2^k x (0.5..1.5) and the pauses before it add up to at
    # least 0.02 x (2^k - 1) x 0.5, so a pause is under 3x (+ 0.03 s) the time already waited (< 0.3 s): the
    # crossing attempt fails before 4 x 0.3 + 0.03 s, said as "0 s" or "1 s"
    assert m and int(m[1]) in (0, 1), lines
    with pytest.raises(RetryableError):  # the same process again within WARN_EVERY_S: the error line only
        fs.retry(down_until(math.inf), "s3://b/k2", stall_s=0.6)
    assert capsys.readouterr().err == ""


def test_should_start_an_append_on_a_line_of_its_own_after_a_write_cut_short(tmp_path, s3_bucket):
    """A process killed mid-append (or a full disk) leaves a partial last line; the next record must not be glued
    to it, or the reader loses both."""
    for base in (str(tmp_path), s3_bucket):
        url = fs.join(base, "metrics.jsonl")
        fs.append_text(url, '{"step": 1}\n{"step": 2, "lo')  # cut short
        fs.append_text(url, '{"step": 3}\n')
        fs.append_text(url, '{"step": 4}\n')
        assert fs.read_text(url).splitlines() == ['{"step": 1}', '{"step": 2, "lo', '{"step": 3}', '{"step": 4}']
        fs.append_text(fs.join(base, "new.jsonl"), "x\n")  # a new file starts with the text itself
        assert fs.read_text(fs.join(base, "new.jsonl")) == "x\n"


def test_should_say_what_to_do_when_a_local_disk_is_full_or_read_only():
    full = fs.describe(OSError(errno.ENOSPC, "No space left on device"), "/runs/a/checkpoints/step-00000010/x")
    assert full == "/runs/a/checkpoints/step-00000010/x: no space left on the device (free some, or point the run " \
                   "dir at a larger volume)"
    assert "read-only file system" in fs.describe(OSError(errno.EROFS, "Read-only file system"), "/ro/x")


def test_should_give_up_a_hung_call_within_the_stop_grace_when_the_process_is_asked_to_stop(monkeypatch):
    """A request the server never answers (held connection) ends at the stop grace, not at its read timeout."""
    stopping = threading.Event()
    monkeypatch.setattr(fs, "_waits", fs._Waits())
    fs.on_stop(stopping.is_set, grace_s=0.5)
    threading.Timer(0.3, stopping.set).start()
    t0 = time.monotonic()
    with pytest.raises(RetryableError) as e:
        fs.retry(lambda: time.sleep(30), "s3://b/run/checkpoints/step-00000004/COMMITTED", stall_s=60)
    took = time.monotonic() - t0
    assert 0.8 <= took < 0.8 + 0.6, took  # signal at 0.3 s + 0.5 s grace, polled every 0.25 s
    assert "within the stop grace" in one_line(e.value) and "previous committed checkpoint is intact" in str(e.value)
    with pytest.raises(fs.StopWaiting):  # a data read stops waiting at once
        fs.retry(lambda: time.sleep(30), "s3://b/shard.tar", interruptible=True)


def test_should_raise_a_retryable_error_when_an_upload_gets_no_answer_within_the_bound(s3_server, s3_bucket,
                                                                                      monkeypatch):
    """A PUT to a server that accepts the connection and never answers has no timeout in aiohttp (a checkpoint
    save hung there for good): the attempt ends at the bound like any other outage. Once storage answers again,
    the next write goes through. (To another object: the abandoned PUT is still held at the proxy and lands
    when it resumes, possibly after a new write to the same key; the process that got the error exits, so in
    clipjob nothing writes after it.)"""
    from s3proxy import S3Proxy

    monkeypatch.setattr(fs, "_waits", fs._Waits())
    fs.configure(3, "storage.stall_timeout_s")
    proxy = S3Proxy(s3_server.port).start()
    url = f"{s3_bucket}/run/checkpoints/step-00000004/model.safetensors"
    try:
        apply_env({**s3_server.env(), "AWS_ENDPOINT_URL_S3": proxy.endpoint})
        proxy.pause("hold")
        t0 = time.monotonic()
        with pytest.raises(RetryableError) as e:
            fs.write_bytes(url, os.urandom(256 << 10))
        took = time.monotonic() - t0
        proxy.resume()
        fs.write_bytes(url + ".after", b"after")
    finally:
        proxy.close()
        apply_env(s3_server.env())
    assert one_line(e.value).startswith(f"{url}: storage did not answer for 3 s"), one_line(e.value)
    assert 3 <= took < 3 + 0.25 + 0.5, took  # the bound, polled every 0.25 s
    assert fs.read_bytes(url + ".after") == b"after"


def test_should_let_a_large_upload_run_past_the_bound_at_the_floor_rate(monkeypatch):
    """The per-attempt cut-off grows with the bytes sent (UPLOAD_FLOOR_BPS), so a slow but moving upload of a
    big checkpoint is not mistaken for an outage; a call past that allowance is cut off."""
    monkeypatch.setattr(fs, "_waits", fs._Waits())
    monkeypatch.setattr(fs, "UPLOAD_FLOOR_BPS", 1 << 20)
    assert fs.retry(lambda: time.sleep(0.8) or "done", "s3://b/k", stall_s=0.3, nbytes=2 << 20) == "done"
    t0 = time.monotonic()
    with pytest.raises(RetryableError):
        fs.retry(lambda: time.sleep(30), "s3://b/k", stall_s=0.3, nbytes=1 << 20)
    assert 1.0 <= time.monotonic() - t0 < 1.0 + 0.6


def test_should_stream_objects_in_block_sized_range_requests_when_reading_a_shard(s3_server, s3_bucket):
    """fsspec.open(block_size=4MB) is a filesystem option that s3fs ignores: it fetched 50 MiB per GET. The
    stream asks for exactly one block per GET, one block ahead (counted at a proxy in front of the server)."""
    from s3proxy import S3Proxy

    data = os.urandom(1 << 20) * 10  # 10 MiB
    url = f"{s3_bucket}/big.tar"
    fs.write_bytes(url, data)
    proxy = S3Proxy(s3_server.port).start()
    try:
        apply_env({**s3_server.env(), "AWS_ENDPOINT_URL_S3": proxy.endpoint})
        with fs.open_stream(url, block_size=1 << 20) as f:
            got = b"".join(iter(lambda: f.read(10_000), b""))
    finally:
        proxy.close()
        apply_env(s3_server.env())
    assert got == data
    ranges = [r for _, _, r in proxy.gets()]
    assert ranges == [f"bytes={i << 20}-{((i + 1) << 20) - 1}" for i in range(10)], ranges
    assert proxy.bytes_down < len(data) + 64 * 1024  # every byte once (+ headers)
