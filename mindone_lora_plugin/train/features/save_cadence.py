"""Named LoRA files beside the final ones: ``--save_every_n_steps/epochs`` (pruned by ``--save_last_n_steps/epochs``).
The EMA feature writes its averaged weights beside each (``<name>-step00000200-ema``).

kohya's names: ``<name>-step00000200`` for step saves, ``<name>-000002`` for epoch saves. A format whose file name
does not carry the run's name (diffusers' ``pytorch_lora_weights.safetensors``) writes into a folder of that name
instead, e.g. ``<name>-ema/pytorch_lora_weights.safetensors``, which diffusers' ``load_lora_weights`` reads.
"""

from __future__ import annotations

import os
import re
import shutil

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.train.features.base import TrainingFeature


def step_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}"


def epoch_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}"


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


class SaveCadence(TrainingFeature):
    name = "save_cadence"
    description = "--save_every_n_steps/epochs: LoRA files during training, pruned by --save_last_n_steps/epochs"
    order = 40

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group("save cadence (LoRA files, besides --checkpointing_steps checkpoints)")
        g.add_argument("--save_every_n_steps", type=int, default=None,
                       help="also write the LoRA files every N steps as <name>-step00000N")
        g.add_argument("--save_every_n_epochs", type=int, default=None,
                       help="also write the LoRA files every N epochs as <name>-00000N")
        g.add_argument("--save_last_n_steps", type=int, default=None,
                       help="keep only the step files of the last N steps (older ones are removed)")
        g.add_argument("--save_last_n_epochs", type=int, default=None,
                       help="keep only the last N epoch files (older ones are removed)")

    @classmethod
    def check(cls, args) -> None:
        for flag in ("save_every_n_steps", "save_every_n_epochs", "save_last_n_steps", "save_last_n_epochs"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise LoraError(f"--{flag} must be at least 1, got {value}")
        if args.save_last_n_steps is not None and not args.save_every_n_steps:
            raise LoraError("--save_last_n_steps needs --save_every_n_steps")
        if args.save_last_n_epochs is not None and not args.save_every_n_epochs:
            raise LoraError("--save_last_n_epochs needs --save_every_n_epochs")

    def after_step(self, run, global_step: int, writer) -> None:
        if not run.is_main:
            return
        args = self.args
        epoch = global_step // run.updates_per_epoch
        if due(args.save_every_n_steps, global_step, run.max_steps):
            run.save_named(step_name(run.output_name, global_step), run.metadata(global_step))
            if args.save_last_n_steps:
                prune(args.output_dir, run.output_name, "step", lambda s: s > global_step - args.save_last_n_steps)
        if global_step % run.updates_per_epoch == 0 and due(args.save_every_n_epochs, epoch, run.num_epochs):
            run.save_named(epoch_name(run.output_name, epoch), run.metadata(global_step))
            if args.save_last_n_epochs:
                prune(args.output_dir, run.output_name, "epoch",
                      lambda e: e > epoch - args.save_every_n_epochs * args.save_last_n_epochs)

    def metadata(self) -> dict[str, str]:
        return {"ss_save_every_n_steps": str(self.args.save_every_n_steps),
                "ss_save_every_n_epochs": str(self.args.save_every_n_epochs)}
