"""The HTTP layer of ``nijimi serve``: Python's own ``ThreadingHTTPServer`` (one thread per connection), the JSON
endpoints of :data:`~nijimi.server.app.ROUTES`, server-sent events and files of the mounted folders.

Why the standard library: the server's work is one generation at a time in one worker thread; what HTTP must do is
small (JSON in and out, a long-lived event stream, static files), and ``http.server`` does it with no dependency to
pin, audit or break. Threads keep slow clients (a long ``txt2img`` wait, an event stream) from holding up others.

Every request is checked before any work: the Host header must name this machine when the server listens on a
loopback address (so a web page cannot reach it by DNS rebinding), an ``Origin`` must be the server's own (so another
site's page cannot post to it), a body must fit ``Limits.body`` (413 before it is read) and be JSON (415 for another
content type, 400 when malformed). Every failure is a JSON ``{"error", "detail"}`` with a 4xx status (5xx for a
server fault, whose traceback goes to the log only), and no request can stop the server.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import mimetypes
import queue
import socket
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from nijimi.errors import NijimiError
from nijimi.server.app import ROUTES, ApiRequest, Studio
from nijimi.server.errors import ApiError
from nijimi.server.folders import served_file

EVENTS = "/nijimi/v1/events"
"""Server-sent events: ``queued``/``started``/``progress``/``done``/``failed``/``interrupted`` of every job as JSON
(``?job=ID`` only that job's, ``?preview=1`` adds the ``current_image`` base64 PNG to progress events)."""
KEEPALIVE = 15.0
"""Seconds between comment lines on an idle event stream (so proxies and clients see it alive)."""
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
log = logging.getLogger("nijimi.server")


def _hostname(host: str) -> str:
    """``"[::1]:7860"`` → ``"::1"``, ``"localhost:7860"`` → ``"localhost"``."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address to listen on) is this machine only."""
    try:
        return host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    """One HTTP request (HTTP/1.0: one request per connection)."""

    server: StudioServer
    timeout = 60  # seconds a socket read or write may stall
    server_version = "nijimi"

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        try:
            url = urlsplit(self.path)
            query = dict(parse_qsl(url.query))
            self._check_origin()
            route = ROUTES.get((method, url.path))
            if route is not None:
                body = self._body() if method == "POST" else None
                return self._json(200, route(self.server.studio, ApiRequest(body, query)))
            if method == "GET" and url.path == EVENTS:
                return self._events(query)
            allowed = any(path == url.path for _, path in ROUTES)
            if method == "GET" and not allowed and self._mounted(url.path):
                return
            raise ApiError(405 if allowed else 404, "Method Not Allowed" if allowed else "Not Found",
                           f"{method} {url.path} is not an endpoint of this server")
        except ApiError as exc:
            self._json(exc.status, {"error": exc.error, "detail": str(exc)})
        except NijimiError as exc:
            self._json(422, {"error": type(exc).__name__, "detail": str(exc)})
        except OSError:  # the client went away
            self.close_connection = True
        except Exception as exc:  # a bug: answer without a traceback, log it, keep serving
            log.exception("%s %s failed", method, self.path)
            self._json(500, {"error": "InternalError", "detail": f"{type(exc).__name__}: {exc}"})

    def _mounted(self, path: str) -> bool:
        """Serve the file ``path`` names in the mount of its longest prefix (``/`` itself: the page's index.html);
        False when no mount holds it and the page mount at ``/`` has no such file (the caller answers 404)."""
        mounts = self.server.studio.mounts
        mount = max((p for p in mounts if path.startswith(p)), key=len, default=None)
        if mount is None:
            return False
        try:
            file = served_file(mounts[mount], unquote(path[len(mount):]) or ("index.html" if mount == "/" else ""))
        except ApiError as exc:
            if mount == "/" and exc.status == 404:
                return False
            raise
        self._file(file)
        return True

    def _check_origin(self) -> None:
        host = self.headers.get("Host")
        if host and self.server.loopback and _hostname(host) not in LOOPBACK_NAMES:
            raise ApiError(403, "Forbidden", f"Host {host!r} is not this machine; the server answers localhost only")
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != host:
            raise ApiError(403, "Forbidden", f"requests from pages of {origin!r} are refused (cross-origin)")

    def _body(self) -> Any:
        """The JSON body (None when empty); 411/413/415/400 ApiErrors before or instead of reading it."""
        kind = self.headers.get_content_type() if self.headers.get("Content-Type") else "application/json"
        if kind not in ("application/json", "text/json") and not kind.endswith("+json"):
            raise ApiError(415, "Unsupported Media Type", f"the body must be JSON (application/json), not {kind}")
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "Length Required", "send the body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "Bad Request", "Content-Length is not a number") from None
        limit = self.server.studio.limits.body
        if length > limit or length < 0:
            raise ApiError(413, "Payload Too Large", f"the body is {length} bytes; this server takes {limit} at most")
        raw = self.rfile.read(length)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "JSONDecodeError", f"the body is not valid JSON: {exc}") from None

    def _json(self, status: int, value: Any) -> None:
        data = json.dumps(value, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return
        if status in (411, 413):  # the body was not read: take what the client already sent before closing, so
            self._discard_input()  # the close does not reset the connection before it reads this answer

    def _discard_input(self, limit: int = 4 << 20, wait: float = 0.5) -> None:
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(wait)
            while limit > 0 and (chunk := self.connection.recv(65536)):
                limit -= len(chunk)
        except OSError:
            pass

    def _file(self, path) -> None:
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)

    def _events(self, query: dict[str, str]) -> None:
        """Stream job events until the client leaves or the server stops."""
        studio, only, previews = self.server.studio, query.get("job"), query.get("preview") in ("1", "true")
        events = studio.hub.subscribe()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            while True:
                try:
                    event = events.get(timeout=KEEPALIVE)
                except queue.Empty:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    continue
                if event is None:
                    return
                if only and event["job"] != only:
                    continue
                if previews and event["type"] == "progress":
                    event = {**event, "current_image": studio.preview(event["job"])}
                self.wfile.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
        finally:
            studio.hub.unsubscribe(events)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, an unknown method) as JSON too."""
        self.close_connection = True
        self._json(code, {"error": HTTPStatus(code).phrase, "detail": message or HTTPStatus(code).description})

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class StudioServer(ThreadingHTTPServer):
    """A threading HTTP server around a :class:`Studio` at ``host``:``port`` (0: a free port, see
    ``server_address``); ``loopback`` is whether it listens on this machine only."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, studio: Studio, host: str = "127.0.0.1", port: int = 7860) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.studio = studio
        self.loopback = is_loopback(host)
        super().__init__((host, port), Handler)

    def handle_error(self, request, client_address) -> None:
        log.exception("connection from %s failed", client_address)
