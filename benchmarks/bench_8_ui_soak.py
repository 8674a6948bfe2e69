"""Benchmark 8 — the UI under a long run: responses stay fast and the UI process's memory stays flat.

``mindone-lora ui`` runs as its own process; a run of ``--steps`` (default 1,000) steps writes ``train_log.jsonl``
(through :class:`mindone_lora_plugin.train.events.RunEvents`, as the trainer does), its output log and a validation
PNG every 100 steps, at ``--step_ms`` per step. Meanwhile a poller asks what the page asks every 1.5 s — the run list
and the run's detail (the loss points after the last one it holds, images, log tail) — every ``--pause_ms``. Compared
side by side: the median response time over the first and the last 10% of the run, and the UI's RSS at the start and
the end.

Then the response time of a request on a kept-alive connection against one on a fresh connection (the median of
``--keepalive_requests`` of each, ``/api/runs`` through ``http.client``): a kept-alive request must not wait on Nagle's
algorithm and delayed ACKs.

Targets: last/first median response ≤ 2.0×; RSS end/start ≤ 1.10; kept-alive/fresh median response ≤ 1.2.

``--real`` trains the tiny model instead (``mindone-lora train`` started through the UI's API, GRAPH_MODE, CPU);
slow on a small machine, the simulated writer measures the same UI code.

    python benchmarks/bench_8_ui_soak.py [--steps 1000] [--step_ms 20] [--pause_ms 20] [--real]
                                         [--keepalive_requests 300]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

RESPONSE_TARGET = 2.0
RSS_TARGET = 1.10
KEEPALIVE_TARGET = 1.2
HEADERS: dict[str, str] = {}  # the session token, once the UI printed it

WRITER = """
import os, sys, time
from PIL import Image
from mindone_lora_plugin.train.events import RunEvents
out, steps, step_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ev = RunEvents(out)
ev.start(0, steps)
log = open(os.path.join(out, "train.log"), "a")
os.makedirs(os.path.join(out, "validation"), exist_ok=True)
for s in range(1, steps + 1):
    time.sleep(step_s)
    ev.step(s, steps, 1.0 / (1 + 0.01 * s), 1e-4)
    log.write(f"\\rsteps: {s}/{steps} loss={1.0 / (1 + 0.01 * s):.4f}"); log.flush()
    if s % 100 == 0:
        ev.write("val_loss", step=s, val_loss=1.1 / (1 + 0.01 * s))
        Image.new("RGB", (128, 128), (s % 255, 80, 160)).save(os.path.join(out, "validation", f"step-{s:06d}.png"))
