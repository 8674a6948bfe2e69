"""The canonical in-memory set of LoRA weights.

Strategies turn adapted models into a :class:`LoraState` (and back); formats turn a :class:`LoraState` into a file
(and back). Everything here is plain numpy, so formats, ``convert`` and ``inspect`` never import MindSpore.

Module paths are the diffusers/transformers module paths *inside* a component, with dots
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``, ``text_model.encoder.layers.0.self_attn.q_proj``),
whatever naming the file on disk used. Components are the architecture's (:mod:`mindone_lora_plugin.architectures`):
``unet``, ``text_encoder`` and ``text_encoder_2`` for Stable Diffusion.

Tensor layouts are kohya's and PEFT's (they agree): for a Linear ``[out, in]`` the down (A) matrix is ``[r, in]`` and
the up (B) matrix ``[out, r]``; for a Conv2d ``[out, in, k, k]`` down is ``[r, in, k, k]`` and up ``[out, r, 1, 1]``.
The scale a module applies is ``alpha / rank``. Other algorithms (LoHa, LoKr, ...) keep their own named tensors;
what they mean is the business of their algorithm object (:mod:`mindone_lora_plugin.algorithms`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


class LoraModule:
    """One adapted module: its algorithm's name, the algorithm's named tensors, ``alpha`` and the algorithm's settings.

    ``LoraModule(down, up, alpha)`` is a plain-LoRA module (``delta W = up @ down * alpha / rank``); any algorithm's
    module is ``LoraModule(algorithm="loha", tensors={...}, alpha=..., settings={...})``. Rank, scale, shapes and the
    weight change come from the algorithm (:mod:`mindone_lora_plugin.algorithms`), never from the tensors directly.
    ``down``/``up`` are shorthands for plain LoRA's two tensors.
    """

    __slots__ = ("algorithm", "tensors", "alpha", "settings")

    def __init__(self, down=None, up=None, alpha=None, *, algorithm: str = "lora", tensors: dict | None = None,
                 settings: dict | None = None):
        if tensors is None:
            tensors = {"down": down, "up": up}
        self.algorithm = algorithm
        self.tensors = dict(tensors)
        self.alpha = float(alpha) if alpha is not None else None
        self.settings = dict(settings or {})
        if self.alpha is None:
            self.alpha = float(self.rank)

    @property
    def algo(self):
        """The algorithm object (looked up among the installed ones by name)."""
        from mindone_lora_plugin.algorithms import get_algorithm

        return get_algorithm(self.algorithm)

    # plain-LoRA shorthands (the lora algorithm's roles)
    @property
    def down(self) -> np.ndarray:
        return self.tensors["down"]

    @down.setter
    def down(self, value) -> None:
        self.tensors["down"] = value

    @property
    def up(self) -> np.ndarray:
        return self.tensors["up"]

    @up.setter
    def up(self, value) -> None:
        self.tensors["up"] = value

    @property
    def rank(self) -> int:
        return self.algo.rank(self)

    @property
    def scale(self) -> float:
        return self.algo.scale(self)

    @property
    def is_conv(self) -> bool:
        return len(self.base_shape()) == 4

    @property
    def kernel_size(self) -> tuple[int, int] | None:
        return tuple(self.base_shape()[2:]) if self.is_conv else None

    def delta(self, base_weight: np.ndarray | None = None) -> np.ndarray:
        """The full weight change in the base weight's layout, in float32 (``base_weight`` for DoRA)."""
        return self.algo.delta(self, base_weight).astype(np.float32)

    def base_shape(self) -> tuple[int, ...]:
        """The shape of the weight this module adapts (``[out, in]`` or ``[out, in, k, k]``)."""
        return tuple(int(s) for s in self.algo.base_shape(self))

    def dtypes(self) -> set[str]:
        return {str(np.asarray(t).dtype) for t in self.tensors.values()}

    def astype(self, dtype) -> "LoraModule":
        from mindone_lora_plugin.dtypes import as_dtype

        return LoraModule(algorithm=self.algorithm, alpha=self.alpha, settings=self.settings,
                          tensors={k: as_dtype(np.asarray(v), dtype) for k, v in self.tensors.items()})

    def scaled(self, weight: float) -> "LoraModule":
        """The same module with its effect multiplied by ``weight``."""
        return self.algo.scaled(self, weight)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={list(np.shape(v))}" for k, v in sorted(self.tensors.items()))
        return f"LoraModule({self.algorithm}: {shapes}, alpha={self.alpha:g})"


@dataclass
class LoraState:
    """LoRA weights per component and module path, plus what a writer needs to know about the base model.

    ``architecture`` is an installed architecture's name (``sd1``, ``sd2``, ``sdxl`` ...) or ``None`` when unknown.
    ``base_config`` is what the architecture's file names depend on in the base model
    (:meth:`~mindone_lora_plugin.architectures.base.Architecture.base_config`; SD: the UNet's ``layers_per_block``,
    which the SDXL kohya layout's SGM block numbers depend on). ``metadata`` holds free-form string metadata: training
    arguments, names, a file's header as read.
    """

    components: dict[str, dict[str, LoraModule]] = field(default_factory=dict)
    architecture: str | None = None
    base_config: dict = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def modules(self):
        """Yield ``(component, module_path, LoraModule)`` in a stable order."""
        for comp in sorted(self.components, key=component_order):
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
        names = set().union(*(m.dtypes() for _, _, m in self.modules())) if len(self) else set()
        return ",".join(sorted(names)) if names else None

    def algorithms(self, component: str | None = None) -> Counter:
        """How many modules use each algorithm (of one component, or all)."""
        comps = [component] if component else list(self.components)
        return Counter(m.algorithm for c in comps for m in self.components.get(c, {}).values())

    def labels(self, component: str | None = None) -> Counter:
        """Like :meth:`algorithms`, with each algorithm's own label (``lora+dora`` for DoRA modules)."""
        comps = [component] if component else list(self.components)
        return Counter(m.algo.label(m) for c in comps for m in self.components.get(c, {}).values())

    def astype(self, dtype) -> "LoraState":
        out = LoraState(architecture=self.architecture, base_config=dict(self.base_config),
                        metadata=dict(self.metadata))
        for comp, path, mod in self.modules():
            out.add(comp, path, mod.astype(dtype))
        return out

    def scaled(self, weight: float) -> "LoraState":
        """The same LoRA with its effect multiplied by ``weight`` (the up matrices are scaled)."""
        out = LoraState(architecture=self.architecture, base_config=dict(self.base_config),
                        metadata=dict(self.metadata))
        for comp, path, mod in self.modules():
            out.add(comp, path, mod.scaled(weight))
        return out


def __getattr__(name: str):
    if name == "COMPONENTS":  # every installed architecture's component names, asked when used (plugins import it)
        from mindone_lora_plugin.architectures import known_components

        return known_components()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def component_order(name: str) -> tuple[int, str]:
    """Sort key of component names: the installed architectures' declared order, then by name."""
    from mindone_lora_plugin.architectures import known_components

    known = known_components()
    return (known.index(name) if name in known else len(known), name)


def most_common(counter: Counter):
    """The most common value; ties go to the largest value (deterministic)."""
    if not counter:
        return None
    best = max(counter.values())
    return max(v for v, c in counter.items() if c == best)
