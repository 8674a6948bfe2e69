"""Named LoRA files beside the final ones: ``--save_every_n_steps/epochs`` (pruned by ``--save_last_n_steps/epochs``)
and the EMA weights (``<name>-ema``).

kohya's names: ``<name>-step00000200`` for step saves, ``<name>-000002`` for epoch saves. A format whose file name
does not carry the run's name (diffusers' ``pytorch_lora_weights.safetensors``) writes into a folder of that name
instead, e.g. ``<name>-ema/pytorch_lora_weights.safetensors``, which diffusers' ``load_lora_weights`` reads.
"""

from __future__ import annotations

import os
import re
import shutil


def step_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}"


def epoch_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}"


def save_named(trainer, name: str, metadata: dict) -> list[str]:
    """Write the models' LoRA weights in every chosen format under ``name``; return the paths."""
    paths = []
    for fmt_name in trainer.formats:
        fmt = trainer.pm.get_format(fmt_name)
        folder = trainer.args.output_dir
        if name not in fmt.default_filename(name):
            folder = os.path.join(folder, name)
            os.makedirs(folder, exist_ok=True)
        paths += trainer.pm.save_weights(trainer.models, trainer.options, folder, [fmt_name], name, metadata)
    return paths


def due(every: int | None, count: int, last: int) -> bool:
    """Every ``every``-th step/epoch, except the last one (the final files are written then)."""
    return bool(every) and count % every == 0 and count < last


def prune(output_dir: str, output_name: str, kind: str, keep) -> list[str]:
    """Remove this run's ``kind`` ('step' or 'epoch') saves whose number ``keep(number)`` rejects; return them."""
    pattern = re.compile(re.escape(output_name) + (r"-step(\d{8})" if kind == "step" else r"-(\d{6})")
                         + r"(?:-ema)?(?=$|[._])")
    removed = []
    for entry in sorted(os.listdir(output_dir)):
        m = pattern.match(entry)
        if m and not keep(int(m.group(1))):
            path = os.path.join(output_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
    return removed
