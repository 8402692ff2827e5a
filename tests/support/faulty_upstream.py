"""A stub vLLM on 127.0.0.1 that misbehaves on purpose, over a real socket.

The request's ``model`` picks the behaviour, so one server serves a whole test:

* ``ok`` -- a JSON answer (or, with ``"stream": true``, three SSE events and ``[DONE]``);
* ``stall-before-headers`` -- says nothing for ``stall`` seconds, then closes;
* ``drop-after-headers`` -- sends the headers of a JSON answer, then closes;
* ``stall-after-headers`` -- sends the headers of a JSON answer, then says nothing;
* ``abort-mid-stream`` -- two SSE events and half of a third, then closes;
* ``stall-mid-stream`` -- two SSE events, then says nothing for ``stall`` seconds;
* ``gzip`` -- a gzipped answer (JSON, or SSE when streamed) whatever the client accepts;
* ``slow-stream`` -- an SSE event every 50 ms for ``stall`` seconds; when the client closes the
  connection first, the time it was seen is appended to ``left``.

``GET /v1/models`` lists one model, ``ok``. With ``listen_after``, the port is bound at once but
refuses connections for that many seconds (a server that is not up yet).

Every request's headers and JSON body are recorded. Each handler ends by itself within
``stall`` seconds; ``close`` stops the server.
"""

from __future__ import annotations

import gzip
import json
import socket
import socketserver
import threading
import time
from typing import Any

__all__ = ["FaultyUpstream"]


def _events(n: int) -> bytes:
    return b"".join(
        b"data: " + json.dumps({"choices": [{"text": f"t{i}"}]}).encode() + b"\n\n"
        for i in range(n)
    )


class FaultyUpstream:
    def __init__(self, stall: float = 3.0, listen_after: float = 0.0) -> None:
        self.stall = stall
        self.seen: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.left: list[float] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                outer._handle(self.rfile, self.connection)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()  # the port is ours; connecting is refused until listen()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

        def serve() -> None:
            time.sleep(listen_after)
            self.server.server_activate()
            self.server.serve_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultyUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one request ---------------------------------------------------------------------------
    def _handle(self, rfile: Any, conn: socket.socket) -> None:
        request_line = rfile.readline()
        if not request_line:
            return
        headers: dict[str, str] = {}
        while (line := rfile.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        raw = rfile.read(int(headers.get("content-length", "0")))
        if request_line.split()[1] == b"/v1/models":
            listing = json.dumps({"object": "list", "data": [{"id": "ok"}]}).encode()
            conn.sendall(_head(200, "application/json", length=len(listing)) + listing)
            conn.shutdown(socket.SHUT_RDWR)
            return
        body = json.loads(raw) if raw else {}
        self.seen.append((headers, body))
        mode, stream = body.get("model", "ok"), bool(body.get("stream"))
        sse, js = "text/event-stream", "application/json"
        if mode == "stall-before-headers":
            time.sleep(self.stall)
        elif mode == "drop-after-headers":
            conn.sendall(_head(200, js, length=100))
        elif mode == "stall-after-headers":
            conn.sendall(_head(200, js, length=100) + b'{"choices": [')
            time.sleep(self.stall)
        elif mode == "abort-mid-stream":
            conn.sendall(_head(200, sse) + _chunk(_events(2) + b'data: {"choices": [{"te'))
        elif mode == "stall-mid-stream":
            conn.sendall(_head(200, sse) + _chunk(_events(2)))
            time.sleep(self.stall)
        elif mode == "slow-stream":
            self._slow_stream(conn)
            return
        elif mode == "gzip":
            payload = _events(3) + b"data: [DONE]\n\n" if stream else json.dumps({"ok": 1}).encode()
            packed = gzip.compress(payload)
            conn.sendall(
                _head(
                    200, sse if stream else js, length=len(packed), extra="Content-Encoding: gzip"
                )
                + packed
            )
        elif stream:
            conn.sendall(_head(200, sse) + _chunk(_events(3) + b"data: [DONE]\n\n") + _chunk(b""))
        else:
            payload = json.dumps({"choices": [{"text": "ok"}], "echo": body}).encode()
            conn.sendall(_head(200, js, length=len(payload)) + payload)
        conn.shutdown(socket.SHUT_RDWR)

    def _slow_stream(self, conn: socket.socket) -> None:
        t_end = time.monotonic() + self.stall
        try:
            conn.sendall(_head(200, "text/event-stream"))
            while time.monotonic() < t_end:
                conn.sendall(_chunk(_events(1)))
                time.sleep(0.05)
            conn.sendall(_chunk(b"data: [DONE]\n\n") + _chunk(b""))
        except OSError:  # the client closed its end: writes fail from the second one on
            self.left.append(time.monotonic())


def _head(status: int, content_type: str, length: int | None = None, extra: str = "") -> bytes:
    lines = [f"HTTP/1.1 {status} OK", f"Content-Type: {content_type}", "Connection: close"]
    lines.append(
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    )
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"
