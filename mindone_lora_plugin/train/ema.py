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

import mindspore as ms
import numpy as np
from mindspore import nn, ops

FILE = "ema.safetensors"


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
        from mindone_lora_plugin.errors import LoraError

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
