"""Training checkpoints: ``output_dir/checkpoint-N/`` with LoRA weights, optimizer state and counters.

A checkpoint is written into a hidden temporary folder and renamed into place, so a process killed at any moment
leaves the newest complete checkpoint intact (a half-written one is never named ``checkpoint-N``). Contents:

* ``pytorch_lora_weights.safetensors`` — the LoRA weights (diffusers format, fp32, true alpha);
* ``optimizer.safetensors`` — every optimizer state tensor (moments, step counter), by parameter name;
* ``trainer_state.json`` — global step, epoch, step within the epoch, seed, the LoRA set-up (strategy, rank, alpha,
  targets) to refuse a resume with other settings, the loss history and the numpy RNG state. Written last: its
  presence marks the checkpoint complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from mindone_lora_plugin.errors import LoraError

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every complete checkpoint in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve(resume: str, output_dir: str) -> str | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names (``latest`` → the newest complete one, or None)."""
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = resume if os.path.isabs(resume) or os.path.isdir(resume) else os.path.join(output_dir, resume)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise LoraError(f"{resume} is not a complete checkpoint folder (no {STATE_FILE}); pass a checkpoint-N folder "
                        f"or 'latest'")
    return path


def write(output_dir: str, step: int, fill, total_limit: int | None = None) -> str:
    """Create ``checkpoint-<step>`` atomically; ``fill(tmp_dir)`` writes the files; prune old ones afterwards."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        fill(tmp)
        if os.path.isdir(final):  # re-saving the same step: move the old one aside first
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(output_dir)
    if total_limit is not None and total_limit > 0:
        for _, path in complete_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def write_state(folder: str, state: dict) -> None:
    path = os.path.join(folder, STATE_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_state(folder: str) -> dict:
    with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def check_compatible(saved: dict, current: dict, folder: str) -> None:
    """Refuse resuming when the LoRA set-up differs (another rank, strategy, targets, components)."""
    diffs = [f"{k} {saved.get(k)!r} → {current.get(k)!r}" for k in sorted(current) if saved.get(k) != current.get(k)]
    if diffs:
        raise LoraError(f"cannot resume from {folder}: it was made with other LoRA settings ({'; '.join(diffs)}); "
                        f"use the same flags or start a new --output_dir")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
