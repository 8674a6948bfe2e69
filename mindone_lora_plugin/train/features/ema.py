"""``--use_ema --ema_decay``: an exponential moving average of the LoRA weights.

The average starts as a copy of the initial weights and follows each optimizer update with
``ema ← d·ema + (1 − d)·w``, where the decay warms up as ``d = min(ema_decay, (1 + n) / (10 + n))`` and ``n`` counts
the updates before this one (the warm-up of kohya-ss/sd-scripts PR #893 and diffusers' ``EMAModel``), so early
random-ish weights do not dominate a short LoRA run. The update is one small compiled cell on the device; the averaged
weights are saved beside the raw ones as ``<name>-ema``, drawn with for validation images and samples, and kept in
checkpoints (``ema.safetensors``) so a resume continues exactly.
"""

from __future__ import annotations

import contextlib
import os

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.train.features.base import TrainingFeature

FILE = "ema.safetensors"
DEFAULT_EMA_DECAY = 0.999


def decay_at(ema_decay: float, updates_before: int) -> float:
    """The decay used for an update that follows ``updates_before`` earlier ones."""
    return min(float(ema_decay), (1.0 + updates_before) / (10.0 + updates_before))


class _Update(nn.Cell):
    def __init__(self, params, shadow):
        super().__init__()
        self.params, self.shadow = params, shadow

    def construct(self, decay):
        for p, s in zip(self.params, self.shadow):
            ops.assign(s, decay * s + (1.0 - decay) * p)
        return decay


class EMA:
    """The moving average of ``params`` (the trainable LoRA parameters)."""

    def __init__(self, params, ema_decay: float):
        self.params = list(params)
        self.ema_decay = float(ema_decay)
        self.shadow = ms.ParameterTuple(ms.Parameter(ms.Tensor(p.asnumpy().astype(np.float32)), name=f"ema.{p.name}",
                                                     requires_grad=False) for p in self.params)
        self._cell = _Update(ms.ParameterTuple(self.params), self.shadow)

    def update(self, global_step: int) -> float:
        """Fold in the weights after update number ``global_step`` (1-based); return the decay used."""
        d = decay_at(self.ema_decay, global_step - 1)
        self._cell(ms.Tensor(d, ms.float32))
        return d

    def state(self) -> dict[str, np.ndarray]:
        return {s.name: s.asnumpy() for s in self.shadow}

    def load(self, tensors: dict) -> None:
        missing = [s.name for s in self.shadow if s.name not in tensors]
        if missing:
            raise LoraError(f"the checkpoint's EMA weights lack {missing[0]} ({len(missing)} missing); it was made "
                            f"with other settings")
        for s in self.shadow:
            s.set_data(ms.Tensor(np.asarray(tensors[s.name], dtype=np.float32)))

    @contextlib.contextmanager
    def swapped(self):
        """Inside the block the models carry the averaged weights; the raw ones come back afterwards."""
        raw = [p.asnumpy().copy() for p in self.params]
        try:
            for p, s in zip(self.params, self.shadow):
                p.set_data(ms.Tensor(s.asnumpy(), dtype=p.dtype))
            yield
        finally:
            for p, r in zip(self.params, raw):
                p.set_data(ms.Tensor(r, dtype=p.dtype))


class EmaFeature(TrainingFeature):
    name = "ema"
    description = "--use_ema: a moving average of the LoRA weights, saved as <name>-ema and drawn with"
    order = 10  # the average follows the update before anything is drawn or saved

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group("EMA of the LoRA weights")
        g.add_argument("--use_ema", action="store_true",
                       help="keep a moving average of the LoRA weights; saved beside the raw ones as <name>-ema and "
                            "used for validation and sample images")
        g.add_argument("--ema_decay", type=float, default=None,
                       help=f"EMA decay (default {DEFAULT_EMA_DECAY}); warmed up as min(decay, (1+n)/(10+n))")

    @classmethod
    def check(cls, args) -> None:
        if args.ema_decay is not None and not args.use_ema:
            raise LoraError("--ema_decay needs --use_ema")
        if args.ema_decay is not None and not 0.0 < args.ema_decay < 1.0:
            raise LoraError(f"--ema_decay must be between 0 and 1 (e.g. 0.999), got {args.ema_decay}")

    def __init__(self, args):
        super().__init__(args)
        self.decay = args.ema_decay if args.ema_decay is not None else DEFAULT_EMA_DECAY
        self.ema = None

    def setup(self, run) -> None:
        if self.args.use_ema:
            self.ema = EMA([p for g in run.groups for p in g["params"]], self.decay)

    def after_step(self, run, global_step: int, writer) -> None:
        if self.ema is not None:
            self.ema.update(global_step)

    def drawing_weights(self):
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def on_save(self, run, name: str, metadata: dict) -> list[str]:
        """The averaged weights as ``<name>-ema`` beside a save of the raw ones (none without --use_ema)."""
        if self.ema is None or not run.is_main:
            return []
        with self.ema.swapped():
            return run.save_lora(name + "-ema", dict(metadata, ss_ema_weights="True"))

    def finish(self, run, global_step: int, writer) -> list[str]:
        return self.on_save(run, run.output_name, run.metadata(global_step))

    def checkpoint(self, folder: str) -> dict:
        if self.ema is not None:
            from mindone_lora_plugin import safetensors_io

            safetensors_io.save(self.ema.state(), os.path.join(folder, FILE))
        return {"ema": self.ema is not None}

    def resume(self, folder: str, state: dict) -> None:
        if self.ema is None:
            return
        from mindone_lora_plugin import safetensors_io

        path = os.path.join(folder, FILE)
        if not os.path.isfile(path):
            raise LoraError(f"{folder} holds no EMA weights ({FILE}): it was saved without --use_ema; resume "
                            f"without --use_ema or start a new --output_dir")
        self.ema.load(safetensors_io.load(path)[0])

    def metadata(self) -> dict[str, str]:
        return {"ss_use_ema": str(bool(self.args.use_ema)),
                "ss_ema_decay": str(self.decay if self.args.use_ema else None)}
