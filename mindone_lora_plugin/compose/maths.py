"""Exact numpy maths on LoRAs: per-module deltas, weighted sums, rank concatenation."""

from __future__ import annotations

import json

import numpy as np

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.state import LoraModule, LoraState
from mindone_lora_plugin.compose.specs import WeightedLora, _arch_of, _pairs


def _f64(arr) -> np.ndarray:
    """``arr`` as float64; bfloat16 arrays of any origin (ml_dtypes' or MindSpore's numpy type) included."""
    from mindone_lora_plugin.formats.hashes import as_dtype

    return as_dtype(np.asarray(arr), np.float64)


def module_delta(mod: LoraModule) -> np.ndarray:
    """``scale * up @ down`` in the base weight's layout, in float64 (exact up to rounding)."""
    up = _f64(mod.up).reshape(mod.up.shape[0], -1)
    down = _f64(mod.down).reshape(mod.rank, -1)
    return ((up @ down) * float(mod.scale)).reshape(mod.base_shape())


def combined_deltas(loras) -> dict[tuple[str, str], np.ndarray]:
    """``(component, module path) → sum of weight * delta`` over ``loras``, in float64."""
    out: dict[tuple[str, str], np.ndarray] = {}
    for state, weight in _pairs(loras):
        for comp, path, mod in state.modules():
            d = module_delta(mod) * weight
            key = (comp, path)
            if key in out:
                prev = out[key]
                if prev.size != d.size:
                    raise LoraError(f"the LoRAs disagree about the shape of {comp}.{path} ({list(prev.shape)} vs "
                                    f"{list(d.shape)}); they were made for different base models")
                out[key] = prev + d.reshape(prev.shape)
            else:
                out[key] = d
    return out


def concat_loras(loras, dtype=np.float32) -> LoraState:
    """One LoRA whose every module equals the weighted sum of ``loras`` — exactly, without SVD.

    For each module the down matrices are stacked (rank = sum of the ranks) and each LoRA's ``weight * alpha / rank``
    is folded into its up matrix; the combined alpha is the combined rank, so the combined scale is 1. Modules only
    some LoRAs adapt keep only those LoRAs' parts. The result is in ``dtype`` (float32 unless asked otherwise).
    """
    pairs = _pairs(loras)
    if not pairs:
        raise LoraError("no LoRA to combine")
    arch = _arch_of(pairs)
    groups: dict[tuple[str, str], list[tuple[LoraModule, float]]] = {}
    for state, weight in pairs:
        for comp, path, mod in state.modules():
            groups.setdefault((comp, path), []).append((mod, weight))
    lpb = next((s.unet_layers_per_block for s, _ in pairs if s.unet_layers_per_block), None)
    out = LoraState(architecture=arch, unet_layers_per_block=lpb)
    for (comp, path), parts in groups.items():
        conv = any(m.down.ndim == 4 for m, _ in parts)
        downs, ups = [], []
        for mod, weight in parts:
            down, up = _f64(mod.down), _f64(mod.up)
            if conv and down.ndim == 2:
                down = down[:, :, None, None]
            if conv and up.ndim == 2:
                up = up[:, :, None, None]
            if not conv and up.ndim == 4:
                up = up.reshape(up.shape[0], up.shape[1])
            if downs and (down.shape[1:] != downs[0].shape[1:] or up.shape[0] != ups[0].shape[0]):
                raise LoraError(f"the LoRAs disagree about the shape of {comp}.{path} (down {list(downs[0].shape)} vs "
                                f"{list(down.shape)}); they were made for different base models")
            downs.append(down)
            ups.append(up * (mod.scale * weight))
        down = np.concatenate(downs, axis=0)
        up = np.concatenate(ups, axis=1)
        out.add(comp, path, LoraModule(down.astype(dtype), up.astype(dtype), float(down.shape[0])))
    out.metadata["mindone_lora_concatenated_from"] = json.dumps(
        [{"name": lo.name if isinstance(lo, WeightedLora) else f"lora{i}", "weight": w}
         for i, (lo, (_, w)) in enumerate(zip(_as_list(loras), pairs))])
    return out


def _as_list(loras) -> list:
    return [loras] if isinstance(loras, (LoraState, WeightedLora)) else list(loras)
