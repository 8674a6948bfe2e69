"""The "LoRA files" page: inspect, convert, merge and generate through the commands' own Python functions.

Each action takes the page's JSON fields, confines every path with the :class:`~.paths.PathGuard`, builds the
namespace the command's ``run`` takes and calls it, returning the line it prints (its one-line summary) and the files
it wrote. A mistake raises the command's own :class:`LoraError`. ``merge`` and ``generate`` load a model: they run in
a worker process (:func:`in_worker`, ``python -P -m mindone_lora_plugin.ui.files``) that exits when done. The
generate worker reports each denoising step in a small JSON file (:class:`StepReport`) that the page polls through
:func:`progress`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import Counter

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.ui import bodies

_MODEL_LOCK = threading.Lock()  # one model job (generate, merge) at a time
_JOB = {"action": None, "path": None, "last": {}}  # the model job (running or last): its progress file, last report
WORKER_TIMEOUT_S = 3600
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GENERATE_BATCH = 4  # images per pipeline call (generate's own default)


def trigger_words(metadata: dict, limit: int = 20) -> list[list]:
    """The most frequent caption tags of ``ss_tag_frequency`` (kohya: ``{folder: {tag: count}}``) as ``[tag, n]``."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        folders = json.loads(raw)
    except ValueError:
        return []
    counts = Counter()
    for tags in (folders.values() if isinstance(folders, dict) else []):
        if isinstance(tags, dict):
            for tag, n in tags.items():
                if isinstance(n, (int, float)):
                    counts[str(tag).strip()] += int(n)
    return [[t, n] for t, n in counts.most_common(limit) if t]


def algorithm(state, metadata: dict) -> str:
    """The adapter algorithm: the state's own when it has one, else kohya's ``ss_network_module``/``algo`` args."""
    algo = getattr(state, "algorithm", None) or getattr(state, "algo", None)
    if algo:
        return str(algo)
    args = metadata.get("ss_network_args")
    if args:
        try:
            found = json.loads(args).get("algo")
            if found:
                return str(found)
        except (ValueError, AttributeError):
            pass
    module = metadata.get("ss_network_module", "")
    return "lycoris" if "lycoris" in module else "lora"


def inspect(guard, path: str) -> dict:
    from mindone_lora_plugin.commands.convert import available_formats
    from mindone_lora_plugin.commands.inspect import render, summary
    from mindone_lora_plugin.formats.reader import open_lora

    lf = open_lora(guard.resolve(path, "LoRA file", must_exist=True), formats=available_formats())
    out = summary(lf)
    out.update(file=lf.path, text=render(lf), algorithm=algorithm(lf.state, out["metadata"]),
               trigger_words=trigger_words(out["metadata"]))
    return out


def _call(run, **fields) -> str:
    """Run a command's ``run`` with its own parser's defaults overlaid by ``fields`` (so a flag added to the command
    later gets its default here too), capturing what it prints."""
    cmd = sys.modules[run.__module__]
    sub = argparse.ArgumentParser().add_subparsers()
    cmd.add_parser(sub)
    defaults = {a.dest: a.default for p in sub.choices.values() for a in p._actions
                if a.dest not in ("help", argparse.SUPPRESS)}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run(argparse.Namespace(**dict(defaults, **fields)))
    return " ".join(buf.getvalue().split()) or "done"


def _loras(guard, d: dict) -> list[str]:
    """``loras: [{"path", "weight"}]`` → ``["FILE:WEIGHT", ...]`` with each file confined."""
    specs = []
    for item in bodies.loras(d):
        path_text = bodies.text(item, "path").strip()
        if not path_text:
            continue
        path = guard.resolve(path_text, "LoRA file", must_exist=True)
        weight_text = bodies.text(item, "weight").strip() or "1"
        try:
            weight = float(weight_text)
        except ValueError:
            raise LoraError(f"the weight of {path_text} must be a number, got {weight_text!r}") from None
        specs.append(f"{path}:{weight:g}")
    if not specs:
        raise LoraError("add at least one LoRA file")
    return specs


def _opt(guard, d, key, what, must_exist=False):
    value = bodies.text(d, key).strip()
    return guard.resolve(value, what, must_exist) if value else None


def _number(d: dict, key: str, kind, default):
    value = bodies.text(d, key).strip()
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        raise LoraError(f"--{key} must be {'a whole number' if kind is int else 'a number'}, got {value!r}") from None


