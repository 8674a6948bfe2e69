"""The "LoRA files" page: inspect, convert, merge and generate through the commands' own Python functions.

Each action takes the page's JSON fields, confines every path with the :class:`~.paths.PathGuard`, builds the
namespace the command's ``run`` takes and calls it, returning the line it prints (its one-line summary) and the files
it wrote. A mistake raises the command's own :class:`LoraError`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import threading
from collections import Counter

from mindone_lora_plugin.errors import LoraError

_MODEL_LOCK = threading.Lock()  # one MindSpore job (generate) at a time in the UI process
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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
    import sys

    cmd = sys.modules[run.__module__]
    sub = argparse.ArgumentParser().add_subparsers()
    cmd.add_parser(sub)
    defaults = {a.dest: a.default for p in sub.choices.values() for a in p._actions
                if a.dest not in ("help", argparse.SUPPRESS)}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run(argparse.Namespace(**dict(defaults, **fields)))
    return " ".join(buf.getvalue().split()) or "done"


def _loras(guard, items) -> list[str]:
    """``[{"path", "weight"}]`` → ``["FILE:WEIGHT", ...]`` with each file confined."""
    specs = []
    for item in items or []:
        if not str(item.get("path") or "").strip():
            continue
        path = guard.resolve(item["path"], "LoRA file", must_exist=True)
        try:
            weight = float(item.get("weight", 1) if item.get("weight", "") != "" else 1)
        except (TypeError, ValueError):
            raise LoraError(f"the weight of {item['path']} must be a number, got {item.get('weight')!r}") from None
        specs.append(f"{path}:{weight:g}")
    if not specs:
        raise LoraError("add at least one LoRA file")
    return specs


def _opt(guard, value, what, must_exist=False):
    return guard.resolve(value, what, must_exist) if str(value or "").strip() else None


def convert(guard, d: dict) -> dict:
    from mindone_lora_plugin.commands import convert as cmd

    out = guard.resolve(d.get("output"), "OUT")
    message = _call(cmd.run, input=guard.resolve(d.get("input"), "IN", must_exist=True), output=out,
                    to=d.get("to") or "kohya", base=_opt(guard, d.get("base"), "--base", True),
                    dtype=d.get("dtype") or None)
    return {"message": message}


def merge(guard, d: dict) -> dict:
    from mindone_lora_plugin.commands import merge as cmd

    to_lora = bool(d.get("to_lora"))
    message = _call(cmd.run, model=_opt(guard, d.get("model"), "--model", True), lora=_loras(guard, d.get("loras")),
                    out=guard.resolve(d.get("out"), "--out"), dtype=d.get("dtype") or None, to_lora=to_lora,
                    format=(d.get("format") or None) if to_lora else None, overwrite=bool(d.get("overwrite")))
    return {"message": message}


def generate(guard, d: dict) -> dict:
    from mindone_lora_plugin.commands import generate as cmd

    def number(key, kind, default):
        value = d.get(key)
        if value in (None, ""):
            return default
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise LoraError(f"--{key} must be a number, got {value!r}") from None

    out = guard.resolve(d.get("out"), "--out")
    if not str(d.get("prompt") or "").strip():
        raise LoraError("--prompt is required: what to draw")
    with _MODEL_LOCK:
        message = _call(cmd.run, model=guard.resolve(d.get("model"), "--model", True),
                        lora=_loras(guard, d.get("loras")), prompt=d["prompt"],
                        negative_prompt=d.get("negative_prompt") or None, num_images=number("num_images", int, 4),
                        steps=number("steps", int, 30), guidance_scale=number("guidance_scale", float, 7.5),
                        seed=number("seed", int, None), height=None, width=None, batch_size=4, out=out,
                        overwrite=True, dtype=None, device_target=d.get("device_target") or None)
    return {"message": message, "grid": os.path.join(out, "grid.png")}


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
