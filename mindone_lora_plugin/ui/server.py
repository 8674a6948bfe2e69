"""The UI's HTTP server: one static page and a JSON API, on the standard library (``http.server``), nothing remote.

Safety: every path goes through the :class:`~.paths.PathGuard`; with ``auth`` set every request needs it (HTTP Basic
for ``user:password``, else the token as ``Authorization: Bearer``, ``?token=`` once, or the cookie that sets);
requests naming another host than the loopback one are refused when bound to loopback (DNS rebinding); state-changing
requests must be JSON posts (a cross-site form cannot send them).
"""

from __future__ import annotations

import base64
import hmac
import json
import mimetypes
import os
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.ui import files, form
from mindone_lora_plugin.ui.runs import RunManager

STATIC = os.path.join(os.path.dirname(__file__), "static")
COOKIE = "mindone_lora_ui"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
TEXT_EXT = (".txt", ".log", ".json", ".jsonl", ".yml", ".yaml", ".toml", ".md")


class UIServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, guard, auth: str | None = None, quiet: bool = True):
        self.guard = guard
        self.auth = auth
        self.quiet = quiet
        self.runs = RunManager(guard)
        self.loopback = address[0] in LOOPBACK
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    server: UIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # noqa: D401 - quiet unless asked
        if not self.server.quiet:
            super().log_message(fmt, *args)

    # -- plumbing

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                                    "style-src 'self' 'unsafe-inline'")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _authorized(self, query) -> tuple[bool, dict]:
        auth = self.server.auth
        if not auth:
            return True, {}
        header = self.headers.get("Authorization", "")
        if ":" in auth:
            want = "Basic " + base64.b64encode(auth.encode()).decode()
            return hmac.compare_digest(header.encode(), want.encode()), {}
        if hmac.compare_digest(header.encode(), f"Bearer {auth}".encode()):
            return True, {}
        cookies = dict(c.strip().split("=", 1) for c in self.headers.get("Cookie", "").split(";") if "=" in c)
        if hmac.compare_digest(cookies.get(COOKIE, "").encode(), auth.encode()):
            return True, {}
        token = (query.get("token") or [""])[0]
        if token and hmac.compare_digest(token.encode(), auth.encode()):
            return True, {"Set-Cookie": f"{COOKIE}={auth}; HttpOnly; SameSite=Strict; Path=/"}
        return False, {}

    def _gate(self):
        """Parse the URL and check host and auth; None when a refusal was sent."""
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        if self.server.loopback and host not in LOOPBACK:
            self._error(403, f"host {host!r} refused: this UI answers only to 127.0.0.1/localhost")
            return None
        ok, headers = self._authorized(query)
        if not ok:
            extra = {"WWW-Authenticate": 'Basic realm="mindone-lora ui"'} if ":" in self.server.auth else {}
            self._send(401, b'{"error": "authentication required (see the --auth the UI was started with)"}',
                       "application/json", extra)
            return None
        self._cookie = headers
        return url.path, query

    # -- GET

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        gated = self._gate()
        if gated is None:
            return
        path, q = gated
        one = {k: v[0] for k, v in q.items()}
        try:
            if path in ("/", "/index.html"):
                return self._static("index.html")
            if path.startswith("/static/"):
                return self._static(path[len("/static/"):])
            if path == "/api/info":
                g = self.server.guard
                return self._json({"root": g.root, "allowed": g.folders, "auth": bool(self.server.auth)})
            if path == "/api/form":
                return self._json(form.schema())
            if path == "/api/runs":
                runs = self.server.runs
                return self._json({"runs": [runs.state(d) for d in runs.run_dirs()]})
            if path == "/api/run":
                runs = self.server.runs
                since = int(one["since"]) if one.get("since", "").isdigit() else 0
                return self._json(runs.state(runs.folder(one.get("id", "")), detail=True, since=since))
            if path == "/api/run/files":
                runs = self.server.runs
                return self._json({"files": runs.files(runs.folder(one.get("id", "")))})
            if path == "/api/dataset":
                return self._json(files.dataset_preview(self.server.guard, one.get("path", "")))
            if path == "/api/file":
                return self._file(one.get("path", ""))
            return self._error(404, f"no such page: {path}")
        except LoraError as e:
            return self._error(400, str(e))
        except Exception as e:  # a bug: say so in one line, details on the UI's stderr
            traceback.print_exc()
            return self._error(500, f"internal error: {type(e).__name__}: {e}")

    def _static(self, name: str) -> None:
        real = os.path.realpath(os.path.join(STATIC, name))
        if not real.startswith(os.path.realpath(STATIC) + os.sep) or not os.path.isfile(real):
            return self._error(404, f"no such file: {name}")
        with open(real, "rb") as f:
            body = f.read()
        ctype = mimetypes.guess_type(real)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        self._send(200, body, ctype, self._cookie)

    def _file(self, path: str) -> None:
        real = self.server.guard.resolve(path, "file", must_exist=True)
        if not os.path.isfile(real):
            raise LoraError(f"{path} is not a file")
        ext = os.path.splitext(real)[1].lower()
        headers = {}
        if ext in TEXT_EXT:
            ctype = "text/plain; charset=utf-8"
        elif ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            ctype = mimetypes.guess_type(real)[0] or "application/octet-stream"
        else:
            ctype = "application/octet-stream"
            headers["Content-Disposition"] = f'attachment; filename="{os.path.basename(real)}"'
        with open(real, "rb") as f:
            body = f.read()
        self._send(200, body, ctype, headers)

    # -- POST

    def do_POST(self):
        gated = self._gate()
        if gated is None:
            return
        path, _ = gated
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return self._error(415, "send JSON (Content-Type: application/json)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            data = json.loads(self.rfile.read(length) or b"{}") if length < 10_000_000 else None
            if not isinstance(data, dict):
                return self._error(400, "the request body must be a JSON object")
        except ValueError:
            return self._error(400, "the request body is not valid JSON")
        try:
            return self._json(self._post(path, data))
        except LoraError as e:
            return self._error(400, str(e))
        except Exception as e:
            traceback.print_exc()
            return self._error(500, f"internal error: {type(e).__name__}: {e}")

    def _post(self, path: str, d: dict):
        guard, runs = self.server.guard, self.server.runs
        if path in ("/api/validate", "/api/start", "/api/config"):
            errors, argv = form.validate(d.get("values") or {}, guard, runs.running_dirs())
            reply = {"errors": errors, "argv": argv, "command": form.command_line(argv) if argv else None}
            if errors or path == "/api/validate":
                return reply
            if path == "/api/config":
                target = guard.resolve(d.get("path") or "", "config file")
                if not target.endswith(".toml"):
                    raise LoraError(f"config file {d.get('path')}: give a .toml file name")
                from mindone_lora_plugin.safetensors_io import write_bytes_atomic

                write_bytes_atomic(target, form.to_toml(argv).encode("utf-8"))
                return dict(reply, saved=target)
            out = guard.resolve(d["values"]["output_dir"], "--output_dir")
            return dict(reply, id=runs.start(argv, out))
        if path == "/api/run/stop":
            runs.stop(d.get("id", ""))
            return {"ok": True}
        if path == "/api/run/resume":
            runs.resume(d.get("id", ""))
            return {"ok": True}
        actions = {"/api/inspect": lambda: files.inspect(guard, d.get("path", "")),
                   "/api/convert": lambda: files.convert(guard, d), "/api/merge": lambda: files.merge(guard, d),
                   "/api/generate": lambda: files.generate(guard, d)}
        if path in actions:
            return actions[path]()
        raise LoraError(f"no such action: {path}")
