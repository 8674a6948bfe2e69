"""Exact numpy maths on LoRAs: per-module deltas, weighted sums, rank concatenation."""

from __future__ import annotations

import json

import numpy as np

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.state import LoraModule, LoraState
from mindone_lora_plugin.compose.specs import WeightedLora, _arch_of, _pairs


def _f64(arr) -> np.ndarray:
    """``arr`` as float64; bfloat16 arrays of any origin (ml_dtypes' or MindSpore's numpy type) included."""
    from mindone_lora_plugin.dtypes import as_dtype

    return as_dtype(np.asarray(arr), np.float64)


def module_delta(mod: LoraModule, base_weight=None) -> np.ndarray:
    """The module's weight change (its algorithm's: ``scale * up @ down`` for plain LoRA) in the base weight's
    layout, in float64 (exact up to rounding). ``base_weight`` is needed by algorithms whose change depends on it."""
    return mod.algo.delta(mod, base_weight).reshape(mod.base_shape())


def combined_deltas(loras, base_weights=None) -> dict[tuple[str, str], np.ndarray]:
    """``(component, module path) → sum of weight * delta`` over ``loras``, in float64.

    ``base_weights`` (``(component, path) → array``) serves algorithms whose change depends on the base weight (DoRA):
    such a module's delta is ``merged_weight(base, weight) - base``.
    """
    out: dict[tuple[str, str], np.ndarray] = {}
    for state, weight in _pairs(loras):
        for comp, path, mod in state.modules():
            algo = mod.algo
            if algo.needs_base_weight(mod):
                base = (base_weights or {}).get((comp, path))
                if base is None:
                    raise LoraError(f"{comp}.{path} is a {mod.algorithm} module whose change depends on the base "
                                    "weight; merge it into a model (pass the base model)")
                d = algo.merged_weight(mod, base, weight) - _f64(base)
            else:
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
    others = sorted({m.algorithm for s, _ in pairs for _, _, m in s.modules()} - {"lora"})
    if others:
        raise LoraError(f"only plain LoRA concatenates exactly into a LoRA, but these hold {', '.join(others)} "
                        "modules; pass --rank N to reduce the merged weight changes to a LoRA of rank N by SVD")
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


def svd_reduce(loras, rank: int, dtype=np.float32, base_weights=None) -> tuple[LoraState, float]:
    """One plain LoRA of rank ``rank`` approximating the weighted sum of ``loras`` (any algorithms), and the relative
    approximation error ``‖ΔW − ΔW_r‖_F / ‖ΔW‖_F`` over all modules.

    As kohya's ``networks/svd_merge_lora.py``: each module's merged weight change (convs flattened to
    ``[out, in·k·k]``) is factored by SVD and cut to ``rank`` (or less where the matrix is smaller); ``up = U_r S_r``,
    ``down = V_r^T`` (reshaped to ``[r, in, k, k]`` for convs, up ``[out, r, 1, 1]``) and ``alpha = r`` (scale 1).
    """
    if rank < 1:
        raise LoraError(f"--rank must be at least 1, got {rank}")
    pairs = _pairs(loras)
    if not pairs:
        raise LoraError("no LoRA to combine")
    arch = _arch_of(pairs)
    lpb = next((s.unet_layers_per_block for s, _ in pairs if s.unet_layers_per_block), None)
    out = LoraState(architecture=arch, unet_layers_per_block=lpb)
    shapes = {(c, p): m.base_shape() for s, _ in pairs for c, p, m in s.modules()}
    err2 = tot2 = 0.0
    for (comp, path), delta in sorted(combined_deltas(pairs, base_weights).items()):
        shape = shapes[(comp, path)]
        mat = delta.reshape(shape[0], -1)
        u, sv, vt = np.linalg.svd(mat, full_matrices=False)
        r = min(rank, len(sv))
        up, down = u[:, :r] * sv[:r], vt[:r]
        err2 += float(np.sum(sv[r:] ** 2))
        tot2 += float(np.sum(sv ** 2))
        if len(shape) == 4:
            down, up = down.reshape((r,) + tuple(shape[1:])), up.reshape(shape[0], r, 1, 1)
        out.add(comp, path, LoraModule(down.astype(dtype), up.astype(dtype), float(r)))
    out.metadata["mindone_lora_svd_rank"] = str(rank)
    return out, (err2 / tot2) ** 0.5 if tot2 > 0 else 0.0