class ConfirmNeeded(LoraError):
    """The action would replace a file: the page asks the user and sends it again with ``overwrite``."""


def convert(guard, d: dict) -> dict:
    from mindone_lora_plugin.commands import convert as cmd

    out = guard.resolve(bodies.text(d, "output"), "OUT", write=True)
    if os.path.exists(out) and d.get("overwrite") is not True:
        raise ConfirmNeeded(f"OUT {bodies.text(d, 'output')} exists; replace it?")
    to = bodies.text(d, "to") or "kohya"
    message = _call(cmd.run, input=guard.resolve(bodies.text(d, "input"), "IN", must_exist=True), output=out,
                    to=to, base=_opt(guard, d, "base", "--base", True), dtype=bodies.text(d, "dtype") or None)
    return {"message": message}


def merge(guard, d: dict) -> dict:
    from mindone_lora_plugin.commands import merge as cmd

    to_lora = d.get("to_lora") is True
    message = _call(cmd.run, model=_opt(guard, d, "model", "--model", True), lora=_loras(guard, d),
                    out=guard.resolve(bodies.text(d, "out"), "--out", write=True),
                    dtype=bodies.text(d, "dtype") or None,
                    to_lora=to_lora, format=(bodies.text(d, "format") or None) if to_lora else None,
                    overwrite=d.get("overwrite") is True)
    return {"message": message}


def generate(guard, d: dict, report: "StepReport | None" = None) -> dict:
    from mindone_lora_plugin import compose
    from mindone_lora_plugin.commands import generate as cmd

    out = guard.resolve(bodies.text(d, "out"), "--out", write=True)
    prompt = bodies.text(d, "prompt")
    if not prompt.strip():
        raise LoraError("--prompt is required: what to draw")
    num_images, steps = _number(d, "num_images", int, 4), _number(d, "steps", int, 30)
    load = compose.load_pipeline

    def loading(*args, **kw):  # the worker: the pipeline generate loads reports its steps
        report.write(phase="loading")
        return report.watch(load(*args, **kw))

    if report is not None:
        report.images, report.batch_size = num_images, GENERATE_BATCH
        compose.load_pipeline = loading
    try:
        message = _call(cmd.run, model=guard.resolve(bodies.text(d, "model"), "--model", True),
                        lora=_loras(guard, d), prompt=prompt, negative_prompt=bodies.text(d, "negative_prompt") or None,
                        num_images=num_images, steps=steps, guidance_scale=_number(d, "guidance_scale", float, 7.5),
                        seed=_number(d, "seed", int, None), height=_number(d, "height", int, None),
                        width=_number(d, "width", int, None), batch_size=GENERATE_BATCH, out=out, overwrite=True,
                        dtype=None, device_target=bodies.text(d, "device_target") or None)
    finally:
        compose.load_pipeline = load
    return {"message": message, "grid": os.path.join(out, "grid.png")}


