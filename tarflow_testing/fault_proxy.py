"""A fault-injecting HTTP/1.1 reverse proxy for S3 tests: put it in front of the moto server, point
AWS_ENDPOINT_URL at it, and tell it which requests to fail, drop (unsent or unanswered), corrupt, truncate or delay.

    with FaultProxy(s3_server) as proxy:          # starts it and points AWS_ENDPOINT_URL at it (restored on exit)
        proxy.fail_next(2, status=503, method="PUT")
        store.put_bytes("k", b"...")              # retried: succeeds
        assert proxy.faults == 2

Transparent otherwise: method, request target, headers (Host included, so a SigV4 signature stays valid) and body
bytes are forwarded unchanged; a chunked request body (``Transfer-Encoding: chunked``, as used with ``aws-chunked``
checksum trailers) is forwarded raw, byte for byte. Both sides keep their connections alive.

A rule matches on the method and a substring of the request target (path and query, e.g. ``"partNumber="`` for
UploadPart); the first rule that matches and has uses left fires. Every request is recorded in ``proxy.seen``,
and when its handling began and ended in ``proxy.exchanges``: ``in_flight_over(t0, t1, ...)`` says which requests
were being handled all through a moment (e.g. a client's SIGKILL), ``wait_idle()`` waits until none is.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Connection-scoped headers: each hop sets its own. (Expect: 100-continue is answered here, by BaseHTTPRequestHandler.)
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
               "trailer", "upgrade", "expect"}

_DEFAULT_CODES = {400: "BadRequest", 403: "AccessDenied", 404: "NoSuchKey", 409: "ConditionalRequestConflict",
                  412: "PreconditionFailed", 429: "SlowDown", 500: "InternalError", 502: "BadGateway",
                  503: "SlowDown", 504: "GatewayTimeout"}


@dataclass
class Rule:
    kind: str                 # "fail" | "drop" | "lose" | "corrupt" | "truncate" | "delay"
    remaining: int | None     # uses left; None: forever
    method: str | None = None
    path_contains: str | None = None
    status: int = 503
    code: str | None = None
    after_bytes: int = 0
    seconds: float = 0.0

    def matches(self, method: str, target: str) -> bool:
        return ((self.remaining is None or self.remaining > 0)
                and (self.method is None or self.method.upper() == method)
                and (self.path_contains is None or self.path_contains in target))


@dataclass
class Exchange:
    """One request's handling by the proxy, on ``time.monotonic()``'s clock (``ended``: None while in flight). A
    request whose client died goes on to its end here: it was sent, so it still takes effect upstream."""
    method: str
    target: str
    started: float
    ended: float | None = None


@dataclass(frozen=True)
class Seen:
    method: str
    target: str               # path and query as the client sent them
    fault: str | None         # the kind of fault injected, or None


class _QuietServer(ThreadingHTTPServer):
    """A client that goes away mid-request (a killed training process) is normal here, not an error to print."""

    def handle_error(self, request, client_address) -> None:
        import sys
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FaultProxy:
    def __init__(self, upstream: str):
        url = urlsplit(upstream)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"FaultProxy forwards to a plain http:// endpoint, not {upstream!r}")
        self.upstream = (url.hostname, url.port or 80)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._seen: list[Seen] = []
        self._exchanges: list[Exchange] = []
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._saved_env: dict[str, str | None] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        server = _QuietServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.proxy = self  # type: ignore[attr-defined]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                         name="fault-proxy").start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        # Wake handler threads blocked on idle keep-alive connections.
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "proxy not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self.start()
        # Clients made from now on go through the proxy (data_pipeline and the stores cache clients per endpoint).
        for name in ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL"):
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = self.url
        return self

    def __exit__(self, *exc) -> None:
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}
        self.stop()

    # -- the fault plan ----------------------------------------------------------------------------------------------

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def fail_next(self, n: int = 1, status: int = 503, *, code: str | None = None, method: str | None = None,
                  path_contains: str | None = None) -> Rule:
        """Answer the next ``n`` matching requests with ``status`` and an S3 error body (``code`` defaults to the
        usual S3 code for the status), without forwarding them."""
        return self._add(Rule("fail", n, method, path_contains, status=status, code=code))

    def fail_always(self, status: int = 500, *, code: str | None = None, method: str | None = None,
                    path_contains: str | None = None) -> Rule:
        return self._add(Rule("fail", None, method, path_contains, status=status, code=code))

    def drop_next(self, n: int = 1, *, method: str | None = None, path_contains: str | None = None,
                  after_bytes: int = 0) -> Rule:
        """Close the connection without a response after reading ``after_bytes`` of the request body (0: none;
        a large value: all of it, i.e. the request was sent but its answer is lost). Not forwarded."""
        return self._add(Rule("drop", n, method, path_contains, after_bytes=after_bytes))

    def lose_response_next(self, n: int = 1, *, method: str | None = None, path_contains: str | None = None) -> Rule:
        """Forward the request (it takes effect upstream), then close the connection without the answer: the
        client cannot know whether it happened."""
        return self._add(Rule("lose", n, method, path_contains))

    def corrupt_next(self, n: int = 1, *, method: str | None = "GET", path_contains: str | None = None) -> Rule:
        """Forward, then flip one byte in the middle of the (non-empty) response body."""
        return self._add(Rule("corrupt", n, method, path_contains))

    def truncate_next(self, n: int = 1, *, method: str | None = "GET", path_contains: str | None = None) -> Rule:
        """Forward, then send the full headers but only half of the body and close the connection."""
        return self._add(Rule("truncate", n, method, path_contains))

    def delay_next(self, n: int = 1, seconds: float = 1.0, *, method: str | None = None,
                   path_contains: str | None = None) -> Rule:
        """Wait ``seconds`` before forwarding (for read timeouts)."""
        return self._add(Rule("delay", n, method, path_contains, seconds=seconds))

    def remove(self, rule: Rule) -> None:
        """Forget one rule (as returned by ``fail_next``, ``delay_next``, …); the others stay."""
        with self._lock:
            self._rules = [r for r in self._rules if r is not rule]

    def clear(self) -> None:
        """Forget all rules (the record of requests stays)."""
        with self._lock:
            self._rules.clear()

    def _take(self, method: str, target: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, target):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    return rule
        return None

    def _record(self, method: str, target: str, fault: str | None) -> None:
        with self._lock:
            self._seen.append(Seen(method, target, fault))

    def _begin(self, method: str, target: str) -> Exchange:
        exchange = Exchange(method, target, time.monotonic())
        with self._lock:
            self._exchanges.append(exchange)
        return exchange

    def _end(self, exchange: Exchange) -> None:
        with self._lock:
            exchange.ended = time.monotonic()

    # -- timing ------------------------------------------------------------------------------------------------------

    @property
    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return [Exchange(e.method, e.target, e.started, e.ended) for e in self._exchanges]

    def in_flight_over(self, t0: float, t1: float, method: str | None = None,
                       path_contains: str | None = None) -> list[Exchange]:
        """Matching requests that were being handled from ``t0`` to ``t1`` (``time.monotonic()``), throughout: begun
        by ``t0`` and not ended before ``t1``. With ``t0 == t1``: in flight at that moment."""
        with self._lock:
            return [Exchange(e.method, e.target, e.started, e.ended) for e in self._exchanges
                    if e.started <= t0 and (e.ended is None or e.ended >= t1)
                    and (method is None or e.method == method.upper())
                    and (path_contains is None or path_contains in e.target)]

    def in_flight(self, method: str | None = None, path_contains: str | None = None) -> list[Exchange]:
        now = time.monotonic()
        return self.in_flight_over(now, now, method, path_contains)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until no request is being handled (e.g. the delayed ones of a client that was killed: they still
        reach the upstream, so the store's state is settled only after them)."""
        deadline = time.monotonic() + timeout
        while self.in_flight():
            if time.monotonic() > deadline:
                raise TimeoutError(f"requests still in flight after {timeout} s: {self.in_flight()}")
            time.sleep(0.01)

    # -- counters ----------------------------------------------------------------------------------------------------

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    @property
    def requests(self) -> int:
        return len(self.seen)

    @property
    def faults(self) -> int:
        return sum(1 for s in self.seen if s.fault)

    def count(self, method: str | None = None, path_contains: str | None = None, fault: str | None = None) -> int:
        """Requests seen that match; ``fault="any"`` counts only those that got a fault."""
        return sum(1 for s in self.seen
                   if (method is None or s.method == method.upper())
                   and (path_contains is None or path_contains in s.target)
                   and (fault is None or (s.fault is not None if fault == "any" else s.fault == fault)))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive with the client
    timeout = 120                  # an idle client connection is closed after this
    server: ThreadingHTTPServer

    def setup(self) -> None:
        super().setup()
        self.proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        self._upstream: http.client.HTTPConnection | None = None
        with self.proxy._lock:
            self.proxy._conns.add(self.connection)

    def finish(self) -> None:
        with self.proxy._lock:
            self.proxy._conns.discard(self.connection)
        if self._upstream is not None:
            self._upstream.close()
        try:
            super().finish()
        except OSError:  # the client went away first
            pass

    def log_message(self, format: str, *args) -> None:  # quiet: pytest shows failures, not every request
        pass

    def do_GET(self) -> None:
        exchange = self.proxy._begin(self.command, self.path)
        try:
            self._handle()
        finally:
            self.proxy._end(exchange)

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # -- request body ------------------------------------------------------------------------------------------------

    def _read_body(self, limit: int | None = None) -> bytes:
        """The raw request body (chunked framing included), or its first ``limit`` bytes."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if limit is None else min(length, limit))

    def _read_chunked(self, limit: int | None) -> bytes:
        raw = bytearray()
        while limit is None or len(raw) < limit:
            line = self.rfile.readline(65537)
            raw += line
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:  # last chunk, then trailers up to an empty line
                while (trailer := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                    raw += trailer
                raw += trailer
                break
            raw += self.rfile.read(size + 2)  # data and its CRLF
        return bytes(raw)

    # -- forwarding --------------------------------------------------------------------------------------------------

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        for attempt in (1, 2):
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=120)
            conn = self._upstream
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        conn.putheader(name, value)
                conn.endheaders(body if body else None)
                response = conn.getresponse()
                payload = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The upstream closed an idle keep-alive connection: once more on a fresh one.
                conn.close()
                self._upstream = None
                if attempt == 2:
                    raise
                continue
            if response.will_close:
                conn.close()
                self._upstream = None
            return response.status, response.reason, response.getheaders(), payload
        raise AssertionError("unreachable")

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes,
              truncate: bool = False) -> None:
        self.send_response_only(status, reason)
        no_body = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        for name, value in headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower == "transfer-encoding":
                continue
            # A HEAD (or 204) keeps the upstream's Content-Length: it describes the object, not this body.
            if lower == "content-length" and not no_body:
                continue
            self.send_header(name, value)
        if not no_body:
            self.send_header("Content-Length", str(len(payload)))
        if truncate:
            self.close_connection = True
        self.end_headers()
        if not no_body:
            self.wfile.write(payload[: len(payload) // 2] if truncate else payload)
        self.wfile.flush()

    def _send_error(self, rule: Rule) -> None:
        code = rule.code or _DEFAULT_CODES.get(rule.status, "InjectedFault")
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>injected by '
                f'FaultProxy</Message><RequestId>fault-proxy</RequestId></Error>').encode()
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", "fault-proxy")]
        if self.command == "HEAD":
            headers.append(("Content-Length", "0"))
        self._send(rule.status, http.client.responses.get(rule.status, "Injected"), headers, body)

    def _handle(self) -> None:
        proxy = self.proxy
        rule = proxy._take(self.command, self.path)
        kind = rule.kind if rule else None
        proxy._record(self.command, self.path, kind)
        if rule is not None and rule.kind == "drop":
            self._read_body(limit=rule.after_bytes)
            self.close_connection = True  # no response at all; unread body bytes make the close a reset
            return
        body = self._read_body()  # always read it all, or its bytes would be parsed as the next request
        if rule is not None and rule.kind == "fail":
            self._send_error(rule)
            return
        if rule is not None and rule.kind == "delay":
            time.sleep(rule.seconds)
        try:
            status, reason, headers, payload = self._forward(body)
        except (OSError, http.client.HTTPException) as e:
            self._send(502, "Bad Gateway", [("Content-Type", "text/plain")], f"fault proxy: upstream: {e}".encode())
            return
        if rule is not None and rule.kind == "lose":
            self.close_connection = True
            return
        if rule is not None and rule.kind == "corrupt" and payload:
            middle = len(payload) // 2
            payload = payload[:middle] + bytes([payload[middle] ^ 0xFF]) + payload[middle + 1:]
        self._send(status, reason, headers, payload, truncate=rule is not None and rule.kind == "truncate")
