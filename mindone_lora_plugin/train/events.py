"""A machine-readable record of a training run, and a graceful stop.

``output_dir/train_log.jsonl`` gets one JSON object per line, appended and flushed as training goes, so a watcher
(``mindone-lora ui``, a script, ``tail -f``) can follow a run without parsing the progress bar:

* ``{"event": "start", "pid", "step", "total_steps", "time", ...}`` when the loop begins (``step`` > 0 on a resume);
* ``{"event": "step", "step", "total_steps", "loss", "lr", "s_per_step", "time"}`` after every optimizer step;
* ``{"event": "val_loss", "step", "val_loss"}`` where a validation loss is computed (``trainer.events.write(
  "val_loss", step=..., val_loss=...)``; the UI plots it beside the training loss);
* the run's end: ``{"event": "finished" | "stopped" | "failed", "step", "message"?, "time"}``.

SIGTERM or SIGINT during the loop asks for a stop: the trainer finishes the step it is in, writes a checkpoint,
records ``stopped`` and returns (exit status 0), so ``--resume_from_checkpoint latest`` continues from there.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

LOG_FILE = "train_log.jsonl"
END_EVENTS = ("finished", "stopped", "failed")


def log_path(output_dir: str) -> str:
    return os.path.join(output_dir, LOG_FILE)


class RunEvents:
    """Appends events to ``train_log.jsonl`` and turns SIGTERM/SIGINT into a stop request while installed."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path = log_path(output_dir)
        self.enabled = enabled
        self.stop_requested = False
        self._previous = {}
        self._last = None  # (time, step) of the previous step event

    # -- writing

    def write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def start(self, step: int, total_steps: int, **fields) -> None:
        self._last = (time.time(), step)
        self.write("start", pid=os.getpid(), step=step, total_steps=total_steps, **fields)

    def step(self, step: int, total_steps: int, loss: float, lr: float) -> None:
        now = time.time()
        speed = None
        if self._last is not None and step > self._last[1]:
            speed = round((now - self._last[0]) / (step - self._last[1]), 4)
        self._last = (now, step)
        self.write("step", step=step, total_steps=total_steps, loss=float(loss), lr=float(lr), s_per_step=speed)

    def end(self, event: str, step: int, message: str | None = None) -> None:
        self.write(event, step=step, **({"message": message} if message else {}))

    # -- stop on a signal

    def install(self) -> "RunEvents":
        """Route SIGTERM and SIGINT to :meth:`request_stop` (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self.request_stop)
        return self

    def request_stop(self, signum=None, frame=None) -> None:
        if self.stop_requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def record_failure(output_dir: str | None, error: BaseException) -> None:
    """Append a ``failed`` event when a run that had started (its log exists) ends with an error."""
    if not output_dir or not os.path.isfile(log_path(output_dir)):
        return
    last = read_events(output_dir, tail=1)
    if last and last[-1].get("event") in END_EVENTS:
        return
    step = next((e.get("step") for e in reversed(read_events(output_dir)) if "step" in e), 0)
    message = " ".join(str(error).split()) or type(error).__name__
    RunEvents(output_dir).end("failed", step, message)


def read_events(output_dir: str, tail: int | None = None) -> list[dict]:
    """The events written so far (the last ``tail`` when given); a half-written last line is skipped."""
    path = log_path(output_dir)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines[-tail:] if tail else lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
