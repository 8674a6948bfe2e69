"""``mindone-lora ui [--host 127.0.0.1] [--port 7860] [--root DIR] [--allow DIR ...] [--auth USER:PASSWORD]``.

Serves the web UI (see ``docs/ui.md``): new runs, watching/stopping/resuming them, and the LoRA file tools. Training
runs are separate ``mindone-lora train`` processes, so stopping the UI leaves them running. The address it prints
carries a session token (as Jupyter's does): open that one. Binding to anything but the loopback address needs
``--auth`` (a password of at least :data:`MIN_PASSWORD` characters), given on the command line, in the environment
variable :data:`AUTH_ENV` or in a file (``--auth_file``). Every path the UI reads or writes stays inside ``--root``
and the ``--allow`` folders.
"""

from __future__ import annotations

import errno
import os

from mindone_lora_plugin.errors import LoraError

AUTH_ENV = "MINDONE_LORA_UI_AUTH"
MIN_PASSWORD = 12  # on a non-loopback address


def add_parser(subparsers):
    p = subparsers.add_parser(
        "ui", help="a web UI to set up, watch and use training runs",
        description="Serve a web UI for training runs and LoRA files. Open the address it prints (it carries a "
                    "session token); on a remote server through an SSH tunnel: ssh -L 7860:127.0.0.1:7860 HOST. "
                    "Nothing is uploaded anywhere.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --auth)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--root", default=".", metavar="DIR",
                   help="the folder runs are created in and looked for (default: the current folder)")
    p.add_argument("--allow", action="append", default=[], metavar="DIR",
                   help="another folder the UI may read and write (models, datasets, LoRA files); repeatable")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help=f"require HTTP Basic auth; also read from the environment variable {AUTH_ENV} or "
                        f"--auth_file, which keep the password out of the process list")
    p.add_argument("--auth_file", "--auth-file", dest="auth_file", default=None, metavar="FILE",
                   help="a file whose first line is USER:PASSWORD (instead of --auth)")
    return p


def auth_of(args) -> str | None:
    """``user:password`` from --auth, --auth_file or the environment (in that order), checked."""
    auth, where = args.auth, "--auth"
    if auth is None and args.auth_file:
        try:
            with open(args.auth_file, encoding="utf-8") as f:
                auth, where = f.readline().strip(), f"--auth_file {args.auth_file}"
        except OSError as e:
            raise LoraError(f"--auth_file {args.auth_file}: {e.strerror}") from None
    if auth is None and os.environ.get(AUTH_ENV):
        auth, where = os.environ[AUTH_ENV].strip(), AUTH_ENV
    if auth is None:
        return None
    user, _, password = auth.partition(":")
    if not user or not password:
        raise LoraError(f"{where} needs USER:PASSWORD, e.g. alice:a-long-passphrase")
    return auth


def check_args(args) -> str | None:
    from mindone_lora_plugin.ui import LOOPBACK

    auth = auth_of(args)
    if args.host not in LOOPBACK:
        if not auth:
            raise LoraError(f"--host {args.host} would let other machines reach the UI; pass --auth USER:PASSWORD "
                            f"(or set {AUTH_ENV}), or keep the default --host 127.0.0.1 and use an SSH tunnel")
        if len(auth.partition(":")[2]) < MIN_PASSWORD:
            raise LoraError(f"--host {args.host}: the --auth password must have at least {MIN_PASSWORD} characters "
                            f"on an address other machines can reach")
    if not 0 <= args.port <= 65535:
        raise LoraError(f"--port {args.port} is not a port number (0-65535)")
    for flag, folder in [("--root", args.root)] + [("--allow", a) for a in args.allow]:
        if not os.path.isdir(folder):
            raise LoraError(f"{flag} {folder}: no such folder")
    return auth


def make_server(args):
    from mindone_lora_plugin.demo.shapes_eval import shipped_model
    from mindone_lora_plugin.ui.paths import PathGuard

    auth = check_args(args)
    try:
        from mindone_lora_plugin.ui.server import UIServer
    except ImportError as e:  # installed without its dependencies
        raise LoraError(f"mindone-lora ui needs starlette and uvicorn ({e.name} is missing): pip install "
                        f"'starlette>=0.40,<1' 'uvicorn>=0.30,<1'") from None
    guard = PathGuard(args.root, args.allow, readonly=[shipped_model()])  # the demo model: read, never written
    try:
        return UIServer((args.host, args.port), guard, auth=auth), auth
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise LoraError(f"port {args.port} on {args.host} is in use; pass another --port (or --port 0)") from None
        raise LoraError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from None


def run(args) -> int:
    server, auth = make_server(args)
    note = "on (HTTP Basic, user " + auth.split(":", 1)[0] + ")" if auth else "off (loopback only)"
    print(f"mindone-lora ui: {server.url}?token={server.token}  root {server.guard.root}; allowed folders: "
          f"{server.guard.describe()}; auth {note}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.sock.close()
    print("mindone-lora ui: stopped (training runs started from it keep running)", flush=True)
    return 0
