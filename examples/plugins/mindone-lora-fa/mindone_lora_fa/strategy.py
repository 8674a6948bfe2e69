"""The ``lora-fa`` strategy: LoRA-FA (Zhang et al., 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation").

Every adapted module gets the usual LoRA pair ``delta W = B @ A * alpha / r``, but the down-projection A is drawn at
random once and then frozen; only the up-projection B (initialised to zero) trains. That halves the trainable LoRA
parameters, and the optimizer state with them, while A acts as a fixed random projection of each layer's input.

Everything else (which modules are adapted, presets, rank/alpha, per-component learning rates, saving and loading) is
inherited from :class:`~mindone_lora_plugin.strategies.base.LoraStrategy`. The strategy overrides three things:

* :meth:`layer_parameters`: only ``lora_B`` is returned, so only B reaches the optimizer;
* :meth:`add_adapters` and :meth:`apply`: A is (re)initialised as ``--lora_fa_init`` says and marked
  ``requires_grad=False`` right away, so a trainer that collects ``cell.trainable_params()`` does not train it either.

A saved LoRA-FA file is an ordinary LoRA (A is saved too), so any LoRA loader can use it; resuming restores the very
same A from the file.
"""

from __future__ import annotations

import numpy as np

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.models import lora_layers
from mindone_lora_plugin.strategies.base import LoraStrategy, algorithm_of_layer

#: values of ``--lora_fa_init`` (``LoraOptions.extra["lora_fa_init"]``); ``None`` keeps ``LoraOptions.init``.
A_INITS = ("orthogonal", "kaiming", "gaussian")


class LoraFaStrategy(LoraStrategy):
    name = "lora-fa"
    description = "LoRA-FA: random A frozen, only B trains (UNet; --train_text_encoder adds the SD1.x/2.x text encoder)"
    components = ("unet", "text_encoder")
    default_components = ("unet",)

    def adaptable_components(self, models):
        # SDXL's text encoders are left to the sdxl strategy, as the built-in unet strategy does
        return ("unet",) if models.architecture == "sdxl" else self.components

    def a_init(self, options) -> str | None:
        value = (options.extra or {}).get("lora_fa_init")
        if value is not None and value not in A_INITS:
            raise LoraError(f"unknown --lora_fa_init '{value}': choose one of {', '.join(A_INITS)}")
        return value

    def check(self, models, options) -> None:
        super().check(models, options)
        self.a_init(options)

    # ------------------------------------------------------------------ the LoRA-FA part

    def layer_parameters(self, layer) -> dict:
        """Only B trains; A stays where :meth:`add_adapters` put it."""
        return {"lora_B": _parameters(layer)["lora_B"]}

    def add_adapters(self, models, options) -> dict[str, list[str]]:
        adapted = super().add_adapters(models, options)  # checks first: nothing changes when it does not fit
        init = self.a_init(options)
        for comp in adapted:
            for _, layer in lora_layers(models[comp]):
                if init is not None:
                    reinit_a(layer, init)
                freeze_a(layer)
        return adapted

    def apply(self, models, state, options=None) -> None:
        super().apply(models, state, options)  # A comes from the file: the same projection as in training
        for comp in state.components:
            for _, layer in lora_layers(models[comp]):
                freeze_a(layer)


def _parameters(layer) -> dict:
    """The layer's ``lora_A``/``lora_B`` parameters, asked of the algorithm that owns it (mindone.peft's layer, or
    the core's plain-LoRA layer that kohya's dropouts use)."""
    return algorithm_of_layer(layer).layer_parameters(layer)


def freeze_a(layer) -> None:
    _parameters(layer)["lora_A"].requires_grad = False


def reinit_a(layer, how: str) -> None:
    """Draw a new A for one LoRA layer (numpy's global generator, which ``runtime.setup(seed=...)`` seeds)."""
    import mindspore as ms

    weight = _parameters(layer)["lora_A"]
    rank, fan_in = int(weight.shape[0]), int(np.prod(weight.shape[1:]))
    if how == "gaussian":  # PEFT's "gaussian" init
        a = np.random.normal(0.0, 1.0 / rank, size=(rank, fan_in))
    elif how == "kaiming":  # PEFT's default (kaiming_uniform with a=sqrt(5)), the LoRA-FA paper's choice
        bound = 1.0 / np.sqrt(fan_in)
        a = np.random.uniform(-bound, bound, size=(rank, fan_in))
    else:  # orthogonal: orthonormal rows (columns when rank > fan_in), a norm-preserving random projection
        q, r = np.linalg.qr(np.random.normal(size=(max(rank, fan_in), min(rank, fan_in))))
        q = q * np.sign(np.diag(r))  # a uniformly distributed orthogonal matrix
        a = q.T if rank <= fan_in else q
    weight.set_data(ms.Tensor(a.reshape(weight.shape).astype(np.float32), dtype=weight.dtype))
