"""Exact fuse/split of LoRAs on fused Linears (FLUX's ``qkv`` and ``linear1``) — plain LoRA only.

A fused Linear stacks parts on its output axis: ``W = [W_1; W_2; ...]`` with ``W_i`` of shape ``[out_i, in]``.

**Split** a fused LoRA (``down [R, in]``, ``up [sum out_i, R]``, alpha ``a``, scale ``s = a / R``):

* in general (a dense ``up``) each part keeps the shared ``down`` and its rows of ``up``: rank ``R``, alpha ``a``
  — what diffusers' converter does;
* when ``up`` is block-diagonal — every column of ``up`` is non-zero in the rows of one part only, as in the files
  :func:`fuse` writes and kohya's ``split_qkv`` files — part ``i`` gets only its columns: the matching rows of
  ``down`` and columns of ``up``, rank ``r_i`` = its column count, alpha ``s * r_i`` (same scale). A part whose rows
  are all zero then has no columns and no module (its weight change is exactly zero); an all-zero ``up`` (a LoRA not
  trained yet) is cut into ``n`` equal column blocks when ``R`` divides, else split densely.

Either way ``part_i.delta == fused.delta[rows of part i]`` exactly (the same products).

**Fuse** part LoRAs (``down_i [r_i, in]``, ``up_i [out_i, r_i]``, scale ``s_i = alpha_i / r_i``) into one:

* when every part has the same ``down`` and the same scale (a dense split of one fused LoRA): ``down`` shared,
  ``up = [up_1; up_2; ...]``, rank ``r``, alpha unchanged — the split's exact inverse;
* otherwise ``down = [down_1; down_2; ...]`` (``[sum r_i, in]``), ``up`` block-diagonal ``[sum out_i, sum r_i]``
  with ``up_i`` in block ``(i, i)``: **rank = the sum of the parts' ranks**; alpha ``= s * sum r_i`` where ``s`` is
  the most common part scale, and a part whose scale differs has ``s_i / s`` folded into its ``up`` block (its
  tensors are not the part's any more). A folded ``up`` is kept in float32 (float64 for a float64 source) whatever
  the parts' dtype: folded into float16 or bfloat16 it would be off by up to 2e-4 relative, in float32 by 6e-8 at
  most. A missing part is a block of zero rows.

DoRA modules whose magnitude normalises output rows (peft's ``lora_magnitude_vector``, LyCORIS ``dora_scale``
``[out, 1]``) are row-separable too: ``W'_rows = m_rows * (W + dW)_rows / ||(W + dW)_rows||`` row by row, so each
part takes its rows of the magnitude and fusing concatenates them (every part must then be DoRA and present: a
missing part's magnitude would be its base rows' norms). Modules of other algorithms (LoHa, LoKr, input-column DoRA
...) are refused in both directions with one :class:`~mindone_lora_plugin.errors.LoraError` line naming the module.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.state import LoraModule, most_common


def _plain(mod: LoraModule, where: str, what: str) -> None:
    """Refuse a module whose weight change is not a stack of separable output rows (plain LoRA, output-row DoRA)."""
    rows = mod.algorithm == "lora" and (set(mod.tensors) == {"down", "up"} or (
        set(mod.tensors) == {"down", "up", "magnitude"} and _dora_axis(mod) == "out"))
    if not rows:
        label = mod.algo.label(mod) if mod.algorithm == "lora" else mod.algorithm
        if mod.algorithm == "lora" and "magnitude" in mod.tensors:
            label += " (input-column magnitude)"
        fix = ("write the LoRA in the diffusers format (--save_formats/--to diffusers), which keeps every module "
               "separate" if mod.algorithm == "lora" else
               "the diffusers format holds plain LoRA only, so train plain LoRA on these modules (--lora_algo lora) "
               "or leave the fused q/k/v/proj_mlp modules out of --lora_targets")
        raise LoraError(f"{where} is a {label} module, whose weight change cannot be {what} exactly (only plain LoRA "
                        f"and output-row DoRA can); {fix}")
    if np.ndim(mod.down) != 2:
        raise LoraError(f"{where}: a fused FLUX module is a Linear, but this LoRA is {np.ndim(mod.down)}-D; the file "
                        "is corrupted")


def _dora_axis(mod) -> str:
    from mindone_lora_plugin.algorithms.lora import dora_axis

    return dora_axis(mod)


def _make(down, up, alpha, magnitude=None) -> LoraModule:
    if magnitude is None:
        return LoraModule(down, up, alpha)
    return LoraModule(algorithm="lora", tensors={"down": down, "up": up, "magnitude": magnitude}, alpha=alpha,
                      settings={"dora_axis": "out"})


def _f64(x) -> np.ndarray:
    from mindone_lora_plugin.algorithms.base import as_f64

    return as_f64(x)


def _like(value: np.ndarray, ref, exact: bool = False) -> np.ndarray:
    """``value`` (float64) in ``ref``'s float dtype (bfloat16 included; float32 for non-float ``ref``); with
    ``exact``, in float32 at least (float64 stays float64), so that products folded into ``value`` keep their
    precision."""
    from mindone_lora_plugin.dtypes import as_dtype

    dtype = np.asarray(ref).dtype
    if not (dtype.kind == "f" or dtype.name == "bfloat16") or (exact and dtype.itemsize < 4):
        dtype = np.dtype(np.float32)
    return as_dtype(value, dtype)


def _column_owners(up: np.ndarray, sizes: list[int]) -> list[set[int]]:
    bounds = np.cumsum([0] + list(sizes))
    nz = [np.any(up[bounds[i]:bounds[i + 1]] != 0, axis=0) for i in range(len(sizes))]
    return [{i for i in range(len(sizes)) if nz[i][c]} for c in range(up.shape[1])]


def split(mod: LoraModule, sizes, where: str, *, dense: bool = False) -> list[LoraModule | None]:
    """The part LoRAs of a fused LoRA whose output rows are ``sizes`` (see the module docstring); ``None`` for a part
    with an exactly zero weight change (block-diagonal case only). ``dense=True`` always gives the dense split."""
    _plain(mod, where, "split into its parts")
    sizes = [int(s) for s in sizes]
    up, down = np.asarray(mod.up), np.asarray(mod.down)
    if up.shape[0] != sum(sizes):
        raise LoraError(f"{where}: its lora_up has {up.shape[0]} rows but the fused module's parts have "
                        f"{'+'.join(map(str, sizes))} = {sum(sizes)}; the LoRA was made for another FLUX model")
    bounds = np.cumsum([0] + sizes)
    rank, scale = mod.rank, mod.scale
    magnitude = mod.tensors.get("magnitude")
    columns = None if dense else _block_columns(up, sizes, rank)
    out: list[LoraModule | None] = []
    for i in range(len(sizes)):
        rows = slice(int(bounds[i]), int(bounds[i + 1]))
        mag = None if magnitude is None else np.asarray(magnitude)[rows]
        if columns is None:
            out.append(_make(down, up[rows], mod.alpha, mag))
        elif not columns[i]:
            if mag is not None:  # DoRA rows without a weight change still carry their magnitude
                out.append(_make(down[:1], np.zeros((rows.stop - rows.start, 1), up.dtype), scale, mag))
            else:
                out.append(None)
        else:
            cols = np.asarray(columns[i])
            out.append(_make(down[cols], up[rows][:, cols], scale * len(cols), mag))
    return out


def _block_columns(up: np.ndarray, sizes: list[int], rank: int) -> list[list[int]] | None:
    """The columns of ``up`` owned by each part when ``up`` is block-diagonal, else None (split densely)."""
    owners = _column_owners(up, sizes)
    if any(len(o) > 1 for o in owners):
        return None
    if all(not o for o in owners):  # all zero: equal blocks when they fit
        n = len(sizes)
        if rank % n:
            return None
        k = rank // n
        return [list(range(i * k, (i + 1) * k)) for i in range(n)]
    columns: list[list[int]] = [[] for _ in sizes]
    last = next(next(iter(o)) for o in owners if o)
    for c, o in enumerate(owners):  # an all-zero column joins the part of the non-zero column before it
        last = next(iter(o)) if o else last
        columns[last].append(c)
    return columns


def fuse(parts, sizes, where: str) -> LoraModule:
    """One LoRA on the fused Linear from ``parts`` (a LoraModule or None per part, in output-row order) whose
    output rows are ``sizes``; see the module docstring for how ranks and alphas combine."""
    present = [(i, m) for i, m in enumerate(parts) if m is not None]
    if not present:
        raise ValueError("fuse() needs at least one part")
    for i, m in present:
        _plain(m, f"{where} (part {i + 1} of {len(parts)})", "fused with the other parts of the fused module")
    sizes = [int(s) for s in sizes]
    for i, m in present:
        if m.up.shape[0] != sizes[i]:
            raise LoraError(f"{where}: part {i + 1} has {m.up.shape[0]} output rows, the fused module's part has "
                            f"{sizes[i]}; the LoRA was made for another FLUX model")
    ins = {int(m.down.shape[1]) for _, m in present}
    if len(ins) > 1:
        raise LoraError(f"{where}: its parts have different input widths {sorted(ins)}; they are not parts of one "
                        "fused module")
    first = present[0][1]
    doras = sum("magnitude" in m.tensors for _, m in present)
    magnitude = None
    if doras:
        if doras != len(parts):
            which = "some of its parts are" if doras < len(present) else "a part is missing and the others are"
            raise LoraError(f"{where}: {which} DoRA modules; a fused DoRA module needs a magnitude for every part: "
                            "train all of its parts with DoRA, or write the diffusers format")
        magnitude = np.concatenate([np.asarray(m.tensors["magnitude"]).reshape(
            (-1,) + np.shape(first.tensors["magnitude"])[1:]) for m in parts], axis=0)
    if len(present) == len(parts) and all(
            m.scale == first.scale and np.array_equal(np.asarray(m.down), np.asarray(first.down)) for _, m in present):
        up = np.concatenate([np.asarray(m.up) for m in parts], axis=0)
        return _make(np.asarray(first.down), up, first.alpha, magnitude)
    scale = most_common(Counter(m.scale for _, m in present))
    total = sum(m.rank for _, m in present)
    down = np.concatenate([_f64(m.down) for _, m in present], axis=0)
    up = np.zeros((sum(sizes), total), dtype=np.float64)
    bounds = np.cumsum([0] + sizes)
    col = 0
    for i, m in present:
        block = _f64(m.up)
        if m.scale != scale:
            block = block * (m.scale / scale)
        up[int(bounds[i]):int(bounds[i + 1]), col:col + m.rank] = block
        col += m.rank
    folded = any(m.scale != scale for _, m in present)
    return _make(_like(down, first.down), _like(up, first.up, exact=folded), scale * total, magnitude)


def swap_halves(mod: LoraModule, where: str) -> LoraModule:
    """``mod`` with its two output halves swapped (BFL's shift/scale ⇄ diffusers' scale/shift): rows of ``up`` and of
    an output-row DoRA magnitude; exact (a row permutation)."""
    _plain(mod, where, "reordered (shift/scale halves swapped)")
    up = np.asarray(mod.up)
    half = up.shape[0] // 2
    mag = mod.tensors.get("magnitude")
    if mag is not None:
        mag = np.asarray(mag)
        mag = np.concatenate([mag[half:], mag[:half]], axis=0)
    return _make(np.asarray(mod.down), np.concatenate([up[half:], up[:half]], axis=0), mod.alpha, mag)
