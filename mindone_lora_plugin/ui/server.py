"""The UI's HTTP server: one static page and a JSON API, on Starlette served by uvicorn (see docs/ui.md, "Server").
(Just over 400 lines: the gate and the routes it guards are read together.)

The framework does the HTTP work (framing, header encoding, streaming, timeouts, connection limits); this module adds
the gate every request passes (:class:`Gate`) and the routes. The gate, in order:

* **Host**: bound to loopback, a request naming another host is refused (DNS rebinding);
* **--auth**: with ``user:password`` every request needs it as HTTP Basic; a wrong one is answered after a delay that
  doubles with each failure from that address;
* **session token**: a random token made at start and printed in the URL (as Jupyter does). Opening ``/?token=T``
  sets a cookie and redirects to ``/``; every other request needs the cookie or the ``X-UI-Token`` header, and every
  state-changing request (a POST) needs the header, which the page reads from itself and which no other page can
  send without a CORS preflight this server never grants;
* **Origin / Sec-Fetch-Site**: a request another origin sends (another port of 127.0.0.1 included) is refused, a
  top-level navigation excepted; a POST must also be ``application/json``.

A refused request is answered with ``Connection: close``, so nothing sent after it on that connection is read, and
every response carries ``frame-ancestors 'none'``, ``nosniff``, ``no-store`` and a same-origin resource policy.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import os
import secrets
import socket
import threading
import time
from urllib.parse import parse_qs, quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.ui import LOOPBACK, bodies, files, form
from mindone_lora_plugin.ui.runs import RunManager

STATIC = os.path.join(os.path.dirname(__file__), "static")
TEXT_EXT = (".txt", ".log", ".json", ".jsonl", ".yml", ".yaml", ".toml", ".md")
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".bmp": "image/bmp"}
TOKEN_HEADER = "x-ui-token"
MAX_TRACKED = 10_000  # client addresses whose failed --auth attempts are counted
MAX_BODY = 1 << 20  # a JSON request larger than 1 MiB is refused
BODY_TIMEOUT_S = 30
BACKLOG = 1024
REQUEST_TIMEOUT_S = 30  # the longest a client may take to send one whole request
SECURITY_HEADERS = [
    (b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"), (b"cross-origin-resource-policy", b"same-origin"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                                 b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'")]


def content_disposition(name: str, kind: str = "attachment") -> str:
    """RFC 6266/5987: an ASCII fallback name plus ``filename*`` in UTF-8, for any file name (CR, LF, quotes, CJK)."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\;' else "_" for c in name) or "download"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


class Gate:
    """The ASGI middleware every request passes first (see the module's docstring)."""

    def __init__(self, app, token: str, basic: str | None, loopback: bool, cookie: str):
        self.app, self.token, self.loopback, self.cookie = app, token, loopback, cookie
        self.basic = ("Basic " + base64.b64encode(basic.encode()).decode()) if basic else None
        self.failures: dict[str, int] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal, extra = await self.check(scope)
        if refusal is not None:
            status, message = refusal
            headers = {"connection": "close", **extra}
            return await JSONResponse({"error": message}, status, headers=headers)(scope, receive, _secured(send))
        if scope["path"] == "/" and extra.get("token-ok"):  # the printed URL: keep the token in a cookie, drop it
            resp = RedirectResponse("/", 303)
            resp.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
            return await resp(scope, receive, _secured(send))
        return await self.app(scope, receive, _secured(send))

    async def check(self, scope) -> tuple[tuple[int, str] | None, dict]:
        h = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = h.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.loopback and name not in LOOPBACK:
            return (403, f"host {name!r} refused: this UI answers only to 127.0.0.1/localhost"), {}
        if self.basic:
            client = (scope.get("client") or ("?",))[0]
            given_auth = h.get("authorization", "")
            if not hmac.compare_digest(given_auth.encode(), self.basic.encode()):
                if given_auth:  # a wrong guess (not a request without credentials): slower with each one
                    if len(self.failures) > MAX_TRACKED:
                        self.failures.clear()
                    fails = self.failures[client] = self.failures.get(client, 0) + 1
                    await asyncio.sleep(min(0.25 * 2 ** fails, 10.0))  # the event loop serves others meanwhile
                return (401, "authentication required (the user:password of --auth)"), {
                    "www-authenticate": 'Basic realm="mindone-lora ui"'}
            self.failures.pop(client, None)
        site, mode = h.get("sec-fetch-site"), h.get("sec-fetch-mode")
        origin = h.get("origin")
        own = f"{scope.get('scheme', 'http')}://{host}"
        post = scope["method"] not in ("GET", "HEAD")
        if (origin and origin != own) or (site in ("cross-site", "same-site") and (post or mode != "navigate")):
            return (403, f"refused a request sent by another site ({origin or site}); use the UI's own page"), {}
        query = scope.get("query_string", b"").decode("latin-1")
        given = h.get(TOKEN_HEADER, "")
        if scope["path"] == "/" and not post and "token=" in query:
            qtoken = (parse_qs(query).get("token") or [""])[0]
            if hmac.compare_digest(qtoken.encode(), self.token.encode()):
                return None, {"token-ok": "1"}
            return (403, "wrong token: open the address mindone-lora ui printed when it started"), {}
        cookie = _cookies(h.get("cookie", "")).get(self.cookie, "")
        if post:
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return (403, "this action needs the UI's session token (reload the page opened from the printed "
                             "address)"), {}
            if not h.get("content-type", "").startswith("application/json"):
                return (415, "send JSON (Content-Type: application/json)"), {}
            return None, {}
        if not (hmac.compare_digest(given.encode(), self.token.encode())
                or hmac.compare_digest(cookie.encode(), self.token.encode())):
            return (401, "open the address mindone-lora ui printed when it started (it carries the session "
                         "token)"), {}
        return None, {}


