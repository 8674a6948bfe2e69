"""Training runs under the UI's root: start (or queue) them as detached ``mindone-lora train`` processes, watch,
stop, resume, delete. (Over 400 lines: one run's life and the queue share the same lock and files, kept in one
place so the locking can be read at once.)

A run is an output folder. The UI writes ``ui_run.json`` there (the ``train`` arguments, the queue position while
queued, the launches with their process ids) and sends the process's output to ``train.log``; the trainer writes
``train_log.jsonl`` (:mod:`mindone_lora_plugin.train.events`). Processes start in their own session, so closing the
browser or the UI leaves them running, and a restarted UI finds every run again by scanning the root for these files.
They start as ``python -P`` in the run's folder (the user's files never shadow a module) with :data:`MARKER` in their
environment, and Stop signals only a process this UI started or one carrying that marker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.safetensors_io import write_bytes_atomic
from mindone_lora_plugin.train import checkpoint
from mindone_lora_plugin.train.events import END_EVENTS, LOG_FILE

RUN_FILE = "ui_run.json"
OUTPUT_LOG = "train.log"
MAX_DEPTH = 3  # how deep under the root runs are looked for
MAX_POINTS = 1000  # loss points sent to the page (evenly thinned beyond)
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")
MARKER = "MINDONE_LORA_UI_RUN"  # set in the environment of every training process the UI starts: the run's folder
QUEUE_POLL_S = 1.0
BUSY = ("running", "starting", "stopping")


class EventTail:
    """Reads a run's ``train_log.jsonl`` incrementally (only the new bytes each time) into a compact summary."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.losses: dict[int, float] = {}
        self.val_losses: dict[int, float] = {}
        self.speeds: list[float] = []
        self.last_start = None
        self.last_end = None  # the end event after the last start, if any
        self.starts = 0  # launches seen: a page holding the curve starts over when this changes
        self.resumes: list[int] = []  # the steps a launch resumed from
        self.step = 0
        self.total = None

    def update(self) -> "EventTail":
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return self
        if size < self.offset:  # rewritten: read again
            self.__init__(self.path)
        if size == self.offset:
            return self
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        end = data.rfind(b"\n") + 1  # a half-written last line waits for the next read
        self.offset += end
        for line in data[:end].splitlines():
            try:
                self._add(json.loads(line))
            except ValueError:
                continue
        return self

    def _add(self, e: dict) -> None:
        kind = e.get("event")
        if kind == "start":
            self.last_start, self.last_end = e, None
            self.starts += 1
            self.speeds = []
            if isinstance(e.get("step"), int) and e["step"] > 0:
                self.resumes.append(e["step"])
        elif kind in END_EVENTS:
            self.last_end = e
        elif kind == "step" and isinstance(e.get("loss"), (int, float)):
            self.losses[int(e["step"])] = float(e["loss"])
            if e.get("s_per_step"):
                self.speeds = (self.speeds + [float(e["s_per_step"])])[-20:]
        if "val_loss" in e and isinstance(e["val_loss"], (int, float)):
            self.val_losses[int(e.get("step", 0))] = float(e["val_loss"])
        if isinstance(e.get("step"), int):
            self.step = e["step"]
        if isinstance(e.get("total_steps"), int):
            self.total = e["total_steps"]


