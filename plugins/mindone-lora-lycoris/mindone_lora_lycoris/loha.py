"""LoHa (LyCORIS ``loha``): ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) × alpha / r``, a Hadamard product of two rank-r
products (effective rank up to r²).

Tensors, named as in LyCORIS files: ``hada_w1_a`` ``[out, r]``, ``hada_w1_b`` ``[r, in·k·k]``, ``hada_w2_a``
``[out, r]``, ``hada_w2_b`` ``[r, in·k·k]`` (convs are flattened, LyCORIS's default without Tucker). Initialised as
LyCORIS does: ``w1_a ~ N(0, 0.1)``, ``w1_b, w2_b ~ N(0, 1)``, ``w2_a = 0`` (so ΔW starts at zero).
"""

from __future__ import annotations

import numpy as np

from mindone_lora_lycoris.common import LycorisAlgorithm
from mindone_lora_plugin.algorithms.base import as_f64
from mindone_lora_plugin.errors import LoraError

ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LohaAlgorithm(LycorisAlgorithm):
    name = "loha"
    description = "LyCORIS LoHa: delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank; kohya/LyCORIS files"
    roles = ROLES
    kohya_names = {r: r for r in ROLES}
    up_roles = ("hada_w1_a", "hada_w2_a")

    def rank(self, mod) -> int:
        return int(mod.tensors["hada_w1_b"].shape[0])

    def flat_shape(self, mod) -> tuple[int, int]:
        return int(mod.tensors["hada_w1_a"].shape[0]), int(mod.tensors["hada_w1_b"].shape[1])

    def delta(self, mod, base_weight=None) -> np.ndarray:
        t = {k: as_f64(v) for k, v in mod.tensors.items()}
        d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * self.scale(mod)
        return d.reshape(self.base_shape(mod))

    def validate(self, mod, where: str) -> None:
        super().validate(mod, where)
        s = {k: np.shape(v) for k, v in mod.tensors.items()}
        ok = all(len(v) == 2 for v in s.values())
        ok = ok and s["hada_w1_a"] == s["hada_w2_a"] and s["hada_w1_b"] == s["hada_w2_b"]
        ok = ok and s["hada_w1_a"][1] == s["hada_w1_b"][0]
        if not ok:
            raise LoraError(f"{where}: LoHa tensors {', '.join(f'{k} {list(v)}' for k, v in s.items())} do not fit "
                            "together (w1_a/w2_a [out, r], w1_b/w2_b [r, in]); Tucker (hada_t1/t2) files are not read")

    def init_tensors(self, base_shape, rank, settings, rng):
        out, flat_in = int(base_shape[0]), int(np.prod(base_shape[1:]))
        return {"hada_w1_a": rng.normal(0.0, 0.1, (out, rank)).astype(np.float32),
                "hada_w1_b": rng.normal(0.0, 1.0, (rank, flat_in)).astype(np.float32),
                "hada_w2_a": np.zeros((out, rank), np.float32),
                "hada_w2_b": rng.normal(0.0, 1.0, (rank, flat_in)).astype(np.float32)}

    def settings_from(self, options) -> dict:
        return _dropouts(options)

    def make_layer(self, base_layer, tensors, alpha, settings):
        from mindone_lora_lycoris.layers import loha_layer_class

        settings = dict(settings, shape=[int(s) for s in base_layer.weight.shape])
        return loha_layer_class()(base_layer, self.name, tensors, alpha, settings)


def _dropouts(options) -> dict:
    extra = getattr(options, "extra", None) or {}
    return {k: float(extra[k]) for k in ("network_dropout", "rank_dropout", "module_dropout") if extra.get(k)}