def _cookies(header: str) -> dict:
    return dict(c.strip().split("=", 1) for c in header.split(";") if "=" in c)


def _secured(send):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = dict(message, headers=list(message.get("headers", [])) + SECURITY_HEADERS)
        await send(message)
    return wrapped


async def read_json(request: Request) -> dict:
    """The request's JSON object; LoraError (400) on anything else (too large, slow, invalid, too deep, not a dict)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise LoraError(f"the request body must be JSON of at most {MAX_BODY} bytes")

    async def body() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise LoraError(f"the request body must be JSON of at most {MAX_BODY} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(body(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise LoraError("the request body did not arrive in time") from None
    return bodies.parse(raw)


def _error(e: LoraError) -> JSONResponse:
    if isinstance(e, files.ConfirmNeeded):  # the page asks, then sends the request again with overwrite
        return JSONResponse({"error": str(e), "confirm": True}, 409)
    return JSONResponse({"error": str(e)}, 400)


def build_app(guard, token: str, basic: str | None = None, loopback: bool = True, port: int = 0):
    """The ASGI app: routes behind the :class:`Gate`."""
    runs = RunManager(guard)
    if any(s["status"] == "queued" for s in runs.listing()):  # runs a previous UI left waiting
        runs.watch_queue()
    with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
        page = f.read().replace("__UI_TOKEN__", token)

    def get(handler):
        async def endpoint(request: Request):
            q = dict(request.query_params)
            try:
                result = await run_in_threadpool(handler, q)
            except LoraError as e:
                return _error(e)
            return result if isinstance(result, Response) else JSONResponse(result)
        return endpoint

    def post(handler):
        async def endpoint(request: Request):
            try:
                data = await read_json(request)
                return JSONResponse(await run_in_threadpool(handler, data))
            except LoraError as e:
                return _error(e)
        return endpoint

    def index(q):
        return Response(page, media_type="text/html; charset=utf-8")

    def run_detail(q):
        since = int(q["since"]) if q.get("since", "").isdigit() else 0
        return runs.state(runs.folder(q.get("id", "")), detail=True, since=since)

    def serve_file(q):
        path = q.get("path", "")
        real = guard.resolve(path, "file", must_exist=True)
        if not os.path.isfile(real):
            raise LoraError(f"{path} is not a file")
        ext = os.path.splitext(real)[1].lower()
        name = os.path.basename(real)
        if ext in TEXT_EXT:
            return FileResponse(real, media_type="text/plain; charset=utf-8",
                                headers={"content-disposition": content_disposition(name, "inline")})
        if ext in IMAGE_TYPES:
            return FileResponse(real, media_type=IMAGE_TYPES[ext],
                                headers={"content-disposition": content_disposition(name, "inline")})
        return FileResponse(real, media_type="application/octet-stream",
                            headers={"content-disposition": content_disposition(name)})

    def start_like(kind, d):
        """validate, config (write the TOML) and start: the form's values checked the same way for each."""
        values = bodies.field(d, "values", dict)
        facts = {}
        errors, argv = form.validate(values, guard, runs.running_dirs(), facts)
        reply = {"errors": errors, "argv": argv, "command": form.command_line(argv) if argv else None,
                 "architecture": facts.get("architecture")}
        if errors or kind == "validate":
            return reply
        if kind == "config":
            target = guard.resolve(bodies.field(d, "path", str), "config file", write=True)
            if not target.endswith(".toml"):
                raise LoraError(f"config file {d['path']}: give a .toml file name")
            from mindone_lora_plugin.safetensors_io import write_bytes_atomic

            write_bytes_atomic(target, form.to_toml(argv).encode("utf-8"))
            return dict(reply, saved=target)
        queue = d.get("queue") is True
        return dict(reply, id=runs.start(argv, form.output_dir(argv), queue=queue))

    def route(kind):
        return lambda d: start_like(kind, d)

    def load_config(d):
        return {"values": form.load_config(guard, bodies.field(d, "path", str))}

    def stop(d):
        runs.stop(bodies.field(d, "id", str))
        return {"ok": True}

    def resume(d):
        runs.resume(bodies.field(d, "id", str))
        return {"ok": True}

    def delete(d):
        runs.delete(bodies.field(d, "id", str))
        return {"ok": True}

    def queue(d):
        runs.queue_action(bodies.field(d, "id", str), bodies.field(d, "action", str))
        return {"ok": True}

    gets = {
        "/api/info": lambda q: {"root": guard.root, "allowed": guard.folders, "readonly": guard.readonly,
                                "auth": bool(basic)},
        "/api/form": lambda q: form.schema(),
        "/api/runs": lambda q: {"runs": runs.listing()},
        "/api/run": run_detail,
        "/api/run/files": lambda q: {"files": runs.files(runs.folder(q.get("id", "")))},
        "/api/dataset": lambda q: files.dataset_preview(guard, q.get("path", "")),
        "/api/browse": lambda q: files.browse(guard, q.get("path", "")),
        "/api/progress": lambda q: files.progress(),
        "/api/file": serve_file,
    }
    posts = {
        "/api/validate": route("validate"), "/api/start": route("start"), "/api/config": route("config"),
        "/api/load_config": load_config, "/api/run/stop": stop, "/api/run/resume": resume,
        "/api/run/queue": queue, "/api/run/delete": delete,
        "/api/inspect": lambda d: files.inspect(guard, bodies.field(d, "path", str)),
        "/api/convert": lambda d: files.convert(guard, d),
        "/api/merge": lambda d: files.in_worker("merge", guard, d),
        "/api/generate": lambda d: files.in_worker("generate", guard, d),
    }
    routes = [Route("/", get(index), methods=["GET", "HEAD"]),
              Route("/static/{name:path}", _static, methods=["GET", "HEAD"])]
    routes += [Route(p, get(h), methods=["GET", "HEAD"]) for p, h in gets.items()]
    routes += [Route(p, post(h), methods=["POST"]) for p, h in posts.items()]

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        what = "no such page" if status == 404 else f"{request.method} is not accepted by"
        return JSONResponse({"error": f"{what}: {request.url.path}"}, status)

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.runs = runs
    return Gate(app, token, basic, loopback, cookie=f"mindone_lora_ui_{port}")


