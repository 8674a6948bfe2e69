"""The canonical in-memory set of LoRA weights.

Strategies turn adapted models into a :class:`LoraState` (and back); formats turn a :class:`LoraState` into a file
(and back). Everything here is plain numpy, so formats, ``convert`` and ``inspect`` never import MindSpore.

Module paths are the diffusers/transformers module paths *inside* a component, with dots
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``, ``text_model.encoder.layers.0.self_attn.q_proj``),
whatever naming the file on disk used. Components are ``unet``, ``text_encoder`` and ``text_encoder_2``.

Tensor layouts are kohya's and PEFT's (they agree): for a Linear ``[out, in]`` the down (A) matrix is ``[r, in]`` and
the up (B) matrix ``[out, r]``; for a Conv2d ``[out, in, k, k]`` down is ``[r, in, k, k]`` and up ``[out, r, 1, 1]``.
The scale a module applies is ``alpha / rank``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ARCHITECTURES = ("sd1", "sd2", "sdxl")


@dataclass
class LoraModule:
    """One adapted module: ``delta W = up @ down * alpha / rank``."""

    down: np.ndarray
    up: np.ndarray
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def kernel_size(self) -> tuple[int, int] | None:
        return tuple(self.down.shape[2:]) if self.is_conv else None

    def delta(self) -> np.ndarray:
        """The full weight update ``scale * up @ down`` in the base weight's layout, in float32."""
        up = self.up.astype(np.float32).reshape(self.up.shape[0], -1)
        down = self.down.astype(np.float32).reshape(self.rank, -1)
        out = (up @ down) * self.scale
        if self.is_conv:
            return out.reshape(self.up.shape[0], *self.down.shape[1:])
        return out

    def base_shape(self) -> tuple[int, ...]:
        """The shape of the weight this module adapts (``[out, in]`` or ``[out, in, k, k]``)."""
        return (int(self.up.shape[0]),) + tuple(int(s) for s in self.down.shape[1:])

    def astype(self, dtype) -> "LoraModule":
        return LoraModule(self.down.astype(dtype), self.up.astype(dtype), self.alpha)


@dataclass
class LoraState:
    """LoRA weights per component and module path, plus what a writer needs to know about the base model.

    ``architecture`` is ``sd1``, ``sd2``, ``sdxl`` or ``None`` when unknown. ``unet_layers_per_block`` is the base
    UNet's ``layers_per_block``; the SDXL kohya layout (SGM block numbers) depends on it. ``metadata`` holds free-form
    string metadata: training arguments, names, a file's header as read.
    """

    components: dict[str, dict[str, LoraModule]] = field(default_factory=dict)
    architecture: str | None = None
    unet_layers_per_block: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def modules(self):
        """Yield ``(component, module_path, LoraModule)`` in a stable order."""
        for comp in sorted(self.components, key=_component_order):
            for path in sorted(self.components[comp]):
                yield comp, path, self.components[comp][path]

    def __len__(self) -> int:
        return sum(len(m) for m in self.components.values())

    def add(self, component: str, path: str, module: LoraModule) -> None:
        self.components.setdefault(component, {})[path] = module

    def ranks(self, component: str) -> Counter:
        return Counter(m.rank for m in self.components.get(component, {}).values())

    def alphas(self, component: str) -> Counter:
        return Counter(float(m.alpha) for m in self.components.get(component, {}).values())

    def dtype(self) -> str | None:
        names = {str(m.down.dtype) for _, _, m in self.modules()} | {str(m.up.dtype) for _, _, m in self.modules()}
        return ",".join(sorted(names)) if names else None

    def astype(self, dtype) -> "LoraState":
        out = LoraState(architecture=self.architecture, unet_layers_per_block=self.unet_layers_per_block,
                        metadata=dict(self.metadata))
        for comp, path, mod in self.modules():
            out.add(comp, path, mod.astype(dtype))
        return out

    def scaled(self, weight: float) -> "LoraState":
        """The same LoRA with its effect multiplied by ``weight`` (the up matrices are scaled)."""
        out = LoraState(architecture=self.architecture, unet_layers_per_block=self.unet_layers_per_block,
                        metadata=dict(self.metadata))
        for comp, path, mod in self.modules():
            out.add(comp, path, LoraModule(mod.down, (mod.up.astype(np.float32) * weight).astype(mod.up.dtype),
                                           mod.alpha))
        return out


def _component_order(name: str) -> tuple[int, str]:
    return (COMPONENTS.index(name) if name in COMPONENTS else len(COMPONENTS), name)


def most_common(counter: Counter):
    """The most common value; ties go to the largest value (deterministic)."""
    if not counter:
        return None
    best = max(counter.values())
    return max(v for v, c in counter.items() if c == best)
