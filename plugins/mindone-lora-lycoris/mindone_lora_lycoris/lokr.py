"""LoKr (LyCORIS ``lokr``): ``ΔW = w1 ⊗ w2 × scale``, a Kronecker product of a small and a large factor.

Each dimension is split into two factors by LyCORIS's rule (:func:`factorization`; ``factor`` −1 = as square as
possible): ``out = a·b``, ``in = c·d``; ``w1`` is ``[a, c]`` and ``w2`` is ``[b, d(·k·k)]``. With the defaults
(``decompose_both`` off) ``w1`` is stored full (``lokr_w1``) and ``w2`` as ``lokr_w2_a @ lokr_w2_b`` (``[b, r]``,
``[r, d·k·k]``) unless ``r ≥ max(b, d) / 2``, where LyCORIS stores it full (``lokr_w2``, conv: ``[b, d, k, k]``).
The scale is ``alpha / r``, except when both factors are full: then it is 1 whatever alpha the file holds (LyCORIS
ignores alpha there, and reads ``r`` from ``lokr_w1_a`` or else ``lokr_w2_a``). Initialisation as LyCORIS: ``w1``
and ``w2_a`` kaiming-uniform, ``w2_b`` (or a full ``w2``) zero.
"""

from __future__ import annotations

import numpy as np

from mindone_lora_lycoris.common import LycorisAlgorithm
from mindone_lora_lycoris.loha import _dropouts
from mindone_lora_plugin.algorithms.base import as_f64, kaiming_uniform
from mindone_lora_plugin.errors import LoraError

NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = dimension`` and ``m ≤ n``: ``m = factor`` when it divides, else the most square split
    with ``m ≤ factor`` (LyCORIS's rule, e.g. 128 → (8, 16), 127 → (1, 127), 360 → (18, 20))."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        cand = m + 1
        while dimension % cand:
            cand += 1
        if cand + dimension // cand > m + n or cand > limit:
            break
        m, n = cand, dimension // cand
    return (n, m) if m > n else (m, n)


def _factor(t: dict, name: str) -> np.ndarray:
    """``w1`` or ``w2`` as a 2-D float64 matrix (a decomposed factor multiplied out; conv kernels flattened)."""
    if name in t:
        w = as_f64(t[name])
        return w.reshape(w.shape[0], -1)
    return as_f64(t[name + "_a"]) @ as_f64(t[name + "_b"]).reshape(t[name + "_b"].shape[0], -1)


class LokrAlgorithm(LycorisAlgorithm):
    name = "lokr"
    description = "LyCORIS LoKr: delta W = kron(w1, w2_a @ w2_b) * alpha / rank (factor -1); kohya/LyCORIS files"
    roles = ()
    optional_roles = NAMES
    kohya_names = {n: n for n in NAMES}
    up_roles = ("lokr_w2_b", "lokr_w2")

    def claims(self, roles) -> bool:
        roles = set(roles)
        w1 = ("lokr_w1" in roles) != ({"lokr_w1_a", "lokr_w1_b"} <= roles)
        w2 = ("lokr_w2" in roles) != ({"lokr_w2_a", "lokr_w2_b"} <= roles)
        return roles <= set(NAMES) and w1 and w2

    def rank(self, mod) -> int:
        for name in ("lokr_w1_a", "lokr_w2_a"):
            if name in mod.tensors:
                return int(mod.tensors[name].shape[1])
        return 1

    def full(self, mod) -> bool:
        return "lokr_w1" in mod.tensors and "lokr_w2" in mod.tensors

    def scale(self, mod) -> float:
        return 1.0 if self.full(mod) else float(mod.alpha) / self.rank(mod)

    def _shapes(self, mod) -> tuple[tuple[int, int], tuple[int, int]]:
        t = mod.tensors
        w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = (t["lokr_w2"].shape[0], int(np.prod(t["lokr_w2"].shape[1:])))
        else:
            w2 = (t["lokr_w2_a"].shape[0], int(np.prod(t["lokr_w2_b"].shape[1:])))
        return (int(w1[0]), int(w1[1])), (int(w2[0]), int(w2[1]))

    def flat_shape(self, mod) -> tuple[int, int]:
        (a, c), (b, d) = self._shapes(mod)
        return a * b, c * d

    def base_shape(self, mod) -> tuple[int, ...]:
        t = mod.tensors
        if "lokr_w2" in t and np.ndim(t["lokr_w2"]) == 4 and not mod.settings.get("shape"):
            (a, c), _ = self._shapes(mod)
            w2 = t["lokr_w2"].shape
            return (a * w2[0], c * w2[1]) + tuple(int(s) for s in w2[2:])
        return super().base_shape(mod)

    def delta(self, mod, base_weight=None) -> np.ndarray:
        t = mod.tensors
        d = np.kron(_factor(t, "lokr_w1"), _factor(t, "lokr_w2")) * self.scale(mod)
        return d.reshape(self.base_shape(mod))

    def scaled(self, mod, weight: float):
        role = "lokr_w1" if "lokr_w1" in mod.tensors else "lokr_w1_a"
        tensors = dict(mod.tensors)
        tensors[role] = (as_f64(mod.tensors[role]) * weight).astype(np.asarray(mod.tensors[role]).dtype)
        return type(mod)(algorithm=mod.algorithm, tensors=tensors, alpha=mod.alpha, settings=dict(mod.settings))

    def validate(self, mod, where: str) -> None:
        super().validate(mod, where)
        t = {k: np.shape(v) for k, v in mod.tensors.items()}
        ok = True
        for f in ("lokr_w1", "lokr_w2"):
            if f + "_a" in t:
                ok = ok and len(t[f + "_a"]) == 2 and t[f + "_a"][1] == t[f + "_b"][0]
        if "lokr_w1" in t:
            ok = ok and len(t["lokr_w1"]) == 2
        if not ok:
            raise LoraError(f"{where}: LoKr tensors {', '.join(f'{k} {list(v)}' for k, v in t.items())} do not fit "
                            "together; Tucker (lokr_t2) files are not read")

    def settings_from(self, options) -> dict:
        extra = getattr(options, "extra", None) or {}
        out = {"factor": int(extra.get("lokr_factor", -1) if extra.get("lokr_factor") is not None else -1),
               "decompose_both": bool(extra.get("lokr_decompose_both", False)),
               "full_matrix": bool(extra.get("lokr_full_matrix", False))}
        out.update(_dropouts(options))
        return out

    def check_options(self, options) -> None:
        factor = self.settings_from(options)["factor"]
        if factor == 0 or factor < -1:
            raise LoraError(f"--lokr_factor must be -1 (as square as possible) or a positive number, got {factor}")

    def metadata(self, modules) -> dict[str, str]:
        factors = {int(m.settings.get("factor", -1)) for m in modules}
        return {"algo": self.name, "factor": str(factors.pop() if len(factors) == 1 else -1)}

    def init_tensors(self, base_shape, rank, settings, rng):
        out_dim, in_dim, k = int(base_shape[0]), int(base_shape[1]), tuple(int(s) for s in base_shape[2:])
        factor = int(settings.get("factor", -1))
        full = bool(settings.get("full_matrix", False))
        in_m, in_n = factorization(in_dim, factor)
        out_l, out_k = factorization(out_dim, factor)
        t = {}
        if settings.get("decompose_both") and rank < max(out_l, in_m) / 2 and not full:
            t["lokr_w1_a"] = kaiming_uniform((out_l, rank), rng)
            t["lokr_w1_b"] = kaiming_uniform((rank, in_m), rng)
        else:
            t["lokr_w1"] = kaiming_uniform((out_l, in_m), rng)
        kk = int(np.prod(k)) if k else 1
        if rank >= max(out_k, in_n) / 2 or full:
            t["lokr_w2"] = np.zeros((out_k, in_n) + k, np.float32)
        else:
            t["lokr_w2_a"] = kaiming_uniform((out_k, rank), rng)
            t["lokr_w2_b"] = np.zeros((rank, in_n * kk), np.float32)
        return t

    def make_layer(self, base_layer, tensors, alpha, settings):
        from mindone_lora_lycoris.layers import lokr_layer_class

        settings = dict(settings, shape=[int(s) for s in base_layer.weight.shape])
        return lokr_layer_class()(base_layer, self.name, tensors, alpha, settings)
