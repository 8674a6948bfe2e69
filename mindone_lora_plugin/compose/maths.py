"""Exact numpy maths on LoRAs: per-module deltas, weighted sums, rank concatenation."""

from __future__ import annotations

import json

import numpy as np

from mindone_lora_plugin.compose.specs import WeightedLora, _arch_of, _pairs
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.state import LoraModule, LoraState


def _f64(arr) -> np.ndarray:
    """``arr`` as float64; bfloat16 arrays of any origin (ml_dtypes' or MindSpore's numpy type) included."""
    from mindone_lora_plugin.dtypes import as_dtype

    return as_dtype(np.asarray(arr), np.float64)


def module_delta(mod: LoraModule, base_weight=None) -> np.ndarray:
    """The module's weight change (its algorithm's: ``scale * up @ down`` for plain LoRA) in the base weight's
    layout, in float64 (exact up to rounding). ``base_weight`` is needed by algorithms whose change depends on it."""
    return mod.algo.delta(mod, base_weight).reshape(mod.base_shape())


def grouped_modules(loras) -> dict[tuple[str, str], list[tuple[LoraModule, float]]]:
    """``(component, module path) → [(module, weight)]`` over ``loras``, in their order."""
    groups: dict[tuple[str, str], list[tuple[LoraModule, float]]] = {}
    for state, weight in _pairs(loras):
        for comp, path, mod in state.modules():
            groups.setdefault((comp, path), []).append((mod, weight))
    return groups


def module_shape(parts) -> tuple[int, ...]:
    """The base weight's shape that ``parts`` (``[(module, weight)]``) imply: the most specific one, since a module can
    know a conv only flattened (a LoHa's ``[out, in·k·k]``) where another knows it whole (LoCon's ``[out, in, k, k]``).
    """
    return max((tuple(mod.base_shape()) for mod, _ in parts), key=len)


def module_change(comp: str, path: str, parts, base_weight=None) -> np.ndarray:
    """``sum of weight * delta`` of one module over ``parts`` (``[(module, weight)]``), in float64.

    Every part's change is taken from the same ``base_weight`` (the base model's own), so the order does not matter;
    a part whose algorithm depends on the base weight (DoRA) changes it by ``merged_weight(base, weight) - base``.
    """
    out = None
    for mod, weight in parts:
        if mod.algo.needs_base_weight(mod):
            if base_weight is None:
                raise LoraError(f"{comp}.{path} is a {mod.algo.label(mod)} module, whose change depends on the base "
                                "model's weight, and no base model was given; pass the base model the LoRA was made "
                                "for (--model MODEL_DIR)")
            d = mod.algo.merged_weight(mod, base_weight, weight) - _f64(base_weight)
        else:
            d = module_delta(mod) * weight
        if out is None:
            out = d
        elif out.size != d.size:
            raise LoraError(f"the LoRAs disagree about the shape of {comp}.{path} ({list(out.shape)} vs "
                            f"{list(d.shape)}); they were made for different base models")
        else:
            out = out + d.reshape(out.shape)
    return out.reshape(module_shape(parts))


def combined_deltas(loras, base_weights=None) -> dict[tuple[str, str], np.ndarray]:
    """``(component, module path) → sum of weight * delta`` over ``loras``, in float64 (see :func:`module_change`).

    ``base_weights`` (anything with ``.get((component, path))`` → array or None: a dict, or
    :class:`~mindone_lora_plugin.compose.folders.FolderWeights`) serves algorithms whose change depends on the base
    weight (DoRA); it is asked only for those modules.
    """
    return {key: _looked_up_change(key, parts, base_weights) for key, parts in grouped_modules(loras).items()}


def _looked_up_change(key: tuple[str, str], parts, base_weights) -> np.ndarray:
    needs = any(m.algo.needs_base_weight(m) for m, _ in parts)
    base = base_weights.get(key) if needs and base_weights is not None else None
    return module_change(key[0], key[1], parts, base)


def concat_loras(loras, dtype=np.float32) -> LoraState:
    """One LoRA whose every module equals the weighted sum of ``loras`` — exactly, without SVD.

    For each module the down matrices are stacked (rank = sum of the ranks) and each LoRA's ``weight * alpha / rank``
    is folded into its up matrix; the combined alpha is the combined rank, so the combined scale is 1. Modules only
    some LoRAs adapt keep only those LoRAs' parts. The result is in ``dtype`` (float32 unless asked otherwise).
    """
    pairs = _pairs(loras)
    if not pairs:
        raise LoraError("no LoRA to combine")
    others = sorted({m.algo.label(m) for s, _ in pairs for _, _, m in s.modules()} - {"lora"})
    if others:
        dora = " (and --model MODEL_DIR: DoRA's change depends on the base weight)" if "lora+dora" in others else ""
        raise LoraError(f"only plain LoRA concatenates exactly into a LoRA, but these hold {', '.join(others)} "
                        f"modules; pass --rank N{dora} to reduce the merged weight changes to a LoRA of rank N by SVD")
    arch = _arch_of(pairs)
    groups = grouped_modules(pairs)
    out = LoraState(architecture=arch, base_config=next((s.base_config for s, _ in pairs if s.base_config), {}))
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
    approximation error ``‖ΔW − ΔW_r‖_F / ‖ΔW‖_F`` over all modules. ``base_weights`` as for :func:`combined_deltas`
    (needed by DoRA modules).

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
    out = LoraState(architecture=arch, base_config=next((s.base_config for s, _ in pairs if s.base_config), {}))
    err2 = tot2 = 0.0
    for (comp, path), parts in sorted(grouped_modules(pairs).items()):  # one module's change in memory at a time
        delta = _looked_up_change((comp, path), parts, base_weights)
        shape = module_shape(parts)
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