def _thin(points: dict[int, float], since: int = 0) -> list[list]:
    """Points after step ``since`` (all when 0), oldest first, thinned evenly to about :data:`MAX_POINTS`."""
    items = sorted((s, v) for s, v in points.items() if s > since) if since else sorted(points.items())
    if len(items) > MAX_POINTS:
        stride = len(items) / MAX_POINTS
        items = [items[int(i * stride)] for i in range(MAX_POINTS)] + [items[-1]]
    return [[s, v] for s, v in items]


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live (not zombie) ``mindone_lora_plugin`` process."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        return b"mindone_lora_plugin" in cmdline or b"mindone-lora" in cmdline
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def _carries_marker(pid: int, folder: str) -> bool:
    """Whether process ``pid`` is a training process the UI started for ``folder``: its environment holds
    ``MINDONE_LORA_UI_RUN=<folder>`` (a pid read from a file proves nothing by itself)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return (MARKER + "=" + folder).encode() in env and pid_alive(pid)


def _tail_text(path: str, lines: int = 40, chunk: int = 16384) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chunk))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    rows = [r.rstrip() for part in data.split("\n") for r in part.split("\r")[-1:]]  # tqdm's \r: its last state
    return "\n".join([r for r in rows if r][-lines:])


class RunManager:
    """Every run under ``guard.root``; starts (or queues), stops and resumes them.

    Queued runs wait in their folder (``ui_run.json`` with a ``queued`` position) and a thread of this UI starts the
    first of them when no run this UI knows of is running: one device, one run at a time.
    """

    def __init__(self, guard):
        self.guard = guard
        self._tails: dict[str, EventTail] = {}
        self._children: dict[int, subprocess.Popen] = {}  # launched by this UI: reaped so they never linger
        self._lock = threading.Lock()
        self._queue_thread: threading.Thread | None = None

    # -- finding runs

    def run_dirs(self) -> list[str]:
        found = []
        root = self.guard.root
        for top, dirs, files in os.walk(root):
            depth = top[len(root):].count(os.sep)
            if RUN_FILE in files or LOG_FILE in files:
                found.append(top)
                dirs[:] = []  # a run's checkpoints and logs are not runs
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
        return sorted(found)

    def run_id(self, folder: str) -> str:
        return os.path.relpath(folder, self.guard.root)

    def folder(self, run_id: str) -> str:
        path = self.guard.resolve(run_id, "run")
        if not (os.path.isfile(os.path.join(path, RUN_FILE)) or os.path.isfile(os.path.join(path, LOG_FILE))):
            raise LoraError(f"run {run_id}: not a training run folder (no {RUN_FILE} or {LOG_FILE})")
        return path

    def running_dirs(self) -> set[str]:
        return {d for d in self.run_dirs() if self.state(d)["status"] in BUSY}

    def listing(self) -> list[dict]:
        """Every run's state, newest first (queued ones in their queue order, before the rest)."""
        states = [self.state(d) for d in self.run_dirs()]
        return sorted(states, key=lambda s: (s["status"] != "queued", s["queued"] or 0, -s["created"]))

    # -- state

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    def _info(self, folder: str) -> dict:
        try:
            with open(os.path.join(folder, RUN_FILE), encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def state(self, folder: str, detail: bool = False, since: int = 0) -> dict:
        """The run's state; ``detail`` adds the loss points after step ``since``, images, log tail and arguments."""
        with self._lock:
            self._reap()
            tail = self._tails.get(folder)
            if tail is None:
                tail = self._tails[folder] = EventTail(os.path.join(folder, LOG_FILE))
            tail.update()
        info = self._info(folder)
        launches = info.get("launches") if isinstance(info.get("launches"), list) else []
        launch = launches[-1] if launches and isinstance(launches[-1], dict) else {}
        pid = launch.get("pid") or (tail.last_start or {}).get("pid")
        alive = pid_alive(pid) if isinstance(pid, int) else False
        started_after_launch = tail.last_start is not None and tail.last_start.get("time", 0) >= launch.get("time", 0)
        if info.get("queued"):
            status = "queued"
        elif info.get("cancelled") and not launch:
            status = "cancelled"
        elif alive:
            status = "stopping" if launch.get("stop_requested") else "running" if started_after_launch else "starting"
        elif tail.last_end is not None and started_after_launch:
            status = tail.last_end["event"]
        elif launch.get("stop_requested"):
            status = "stopped"
        elif tail.last_end is not None and not launch:
            status = tail.last_end["event"]
        else:
            status = "failed"
        speed = sorted(tail.speeds)[len(tail.speeds) // 2] if tail.speeds else None
        total = tail.total
        ckpts = [s for s, _ in checkpoint.complete_checkpoints(folder)]
        out = {"id": self.run_id(folder), "folder": folder, "status": status, "step": tail.step, "total_steps": total,
               "s_per_step": speed,
               "eta_s": round(speed * (total - tail.step), 1) if speed and total and status == "running" else None,
               "message": (tail.last_end or {}).get("message") if status in ("failed", "stopped") else None,
               "checkpoints": ckpts, "queued": info.get("queued"),
               "created": info.get("created") or (os.path.getmtime(folder) if os.path.isdir(folder) else 0),
               "can_resume": status in ("stopped", "failed") and bool(ckpts) and bool(info.get("argv")),
               "updated": os.path.getmtime(folder) if os.path.isdir(folder) else 0}
        if status == "failed" and not out["message"]:
            out["message"] = _last_error(os.path.join(folder, OUTPUT_LOG)) or "the process ended without a status"
        if detail:
            out.update(losses=_thin(tail.losses, since), val_losses=_thin(tail.val_losses), since=since,
                       starts=tail.starts, resumes=tail.resumes, argv=info.get("argv"),
                       images=self.images(folder), log=_tail_text(os.path.join(folder, OUTPUT_LOG)))
        return out

    def images(self, folder: str) -> list[str]:
        found = []
        for sub in ("validation", "samples", "sample"):
            d = os.path.join(folder, sub)
            if os.path.isdir(d):
                found += [os.path.join(d, n) for n in os.listdir(d) if n.lower().endswith(IMAGE_EXT)]
        return sorted(found, key=lambda p: os.path.getmtime(p))

    def files(self, folder: str) -> list[dict]:
        """The run folder's files (two levels deep), checkpoints in step order (``checkpoint-10`` after ``-9``)."""
        out = []
        for top, dirs, names in os.walk(folder):
            dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=_natural)
            if top[len(folder):].count(os.sep) >= 2:
                dirs[:] = []
            for n in sorted(names, key=_natural):
                p = os.path.join(top, n)
                try:
                    out.append({"path": p, "name": os.path.relpath(p, folder), "size": os.path.getsize(p),
                                "lora": n.endswith(".safetensors") and _is_lora(p)})
                except OSError:
                    continue
        return out

    # -- starting, queueing, stopping, resuming

    def start(self, argv: list[str], output_dir: str, queue: bool = False) -> str:
        """Start the run now, or queue it (``queue``, or when another run of this UI is running)."""
        os.makedirs(output_dir, exist_ok=True)
        info = {"argv": list(argv), "created": time.time(), "launches": []}
        if queue or self._busy():
            info["queued"] = time.time()
            self._write_info(output_dir, info)
            self.watch_queue()
        else:
            self._write_info(output_dir, info)
            self._launch(output_dir, info, list(argv))
        return self.run_id(output_dir)

    def _busy(self) -> bool:
        self._reap()
        return any(p.poll() is None for p in self._children.values()) or bool(self.running_dirs())

    def queue_action(self, run_id: str, action: str) -> None:
        """``cancel`` a queued run, or move it ``up``/``down`` the queue."""
        if action not in ("cancel", "up", "down"):
            raise LoraError(f"no such queue action: {action} (cancel, up or down)")
        folder = self.folder(run_id)
        info = self._info(folder)
        if not info.get("queued"):
            raise LoraError(f"run {run_id} is not queued")
        if action == "cancel":
            info.pop("queued")
            info["cancelled"] = time.time()
            self._write_info(folder, info)
            return
        queued = [s for s in self.listing() if s["status"] == "queued"]
        i = next(i for i, s in enumerate(queued) if s["folder"] == folder)
        j = i - 1 if action == "up" else i + 1
        if 0 <= j < len(queued):
            other = queued[j]["folder"]
            other_info = self._info(other)
            info["queued"], other_info["queued"] = other_info["queued"], info["queued"]
            self._write_info(folder, info)
            self._write_info(other, other_info)

    def watch_queue(self) -> None:
        """Start the thread that starts queued runs (it ends when the queue is empty)."""
        with self._lock:
            if self._queue_thread is None or not self._queue_thread.is_alive():
                self._queue_thread = threading.Thread(target=self._run_queue, daemon=True, name="ui-queue")
                self._queue_thread.start()

    def _run_queue(self) -> None:
        while True:
            time.sleep(QUEUE_POLL_S)
            try:
                queued = [s for s in self.listing() if s["status"] == "queued"]
                if not queued:
                    return
                if self._busy():
                    continue
            except (OSError, LoraError):  # a folder changed under the scan: look again
                continue
            folder = queued[0]["folder"]
            info = self._info(folder)
            info.pop("queued", None)
            try:
                self._launch(folder, info, [str(a) for a in info["argv"]])
            except (OSError, KeyError, TypeError) as e:  # never started: it leaves the queue as cancelled
                info.update(cancelled=time.time(), launch_error=f"{type(e).__name__}: {e}")
                self._write_info(folder, info)

    def resume(self, run_id: str) -> None:
        folder = self.folder(run_id)
        state = self.state(folder)
        if state["status"] in BUSY:
            raise LoraError(f"run {run_id} is {state['status']}; stop it before resuming")
        info = self._info(folder)
        if not info.get("argv"):
            raise LoraError(f"run {run_id} was not started from the UI (no {RUN_FILE}); resume it with mindone-lora "
                            f"train ... --resume_from_checkpoint latest")
        if state["status"] == "finished":
            raise LoraError(f"run {run_id} has finished; nothing to resume (start a new run to train further)")
        if not state["checkpoints"]:
            raise LoraError(f"run {run_id} has no complete checkpoint yet; start it again instead")
        argv = _without(info["argv"], "--resume_from_checkpoint") + ["--resume_from_checkpoint", "latest"]
        self._launch(folder, info, argv)

    def stop(self, run_id: str) -> None:
        """SIGTERM to the run's training process: only one this UI started, or one carrying the run's marker."""
        folder = self.folder(run_id)
        info = self._info(folder)
        if info.get("queued"):
            return self.queue_action(run_id, "cancel")
        launches = info.get("launches") if isinstance(info.get("launches"), list) else []
        launch = launches[-1] if launches and isinstance(launches[-1], dict) else {}
        pid = launch.get("pid")
        ours = isinstance(pid, int) and pid > 0 and (
            (pid in self._children and self._children[pid].poll() is None) or _carries_marker(pid, folder))
        if not ours:
            if isinstance(pid, int) and pid_alive(pid) and pid not in self._children:
                raise LoraError(f"run {run_id}: process {pid} was not started by the UI for this run; refusing to "
                                f"signal it (stop a run started elsewhere with Ctrl-C or kill)")
            raise LoraError(f"run {run_id} is not running")
        launch["stop_requested"] = time.time()
        self._write_info(folder, info)
        os.kill(pid, signal.SIGTERM)  # the trainer checkpoints, records "stopped" and exits

    def delete(self, run_id: str) -> None:
        """Remove a run's folder: only a run the UI started (it has ``ui_run.json``) that is not queued or running."""
        folder = self.folder(run_id)
        if folder == self.guard.root or not os.path.isfile(os.path.join(folder, RUN_FILE)):
            raise LoraError(f"run {run_id} was not started from the UI; delete its folder yourself if you mean to")
        status = self.state(folder)["status"]
        if status in BUSY or status == "queued":
            raise LoraError(f"run {run_id} is {status}; stop or cancel it before deleting it")
        shutil.rmtree(folder)
        self._tails.pop(folder, None)

    def _launch(self, folder: str, info: dict, argv: list[str]) -> None:
        # -P: the user's files (a tqdm.py in the run folder or the root) cannot shadow a module of the trainer
        cmd = [sys.executable, "-P", "-m", "mindone_lora_plugin.cli", "train"] + argv
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{MARKER: folder})
        env.setdefault("GLOG_v", "3")
        with open(os.path.join(folder, OUTPUT_LOG), "ab") as log:
            log.write(f"\n$ mindone-lora train {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=folder, env=env, start_new_session=True)
        self._children[proc.pid] = proc
        info.setdefault("launches", []).append({"pid": proc.pid, "time": time.time(), "argv": argv})
        self._write_info(folder, info)

    @staticmethod
    def _write_info(folder: str, info: dict) -> None:
        write_bytes_atomic(os.path.join(folder, RUN_FILE), json.dumps(info, indent=2).encode("utf-8"))


def _natural(name: str) -> list:
    """A sort key that orders the numbers in a name by value (``checkpoint-9`` before ``checkpoint-10``)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _is_lora(path: str) -> bool:
    """Whether a ``.safetensors`` file is one an installed LoRA format claims (so ``inspect`` can read it), not an
    optimizer or model state: the check ``inspect`` itself starts with, on the header alone."""
    from mindone_lora_plugin.commands.convert import available_formats
    from mindone_lora_plugin.formats.reader import detect_format
    from mindone_lora_plugin.safetensors_io import read_header

    try:
        header, _ = read_header(path)
        metadata = header.pop("__metadata__", None) or {}
        return detect_format(list(header), metadata, available_formats()) is not None
    except (OSError, ValueError, LoraError):
        return False


def _without(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _last_error(path: str) -> str | None:
    lines = [ln for ln in _tail_text(path, 200).splitlines() if "error" in ln.lower()]
    return lines[-1].strip() if lines else None
