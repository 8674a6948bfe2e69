"""Weighted LoRAs on live mindone models: one PEFT adapter per LoRA, fusing into the base weights."""

from __future__ import annotations

import warnings

import numpy as np

from mindone_lora_plugin.compose._constants import ADAPTER_PREFIX
from mindone_lora_plugin.compose.maths import _f64, combined_deltas
from mindone_lora_plugin.compose.specs import _arch_of, _pairs
from mindone_lora_plugin.errors import LoraError


def apply_loras(models, loras, prefix: str = ADAPTER_PREFIX) -> list[str]:
    """Add one PEFT adapter per LoRA to ``models`` (a :class:`~mindone_lora_plugin.models.Models`), all active at once.

    Every module keeps its own rank and alpha; the LoRA's weight is folded into the adapter's scaling
    (``weight * alpha / rank``), as mindone's ``set_adapters(names, weights)`` does. Text-encoder LoRAs are applied to
    the text encoders. Adapters already active stay active. Returns the adapter names (``lora0``, ``lora1``, …; the
    next free numbers when some exist). Change weights later with :func:`set_lora_weights`.

    Modules of other algorithms (LoHa, LoKr, ...; PEFT adapters hold only plain LoRA) are fused into the base weights
    at their weight instead (:func:`merge_into_models`), so files of mixed algorithms generate together;
    :func:`set_lora_weights` does not reach those.
    """
    import mindspore as ms

    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.strategies.base import LoraStrategy, adaptable_layers

    pairs = _pairs(loras)
    for state, _ in pairs:
        for comp in state.components:
            if comp not in models:
                raise LoraError(f"the LoRA has weights for {comp} but the model has no {comp}: it was made for "
                                f"another architecture ({state.architecture or 'unknown'} vs {models.architecture})")
    pairs, fused = _split_plain(pairs)
    if fused:
        merge_into_models(models, fused)
    used = set()
    for cell in models.values():
        used |= set(getattr(cell, "peft_config", None) or {})
    names, i = [], 0
    for _ in pairs:
        while f"{prefix}{i}" in used:
            i += 1
        names.append(f"{prefix}{i}")
        used.add(names[-1])
    before = {comp: {p: list(layer.active_adapters) for p, layer in peft_layers(cell)}
              for comp, cell in models.items()}
    strategy = LoraStrategy()
    for name, (state, weight) in zip(names, pairs):
        for comp, modules in state.components.items():
            if not modules:
                continue
            cell = models[comp]
            targets = {p: (m.rank, float(m.alpha)) for p, m in modules.items()}
            unknown = sorted(set(targets) - {p for p, _ in adaptable_layers(cell)})
            if unknown:
                raise LoraError(f"{len(unknown)} LoRA module(s) match no Linear/Conv2d of the {comp}, e.g. "
                                f"{', '.join(unknown[:3])}; the LoRA was made for another model")
            with warnings.catch_warnings():  # "Already found a peft_config": several adapters is the point here
                warnings.filterwarnings("ignore", message=".*peft_config.*")
                cell.add_adapter(strategy.lora_config(targets, LoraOptions(init="default")), adapter_name=name)
            layers = dict(peft_layers(cell))
            for path, mod in modules.items():
                layer = layers.get(path)
                if layer is None or name not in layer.lora_A:
                    raise LoraError(f"could not add a LoRA adapter to {comp}.{path}")
                if int(layer.r[name]) != mod.rank:
                    raise LoraError(f"{comp}.{path}: adapter rank {layer.r[name]} but the LoRA has rank {mod.rank}")
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                down, up = _fit(mod.down, a.shape, comp, path), _fit(mod.up, b.shape, comp, path)
                a.set_data(ms.Tensor(down.astype(np.float32), dtype=a.dtype))
                b.set_data(ms.Tensor(up.astype(np.float32), dtype=b.dtype))
                layer.lora_alpha[name] = float(mod.alpha)
                layer.scaling[name] = float(weight) * float(mod.alpha) / mod.rank
    for comp, cell in models.items():
        for path, layer in peft_layers(cell):
            keep = [n for n in before[comp].get(path, []) if n in layer.lora_A]
            layer.set_adapter(keep + [n for n in names if n in layer.lora_A and n not in keep])
            for n in names:  # set_adapter marks active adapters trainable; these are for inference
                if n in layer.lora_A:
                    layer.lora_A[n].weight.requires_grad = False
                    layer.lora_B[n].weight.requires_grad = False
    return names


def peft_layers(cell):
    """``(path, layer)`` of the mindone.peft LoRA layers of ``cell`` (named adapters live there; other algorithms'
    layers hold one adapter each and are left alone)."""
    from mindone_lora_plugin.models import is_peft_lora_layer, lora_layers

    return [(p, layer) for p, layer in lora_layers(cell) if is_peft_lora_layer(layer)]