async def _static(request: Request):
    name = request.path_params["name"]
    real = os.path.realpath(os.path.join(STATIC, name))
    if not real.startswith(os.path.realpath(STATIC) + os.sep) or not os.path.isfile(real):
        return JSONResponse({"error": f"no such file: {name}"}, 404)
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
             ".html": "text/html; charset=utf-8"}
    return FileResponse(real, media_type=types.get(os.path.splitext(real)[1], "application/octet-stream"))


def _protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline on each request: a connection that has not sent a whole request (head
    and body) ``timeout_s`` after it opened or after the last response is closed, so half-sent requests cannot pile
    up (uvicorn times out idle keep-alive connections only)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _expire(self):
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and self.conn.our_state in (h11.IDLE, h11.DONE):
                self.transport.close()

    return Protocol


class UIServer:
    """The app on a bound socket, served by uvicorn: ``serve_forever()`` in the main thread (Ctrl-C stops it) or
    ``start()`` in a thread (tests, benchmarks) and ``shutdown()``."""

    def __init__(self, address, guard, auth: str | None = None, token: str | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S):
        import uvicorn

        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto IPPROTO_TCP: asyncio then sets TCP_NODELAY on each accepted connection (it checks the proto), so a
        # response's head and body are not held back by Nagle's algorithm on a kept-alive connection
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock.bind((host.strip("[]"), port))
            self.sock.listen(BACKLOG)  # connections wait from now on, so the printed address answers at once
        except OSError:
            self.sock.close()
            raise
        self.guard = guard
        self.server_address = self.sock.getsockname()
        self.token = token or secrets.token_urlsafe(24)
        self.loopback = host in LOOPBACK
        app = build_app(guard, self.token, auth, self.loopback, self.server_address[1])
        self.app = app
        config = uvicorn.Config(app, http=_protocol(request_timeout_s), ws="none", loop="asyncio", lifespan="off",
                                access_log=False, log_level="warning", server_header=False, backlog=BACKLOG,
                                limit_concurrency=1024, timeout_keep_alive=15, timeout_graceful_shutdown=3,
                                h11_max_incomplete_event_size=64 * 1024)
        self.uvicorn = uvicorn.Server(config)
        self._thread = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def serve_forever(self) -> None:
        self.uvicorn.run(sockets=[self.sock])

    def start(self) -> "UIServer":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        end = time.time() + 20
        while not self.uvicorn.started and time.time() < end and self._thread.is_alive():
            time.sleep(0.02)
        return self

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()