class StepReport:
    """A generate job's progress, written by its worker to a small JSON file the UI reads (:func:`progress`):
    ``phase`` ("loading" the model, "denoising", "done"), and while denoising: step ``step`` of ``steps`` for images
    ``first``–``last`` of ``images`` (a pipeline call draws a batch of them together) and ``fraction`` of the whole
    job. Written at each step through the pipeline's own progress bar (``DiffusionPipeline.progress_bar``)."""

    def __init__(self, path: str):
        self.path, self.state, self.calls = path, {}, 0
        self.images, self.batch_size = 1, 1

    def write(self, **state) -> None:
        self.state.update(state)
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:  # replaced whole: a reader never sees half
            json.dump(self.state, f)
        os.replace(self.path + ".tmp", self.path)

    def watch(self, pipe):
        """``pipe`` with a progress bar that reports each step here."""
        bar_of = pipe.progress_bar
        batches = -(-self.images // self.batch_size)

        def progress_bar(iterable=None, total=None):
            first = self.calls * self.batch_size + 1
            done, self.calls = self.calls, self.calls + 1
            bar = bar_of(iterable=iterable, total=total)
            steps = total if total is not None else len(iterable)
            last = min(self.images, first + self.batch_size - 1)

            def report(step):
                self.write(phase="denoising", step=step, steps=steps, first=first, last=last, images=self.images,
                           fraction=(done + step / steps) / batches)

            report(0)
            if iterable is not None:  # for t in progress_bar(timesteps)
                def counted():
                    for i, item in enumerate(bar):
                        yield item
                        report(i + 1)
                return counted()
            update = bar.update

            def counted_update(n=1):  # with progress_bar(total=steps) as bar: ... bar.update()
                update(n)
                report(bar.n)
            bar.update = counted_update
            return bar

        pipe.progress_bar = progress_bar
        return pipe


def progress() -> dict:
    """What the model job (the one running now, else the last one) reported last: ``running``, its ``action``
    (merge or generate; None before the first) and, for generate, the :class:`StepReport` fields."""
    path = _JOB["path"]
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                _JOB["last"] = json.load(f)
        except (OSError, ValueError):  # not written yet
            pass
    return dict(_JOB["last"], running=path is not None, action=_JOB["action"])


def in_worker(action: str, guard, d: dict) -> dict:
    """Run ``merge``/``generate`` in a fresh Python process that exits when done, so the model it loads never stays
    in the UI's memory; one at a time. Its LoraError comes back as this process's."""
    with _MODEL_LOCK, tempfile.TemporaryDirectory(prefix="mindone-lora-ui-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        _JOB.update(action=action, path=os.path.join(tmp, "progress.json"), last={})
        request = json.dumps({"action": action, "root": guard.root, "allowed": guard.writable[1:],
                              "readonly": guard.readonly, "body": d, "progress": _JOB["path"]})
        env = dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3"))
        try:
            proc = subprocess.run([sys.executable, "-P", "-m", "mindone_lora_plugin.ui.files", result_path],
                                  input=request.encode(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp,
                                  env=env, timeout=WORKER_TIMEOUT_S)
        finally:
            progress()  # keep its last report
            _JOB["path"] = None
        try:
            with open(result_path, encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, ValueError):
            tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the {action} worker ended with code {proc.returncode}: {tail[0]}") from None
    if "error" in result:
        raise LoraError(result["error"])
    return result["result"]


def _worker(result_path: str) -> None:
    from mindone_lora_plugin.ui.paths import PathGuard

    request = json.loads(sys.stdin.buffer.read())
    guard = PathGuard(request["root"], request["allowed"], request["readonly"])
    action = request["action"]
    try:
        if action == "generate":
            report = StepReport(request["progress"])
            out = {"result": generate(guard, request["body"], report)}
            report.write(phase="done", fraction=1.0)
        else:
            out = {"result": merge(guard, request["body"])}
    except LoraError as e:
        out = {"error": str(e)}
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(out, f)


def browse(guard, path: str) -> dict:
    """A folder's entries for the page's picker: only inside the allowed folders; with no path, those folders."""
    if not path.strip():
        return {"folder": None, "parent": None, "entries": [{"name": f, "path": f, "dir": True}
                                                              for f in guard.folders]}
    folder = guard.resolve(path, "folder", must_exist=True)
    if not os.path.isdir(folder):
        raise LoraError(f"{path} is not a folder")
    entries = []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            try:
                entries.append({"name": e.name, "path": e.path, "dir": e.is_dir()})
            except OSError:
                continue
    entries.sort(key=lambda e: (not e["dir"], e["name"].lower()))
    parent = os.path.dirname(folder)
    return {"folder": folder, "parent": parent if guard.inside(parent) else "", "entries": entries[:2000]}


def dataset_preview(guard, path: str, limit: int = 6) -> dict:
    """A few images of a training folder with their captions (``metadata.jsonl`` or ``.txt`` beside the image)."""
    folder = guard.resolve(path, "dataset folder", must_exist=True)
    if not os.path.isdir(folder):
        raise LoraError(f"{path} is not a folder")
    captions = {}
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                name = row.get("file_name")
                text = row.get("text", row.get("caption"))
                if name:
                    captions[os.path.normpath(name)] = text
    images = []
    for top, dirs, names in os.walk(folder):
        dirs[:] = sorted(dirs)
        images += [os.path.join(top, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXT)]
        if len(images) > 10000:
            break
    shown = []
    for p in images[:limit]:
        caption = captions.get(os.path.relpath(p, folder))
        txt = os.path.splitext(p)[0] + ".txt"
        if caption is None and os.path.isfile(txt):
            with open(txt, encoding="utf-8", errors="replace") as f:
                caption = f.read().strip()
        shown.append({"path": p, "caption": caption})
    return {"folder": folder, "count": len(images), "images": shown}


if __name__ == "__main__":  # the worker of in_worker
    _worker(sys.argv[1])
