"""clipjob.data.tarstream against the standard library's tarfile, on archives tarfile writes."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from clipjob.data.tarstream import NotATar, tar_members


def _tar(members: list[tuple[str, bytes]], fmt=tarfile.GNU_FORMAT, dirs: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if dirs:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [("000001.jpg", b"\xff\xd8" + bytes(range(256)) * 7), ("000001.txt", b"a cat"),
           ("000002.jpg", b""), ("000002.txt", "un caf\u00e9 \u2615".encode()),
           ("d/" + "x" * 150 + "/000003.seg.jpg", b"long name" * 100),  # > 100 chars: ustar prefix / GNU L / pax
           ("000004.json", b"{}" * 300)]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_should_read_what_tarfile_reads_when_given_each_tar_format(fmt):
    raw = _tar(MEMBERS, fmt, dirs=True)
    want = [(i.name, t.extractfile(i).read()) for t in [tarfile.open(fileobj=io.BytesIO(raw))] for i in t if i.isreg()]
    assert list(tar_members(io.BytesIO(raw))) == want == MEMBERS


def test_should_read_gzip_compressed_shards_through_tarfile():
    assert list(tar_members(io.BytesIO(gzip.compress(_tar(MEMBERS))))) == MEMBERS


def test_should_read_a_stream_that_returns_short_reads():
    class Trickle(io.RawIOBase):  # at most 100 bytes per read, like a slow network stream
        def __init__(self, data):
            self.data = data

        def readable(self):
            return True

        def read(self, n=-1):
            out, self.data = self.data[:min(n, 100)], self.data[min(n, 100):]
            return out

    assert list(tar_members(Trickle(_tar(MEMBERS)))) == MEMBERS


def _offsets(raw: bytes) -> list[tarfile.TarInfo]:
    return [i for i in tarfile.open(fileobj=io.BytesIO(raw)) if i.isreg()]


@pytest.mark.parametrize("where", ["empty", "in a header", "in the data"])
def test_should_raise_read_errors_when_the_shard_is_empty_or_cut_off(where):
    raw = _tar(MEMBERS)
    second = _offsets(raw)[1]
    cut = {"empty": 0, "in a header": second.offset + 100, "in the data": second.offset_data + 2}[where]
    got = []
    with pytest.raises(tarfile.ReadError, match="empty file" if cut == 0 else "unexpected end of data"):
        for m in tar_members(io.BytesIO(raw[:cut])):
            got.append(m)
    assert got == MEMBERS[:1] * (cut > 0)  # what came before the cut was delivered


def test_should_refuse_a_damaged_header():
    raw = bytearray(_tar(MEMBERS))
    raw[_offsets(bytes(raw))[1].offset + 10] ^= 0xFF  # the second member's name
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        list(tar_members(io.BytesIO(bytes(raw))))


@pytest.mark.parametrize("what", ["html page", "random bytes", "short text", "gzip of text", "bad first checksum"])
def test_should_say_not_a_tar_when_the_first_header_is_not_a_tar_header(what):
    raw = {"html page": b"<html><body>503 Service Unavailable</body></html>\n" * 40,
           "random bytes": bytes((i * 7919 + 13) % 256 for i in range(4096)),
           "short text": b"hello\n",
           "gzip of text": gzip.compress(b"name,caption\n" * 200),
           "bad first checksum": bytes([_tar(MEMBERS)[0] ^ 0xFF]) + _tar(MEMBERS)[1:]}[what]
    with pytest.raises(NotATar, match="^not a tar file"):
        list(tar_members(io.BytesIO(raw)))


def test_should_read_an_empty_archive_as_no_members():
    assert list(tar_members(io.BytesIO(_tar([])))) == []
    assert list(tar_members(io.BytesIO(gzip.compress(_tar([]))))) == []