ev.end("finished", steps)
"""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def get(url: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, headers=HEADERS), timeout=60) as r:
        r.read()
    return time.perf_counter() - t0


def get_json(url: str) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=HEADERS), timeout=60) as r:
        return json.loads(r.read())


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), dict(HEADERS, **{"Content-Type": "application/json"}))
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def keepalive_vs_fresh(port: int, n: int) -> tuple[float, float]:
    """Median seconds of ``GET /api/runs`` on one kept-alive connection and on a fresh connection each, interleaved."""
    import http.client

    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times_kept, times_fresh = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        kept.request("GET", "/api/runs", headers=HEADERS)
        kept.getresponse().read()
        times_kept.append(time.perf_counter() - t0)
        fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        t0 = time.perf_counter()
        fresh.request("GET", "/api/runs", headers=HEADERS)
        fresh.getresponse().read()
        times_fresh.append(time.perf_counter() - t0)
        fresh.close()
    kept.close()
    return C.median(times_kept), C.median(times_fresh)


def start_real(url: str, root: str, steps: int) -> str:
    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    model = ensure_tiny_model("sd1", os.path.join(root, "tiny-sd1"))
    make_shapes_dataset(os.path.join(root, "shapes"), size=32, repeats=1)
    values = dict(pretrained_model_name_or_path=model, train_data_dir="shapes", output_dir="runs/soak",
                  resolution="32", train_batch_size="1", max_train_steps=str(steps), learning_rate="1e-3",
                  lr_warmup_steps="0", checkpointing_steps="250", validation_prompt="a red circle",
                  validation_steps="100", num_validation_images="1", num_inference_steps="2", device_target="CPU",
                  report_to="none")
    r = post(url + "/api/start", {"values": values})
    if r.get("errors"):
        raise SystemExit(f"the UI refused the run: {r['errors']}")
    return r["id"]


def _kill_runs(root: str) -> None:
    """A training process the UI started (--real) never outlives the benchmark."""
    import signal

    from mindone_lora_plugin.ui.runs import RUN_FILE, pid_alive

    for top, _, names in os.walk(root):
        if RUN_FILE in names:
            with open(os.path.join(top, RUN_FILE)) as f:
                for launch in json.load(f).get("launches", []):
                    if pid_alive(launch.get("pid")):
                        os.kill(launch["pid"], signal.SIGKILL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--step_ms", type=float, default=20.0)
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--pause_ms", type=float, default=20.0, help="pause between two polls (default 20 ms)")
    ap.add_argument("--keepalive_requests", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench8-") as root:
        ui = subprocess.Popen([sys.executable, "-m", "mindone_lora_plugin.cli", "ui", "--port", "0", "--root", root],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
        writer = None
        try:
            m = re.search(r"(http://127\.0\.0\.1:(\d+))/\?token=([\w-]+)", ui.stdout.readline())
            url, port = m.group(1), int(m.group(2))
            HEADERS["X-UI-Token"] = m.group(3)
            get(url + "/")
            if args.real:
                run_id = start_real(url, root, args.steps)
            else:
                run_id = "runs/soak"
                out = os.path.join(root, run_id)
                os.makedirs(out)
                writer = subprocess.Popen([sys.executable, "-c", WRITER, out, str(args.steps),
                                           str(args.step_ms / 1000)])
                while writer.poll() is None and not os.path.exists(os.path.join(out, "train_log.jsonl")):
                    time.sleep(0.05)
            detail = f"{url}/api/run?id={run_id}"
            get(url + "/api/runs")
            rss = [rss_kib(ui.pid)]
            polls = []  # (step, seconds for runs + detail)
            t0 = time.time()
            since, points = 0, 0
            while True:  # as the page polls: the run list, then the run's points after the last one it holds
                t1 = time.perf_counter()
                get(url + "/api/runs")
                state = get_json(f"{detail}&since={since}")
                dt = time.perf_counter() - t1
                points += len(state["losses"])
                since = state["losses"][-1][0] if state["losses"] else since
                polls.append((state["step"], dt))
                if len(polls) % 20 == 0:
                    rss.append(rss_kib(ui.pid))
                if state["status"] in ("finished", "failed", "stopped"):
                    break
                time.sleep(args.pause_ms / 1000)
                if time.time() - t0 > 3600:
                    raise SystemExit("the run did not finish within an hour")
            rss.append(rss_kib(ui.pid))
            if writer is not None:
                writer.wait()
            total = state["total_steps"] or args.steps
            first = [dt for s, dt in polls if s <= 0.1 * total] or [polls[0][1]]
            last = [dt for s, dt in polls if s >= 0.9 * total] or [polls[-1][1]]
            ratio_t = C.median(last) / C.median(first)
            ratio_m = rss[-1] / rss[0]
            print(f"run: {total} steps ({'real training' if args.real else f'simulated, {args.step_ms:g} ms/step'}),"
                  f" final status {state['status']}, {len(polls)} polls, {points} loss points on the page")
            print(f"{'':34}{'first 10%':>12}{'last 10%':>12}{'ratio':>8}{'target':>8}")
            print(f"{'median response (runs + detail)':34}{C.median(first) * 1000:>10.1f}ms"
                  f"{C.median(last) * 1000:>10.1f}ms{ratio_t:>8.2f}{RESPONSE_TARGET:>8.2f}")
            print(f"{'UI process RSS':34}{rss[0] / 1024:>10.1f}MB{rss[-1] / 1024:>10.1f}MB{ratio_m:>8.2f}"
                  f"{RSS_TARGET:>8.2f}  (max {max(rss) / 1024:.1f} MB)")
            kept, fresh = keepalive_vs_fresh(port, args.keepalive_requests)
            ratio_k = kept / fresh
            print(f"{'':34}{'kept-alive':>12}{'fresh':>12}{'ratio':>8}{'target':>8}")
            print(f"{'median response (/api/runs)':34}{kept * 1000:>10.2f}ms{fresh * 1000:>10.2f}ms{ratio_k:>8.2f}"
                  f"{KEEPALIVE_TARGET:>8.2f}")
            ok = (ratio_t <= RESPONSE_TARGET and ratio_m <= RSS_TARGET and ratio_k <= KEEPALIVE_TARGET
                  and state["status"] == "finished")
            print("PASS" if ok else "FAIL")
            return 0 if ok else 1
        finally:
            if writer is not None and writer.poll() is None:
                writer.kill()
                writer.wait()
            _kill_runs(root)
            ui.terminate()
            ui.wait(10)
            ui.stdout.close()


if __name__ == "__main__":
    raise SystemExit(main())