def _split_plain(pairs):
    """``(plain-LoRA parts, other algorithms' parts)`` of weighted states, each a list of ``(state, weight)``."""
    from mindone_lora_plugin.state import LoraState

    plain, other = [], []
    for state, weight in pairs:
        parts = {}
        for comp, path, mod in state.modules():
            key = "lora" if mod.algorithm == "lora" and not mod.algo.needs_base_weight(mod) else "other"
            if key not in parts:
                parts[key] = LoraState(architecture=state.architecture, base_config=state.base_config,
                                       metadata=state.metadata)
            parts[key].add(comp, path, mod)
        plain.append((parts.get("lora", LoraState(architecture=state.architecture)), weight))
        if "other" in parts:
            other.append((parts["other"], weight))
    return plain, other


def _fit(arr, shape, comp, path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind == "V" or arr.dtype.name == "bfloat16":
        from mindone_lora_plugin.dtypes import as_dtype

        arr = as_dtype(arr, np.float32)
    if tuple(arr.shape) != tuple(shape):
        if arr.size != int(np.prod(shape)):
            raise LoraError(f"shape mismatch at {comp}.{path}: the LoRA has {list(arr.shape)} but the model expects "
                            f"{list(shape)}")
        arr = arr.reshape(tuple(shape))
    return arr


def set_lora_weights(models, weights: dict[str, float]) -> None:
    """Change the weight of adapters added by :func:`apply_loras` (``{"lora0": 0.5, "lora1": -1.0}``)."""

    found = set()
    for cell in models.values():
        for _, layer in peft_layers(cell):
            for name, w in weights.items():
                if name in layer.lora_A:
                    layer.scaling[name] = float(w) * float(layer.lora_alpha[name]) / int(layer.r[name])
                    found.add(name)
    missing = sorted(set(weights) - found)
    if missing:
        raise LoraError(f"no adapter named {', '.join(missing)} in these models")


def active_deltas(models) -> dict[tuple[str, str], np.ndarray]:
    """``(component, module path) → sum over the active adapters of scaling * B @ A`` as the models hold them
    (float64): what the adapters add to each base weight."""
    from mindone_lora_plugin.models import base_layer_of

    out = {}
    for comp, cell in models.items():
        for path, layer in peft_layers(cell):
            shape = tuple(base_layer_of(layer).weight.shape)
            total = np.zeros(shape, np.float64)
            for name in layer.active_adapters:
                if name not in layer.lora_A:
                    continue
                a = _f64(layer.lora_A[name].weight.asnumpy())
                b = _f64(layer.lora_B[name].weight.asnumpy())
                d = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1) * float(layer.scaling[name])
                total += d.reshape(shape)
            out[(comp, path)] = total
    return out


def merge_into_models(models, loras) -> None:
    """Fuse ``loras`` into the base weights of live ``models``: ``W += sum(weight * delta)`` (float64, cast back).

    Adapters already on the models are left as they are (only their base weights change).
    """
    import mindspore as ms

    from mindone_lora_plugin.models import base_layer_of

    pairs = _pairs(loras)
    for comp in {c for s, _ in pairs for c in s.components}:
        if comp not in models:
            raise LoraError(f"the LoRA has weights for {comp} but the model has no {comp}: it was made for another "
                            f"architecture ({_arch_of(pairs) or 'unknown'} vs {models.architecture})")
    cells = {comp: dict(cell.cells_and_names()) for comp, cell in models.items()}
    bases = {}
    for state, _ in pairs:
        for comp, path, mod in state.modules():
            layer = cells.get(comp, {}).get(path)
            if mod.algo.needs_base_weight(mod) and layer is not None:
                bases[(comp, path)] = _f64(base_layer_of(layer).weight.asnumpy())
    deltas = combined_deltas(pairs, bases)
    for (comp, path), delta in deltas.items():
        layer = cells[comp].get(path)
        weight = getattr(base_layer_of(layer), "weight", None) if layer is not None else None
        if weight is None:
            raise LoraError(f"{comp}.{path} is not a module with a weight in this model; the LoRA was made for "
                            f"another model")
        w = _f64(weight.asnumpy())
        if delta.size != w.size:
            raise LoraError(f"shape mismatch at {comp}.{path}: the base weight is {list(w.shape)} but the LoRA "
                            f"implies {list(delta.shape)}; the LoRA was made for another base model")
        weight.set_data(ms.Tensor((w + delta.reshape(w.shape)).astype(np.float32), dtype=weight.dtype))
