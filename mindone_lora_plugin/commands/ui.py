"""``mindone-lora ui [--host 127.0.0.1] [--port 7860] [--root DIR] [--allow DIR ...] [--auth user:password|TOKEN]``.

Serves the web UI (see ``docs/ui.md``): new runs, watching/stopping/resuming them, and the LoRA file tools. Training
runs are separate ``mindone-lora train`` processes, so stopping the UI leaves them running. Binding to anything but
the loopback address needs ``--auth``. Every path the UI reads or writes stays inside ``--root`` and the ``--allow``
folders.
"""

from __future__ import annotations

import errno
import os

from mindone_lora_plugin.errors import LoraError


def add_parser(subparsers):
    p = subparsers.add_parser(
        "ui", help="a web UI to set up, watch and use training runs",
        description="Serve a web UI for training runs and LoRA files. Open it in a browser (on a remote server "
                    "through an SSH tunnel: ssh -L 7860:127.0.0.1:7860 HOST). Nothing is uploaded anywhere.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --auth)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--root", default=".", metavar="DIR",
                   help="the folder runs are created in and looked for (default: the current folder)")
    p.add_argument("--allow", action="append", default=[], metavar="DIR",
                   help="another folder the UI may read and write (models, datasets, LoRA files); repeatable")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD|TOKEN",
                   help="require HTTP Basic auth (user:password) or a token (open http://HOST:PORT/?token=TOKEN)")
    return p


def check_args(args) -> None:
    from mindone_lora_plugin.ui.server import LOOPBACK

    if args.host not in LOOPBACK and not args.auth:
        raise LoraError(f"--host {args.host} would let other machines reach the UI; pass --auth user:password (or "
                        f"--auth TOKEN), or keep the default --host 127.0.0.1 and use an SSH tunnel")
    if args.auth is not None and (not args.auth.strip() or args.auth.startswith(":") or args.auth.endswith(":")):
        raise LoraError("--auth needs user:password or a token, e.g. --auth alice:s3cret")
    if not 0 <= args.port <= 65535:
        raise LoraError(f"--port {args.port} is not a port number (0-65535)")
    for flag, folder in [("--root", args.root)] + [("--allow", a) for a in args.allow]:
        if not os.path.isdir(folder):
            raise LoraError(f"{flag} {folder}: no such folder")


def make_server(args):
    from mindone_lora_plugin.ui.paths import PathGuard
    from mindone_lora_plugin.ui.server import UIServer

    check_args(args)
    guard = PathGuard(args.root, args.allow)
    try:
        return UIServer((args.host, args.port), guard, auth=args.auth)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise LoraError(f"port {args.port} on {args.host} is in use; pass another --port (or --port 0)") from None
        raise LoraError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from None


def run(args) -> int:
    server = make_server(args)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    auth = ("on (HTTP Basic, user " + args.auth.split(":", 1)[0] + ")" if args.auth and ":" in args.auth
            else "on (token: open the address with ?token=...)" if args.auth else "off (loopback only)")
    print(f"mindone-lora ui: http://{shown}:{port}/  root {server.guard.root}; allowed folders: "
          f"{server.guard.describe()}; auth {auth}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("mindone-lora ui: stopped (training runs started from it keep running)", flush=True)
    finally:
        server.server_close()
    return 0
