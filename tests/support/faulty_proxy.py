"""A reverse proxy in front of an S3 server that misbehaves on a fixed schedule (tests only).

Every request (method, path, query, headers incl. ``Range``, body) is forwarded to ``target``;
the requests whose method is in ``methods`` (GET by default) are numbered 1, 2, 3, ... in arrival
order, and request number ``n`` is:

- dropped (the connection closed, no response)          if ``every_drop`` and n % every_drop == 0, else
- answered ``503`` with S3's ``SlowDown`` XML body       if ``every_503`` and n % every_503 == 0, else
- forwarded, then
  - held ``delay_s`` seconds before its response starts  if ``delay_every`` and n % delay_every == 0,
  - cut after half its body (the ``Content-Length`` still announcing all of it, then the
    connection closed)                                    if ``every_truncate`` and n % every_truncate == 0.

Usage (point a client at it with ``AWS_ENDPOINT_URL=proxy.url``)::

    with FaultyProxy(target=endpoint, every_503=3, every_drop=5, delay_every=7, delay_s=0.2) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...
    proxy.counts  # {"requests", "forwarded", "slowdown", "dropped", "delayed", "truncated"}

Stdlib only (``http.server`` + ``http.client``), one thread per client connection, HTTP/1.1
keep-alive, bound to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message>"
                 b"<RequestId>faulty-proxy</RequestId><HostId>faulty-proxy</HostId></Error>")

# hop-by-hop headers (RFC 9110 7.6.1) are not forwarded; the proxy sets its own framing
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "content-length"}


class FaultyProxy:
    """See the module docstring. ``counts`` may be read at any time (a snapshot copy)."""

    def __init__(self, target: str, *, every_503: int = 0, every_drop: int = 0, delay_every: int = 0,
                 delay_s: float = 0.0, every_truncate: int = 0, methods: tuple[str, ...] = ("GET",)):
        u = urllib.parse.urlsplit(target)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"target must be http://host:port, got {target!r}")
        self.target = (u.hostname, u.port or 80)
        self.every_503, self.every_drop, self.every_truncate = every_503, every_drop, every_truncate
        self.delay_every, self.delay_s = delay_every, delay_s
        self.methods = {m.upper() for m in methods}
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("requests", "forwarded", "slowdown", "dropped", "delayed", "truncated"), 0)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FaultyProxy:
        proxy = self

        class Handler(_Handler):
            pass

        Handler.proxy = proxy
        server = _Server(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False  # keep-alive connections may idle in their threads: never join them
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="faulty-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    # ---- schedule ----------------------------------------------------------------------------
    def _decide(self, method: str) -> tuple[str, bool, bool]:
        """(action, delay, truncate) for the next request; action is forward|drop|slowdown."""
        with self._lock:
            if method.upper() not in self.methods:
                self._counts["forwarded"] += 1
                return "forward", False, False
            self._counts["requests"] += 1
            n = self._counts["requests"]
            if self.every_drop and n % self.every_drop == 0:
                self._counts["dropped"] += 1
                return "drop", False, False
            if self.every_503 and n % self.every_503 == 0:
                self._counts["slowdown"] += 1
                return "slowdown", False, False
            self._counts["forwarded"] += 1
            delay = bool(self.delay_every and n % self.delay_every == 0)
            truncate = bool(self.every_truncate and n % self.every_truncate == 0)
            self._counts["delayed"] += delay
            self._counts["truncated"] += truncate
            return "forward", delay, truncate


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up (timeout): expected
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultyProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._read_body()
        action, delay, truncate = self.proxy._decide(self.command)
        if action == "drop":
            self.close_connection = True
            return  # nothing written: the client sees the connection closed
        if action == "slowdown":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
            self.end_headers()
            self.wfile.write(SLOWDOWN_BODY)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.proxy.target, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            resp_headers = resp.getheaders()
            status, reason = resp.status, resp.reason
        finally:
            conn.close()
        if delay:
            time.sleep(self.proxy.delay_s)
        self.send_response(status, reason)
        length = None
        for k, v in resp_headers:
            if k.lower() == "content-length":
                length = v
            elif k.lower() not in _HOP and k.lower() not in ("server", "date"):  # send_response wrote ours
                self.send_header(k, v)
        if self.command == "HEAD":
            self.send_header("Content-Length", length if length is not None else "0")
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if truncate and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle
