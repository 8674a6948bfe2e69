"""`mindone-lora ui` as a separate process, attacked over raw sockets: the session token in the printed address, a
request smuggled in the body of a refused one (wrong token, text/plain, a rebound Host), file names that try header
injection or are not ASCII, three downloads of a file larger than the UI's memory, and half-sent connections."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-root")
    proc = subprocess.Popen([sys.executable, "-m", "mindone_lora_plugin.cli", "ui", "--port", "0", "--root", str(root)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=([\w-]+)", line)
    assert m, line
    yield {"root": root, "port": int(m.group(1)), "token": m.group(2), "pid": proc.pid}
    proc.send_signal(signal.SIGINT)
    proc.wait(20)
    proc.stdout.close()


def exchange(port: int, raw: bytes, timeout: float = 10) -> bytes:
    """Send ``raw`` on one connection and read until the server closes it (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except socket.timeout:
            pass
    return out


def request(method: str, path: str, headers: dict, body: bytes = b"") -> bytes:
    head = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def test_printed_token_sets_a_cookie_and_the_page_carries_it(ui):
    port, token = ui["port"], ui["token"]
    host = {"Host": f"127.0.0.1:{port}", "Connection": "close"}
    first = exchange(port, request("GET", f"/?token={token}", host))
    assert first.startswith(b"HTTP/1.1 303") and f"mindone_lora_ui_{port}={token}".encode() in first
    assert b"HttpOnly" in first and b"SameSite=strict" in first
    page = exchange(port, request("GET", "/", dict(host, Cookie=f"mindone_lora_ui_{port}={token}")))
    assert page.startswith(b"HTTP/1.1 200") and f'content="{token}"'.encode() in page
    assert exchange(port, request("GET", "/", host)).startswith(b"HTTP/1.1 401")
    assert exchange(port, request("GET", "/?token=wrong", host)).startswith(b"HTTP/1.1 403")


def test_a_refused_request_never_runs_what_its_body_smuggles(ui):
    port, token, root = ui["port"], ui["token"], ui["root"]
    inner = json.dumps({"values": {}, "path": "smuggled.toml"}).encode()
    smuggled = request("POST", "/api/config", {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json",
                                               "X-UI-Token": token}, inner)
    read = request("GET", "/api/info", {"Host": f"127.0.0.1:{port}", "X-UI-Token": token})
    cases = [  # (outer headers, expected status): each with a complete, valid request as its body
        ({"Host": f"127.0.0.1:{port}", "Content-Type": "text/plain"}, b"403"),  # a form post: no token
        ({"Host": f"127.0.0.1:{port}", "Content-Type": "text/plain", "X-UI-Token": token}, b"415"),
        ({"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "X-UI-Token": token,
          "Origin": "http://127.0.0.1:8765"}, b"403"),  # another origin
        ({"Host": "evil.example", "Content-Type": "application/json", "X-UI-Token": token}, b"403"),  # rebinding
    ]
    for headers, status in cases:
        for body in (smuggled, read):
            answer = exchange(port, request("POST", "/api/config", headers, body))
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
            assert answer.count(b"HTTP/1.1 ") == 1 and b'"root"' not in answer  # one answer, then closed
    assert not (root / "smuggled.toml").exists()
    # a bad Content-Length is the framework's 400, at once
    bad = exchange(port, b"POST /api/validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n", 5)
    assert bad.startswith(b"HTTP/1.1 400")


def test_downloads_stream_any_file_name_with_bounded_memory(ui):
    port, token, root = ui["port"], ui["token"], ui["root"]
    names = ["模型.safetensors", "a\r\nSet-Cookie: pwned=1.bin", 'quote"; x=1.bin']
    for name in names:
        (root / name).write_bytes(b"0123456789")
        from urllib.parse import quote

        answer = exchange(port, request("GET", "/api/file?path=" + quote(name), {
            "Host": f"127.0.0.1:{port}", "X-UI-Token": token, "Connection": "close"}))
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == b"0123456789" and answer.count(b"HTTP/1.1") == 1
        lines = head.split(b"\r\n")
        assert not any(ln.lower().startswith(b"set-cookie") for ln in lines)
        disposition = next(ln for ln in lines if ln.lower().startswith(b"content-disposition"))
        assert b"filename*=UTF-8''" + quote(name, safe="").encode() in disposition
    # three downloads at once of a file several times the UI's memory: streamed, the UI's peak RSS barely moves
    big = root / "big.bin"
    with open(big, "wb") as f:
        f.truncate(400 << 20)

    def peak_kib():
        with open(f"/proc/{ui['pid']}/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))

    before = peak_kib()
    sizes = []

    def download():
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(request("GET", "/api/file?path=big.bin", {"Host": f"127.0.0.1:{port}", "X-UI-Token": token,
                                                                  "Connection": "close"}))
            n = 0
            while chunk := s.recv(1 << 20):
                n += len(chunk)
            sizes.append(n)

    threads = [threading.Thread(target=download) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(sizes) == 3 and all(n > 400 << 20 for n in sizes)
    assert peak_kib() - before < 64 << 10, f"UI peak RSS grew by {(peak_kib() - before) >> 10} MiB"


def test_half_sent_connections_hold_no_threads(ui):
    port, token = ui["port"], ui["token"]

    def threads():
        with open(f"/proc/{ui['pid']}/status") as f:
            return int(re.search(r"Threads:\s+(\d+)", f.read()).group(1))

    before = threads()
    held = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /api/validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Len")
            held.append(s)
        time.sleep(0.5)
        t0 = time.perf_counter()
        answer = exchange(port, request("GET", "/api/info", {"Host": f"127.0.0.1:{port}", "X-UI-Token": token,
                                                              "Connection": "close"}))
        assert answer.startswith(b"HTTP/1.1 200") and time.perf_counter() - t0 < 5
        assert threads() <= before + 2
    finally:
        for s in held:
            s.close()
