"""A pausable TCP proxy in front of the loopback S3 server: storage outages on demand, and a count of what
went over the wire.

    proxy = S3Proxy(server.port).start()     # clients use proxy.endpoint
    proxy.pause("hold")                      # accept, forward nothing: requests hang until their timeouts
    proxy.pause("refuse")                    # drop open connections, refuse new ones: connection errors
    proxy.resume()

`requests` lists (method, path, range header) of every HTTP request seen; `bytes_down` counts the bytes the
server sent back. Runs in threads of the test process, or as `python tests/s3proxy.py TARGET_PORT` in a child
process that takes `pause hold|refuse` / `resume` lines on stdin and prints its port.
"""

from __future__ import annotations

import re
import socket
import sys
import threading

from s3server import free_port

_REQUEST = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]\r\n")


class S3Proxy:
    def __init__(self, target_port: int, port: int | None = None):
        self.target, self.port = target_port, port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.mode = "open"  # open | hold | refuse
        self.flowing = threading.Event()
        self.flowing.set()
        self.requests: list[tuple[str, str, str]] = []
        self.bytes_down = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._srv: socket.socket | None = None

    def start(self) -> S3Proxy:
        self._srv = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def pause(self, mode: str = "hold") -> None:
        assert mode in ("hold", "refuse"), mode
        self.mode = mode
        self.flowing.clear()
        if mode == "refuse":
            with self._lock:
                conns, self._conns = list(self._conns), set()
            for c in conns:
                _abort(c)

    def resume(self) -> None:
        self.mode = "open"
        self.flowing.set()

    def close(self) -> None:
        if self._srv is not None:
            self._srv.close()
        self.resume()

    def gets(self) -> list[tuple[str, str, str]]:
        return [r for r in self.requests if r[0] == "GET"]

    def _accept(self) -> None:
        assert self._srv is not None
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            if self.mode == "refuse":
                _abort(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self.flowing.wait()  # held: the connection is accepted and nothing answers
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            _abort(client)
            return
        with self._lock:
            self._conns.update((client, upstream))
        threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
        self._pump(upstream, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        pending, skip = b"", 0  # an unfinished request header; body bytes still to pass unread
        try:
            while data := src.recv(65536):
                self.flowing.wait()
                if self.mode == "refuse":
                    break
                if upward:
                    pending, skip = self._note_requests(pending + data[skip:], max(0, skip - len(data)))
                else:
                    self.bytes_down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _abort(s)

    def _note_requests(self, buf: bytes, skip: int) -> tuple[bytes, int]:
        """Record the request lines in the client's bytes: (unfinished header, body bytes still to skip)."""
        while buf and not skip:
            head_end = buf.find(b"\r\n\r\n")
            m = _REQUEST.match(buf)
            if not m or head_end < 0:
                return (buf if m or len(buf) < 64 else b""), 0
            head = buf[:head_end].decode("latin-1")
            rng = re.search(r"(?im)^range:\s*(\S+)", head)
            length = re.search(r"(?im)^content-length:\s*(\d+)", head)
            self.requests.append((m[1].decode(), m[2].decode(), rng[1] if rng else ""))
            end = head_end + 4 + (int(length[1]) if length else 0)
            skip, buf = max(0, end - len(buf)), buf[end:]
        return b"", skip


def _abort(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        s.close()
    except OSError:
        pass


if __name__ == "__main__":
    proxy = S3Proxy(int(sys.argv[1])).start()
    print(proxy.port, flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["pause"]:
            proxy.pause(cmd[1] if len(cmd) > 1 else "hold")
        elif cmd[:1] == ["resume"]:
            proxy.resume()
        print("ok", flush=True)
