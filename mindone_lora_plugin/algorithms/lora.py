"""The built-in ``lora`` algorithm: plain LoRA (LoCon on convs), ``ΔW = up @ down * alpha / rank``.

Tensor roles ``down`` ``[r, in(, k, k)]`` and ``up`` ``[out, r(, 1, 1)]``, kohya's and PEFT's layouts (they agree):
``lora_down.weight``/``lora_up.weight`` in kohya files, ``lora_A.weight``/``lora_B.weight`` in PEFT/diffusers files.
The MindSpore layers are mindone.peft's (``LoraConfig`` + ``add_adapter``), so any mindone script can load the result.

Registered through the ``mindone_lora`` entry-point group like any plugin (``lora = mindone_lora_plugin.algorithms.lora``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from mindone_lora_plugin.algorithms.base import LoraAlgorithm, as_f64
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.hookspecs import hookimpl
from mindone_lora_plugin.models import ADAPTER


class PlainLora(LoraAlgorithm):
    name = "lora"
    description = "plain LoRA (LoCon on convs): delta W = up @ down * alpha / rank; kohya and diffusers files"
    roles = ("down", "up")
    kohya_names = {"down": "lora_down.weight", "up": "lora_up.weight"}
    peft_names = {"down": "lora_A.weight", "up": "lora_B.weight"}
    up_roles = ("up",)
    network_module = "networks.lora"

    # ------------------------------------------------------------------ numpy

    def rank(self, mod) -> int:
        return int(mod.tensors["down"].shape[0])

    def base_shape(self, mod) -> tuple[int, ...]:
        down, up = mod.tensors["down"], mod.tensors["up"]
        return (int(up.shape[0]),) + tuple(int(s) for s in down.shape[1:])

    def delta(self, mod, base_weight=None) -> np.ndarray:
        down, up = mod.tensors["down"], mod.tensors["up"]
        out = (as_f64(up).reshape(up.shape[0], -1) @ as_f64(down).reshape(down.shape[0], -1)) * self.scale(mod)
        return out.reshape(self.base_shape(mod))

    def validate(self, mod, where: str) -> None:
        super().validate(mod, where)
        down, up = np.asarray(mod.tensors["down"]), np.asarray(mod.tensors["up"])
        ok = down.ndim in (2, 4) and up.ndim == down.ndim and up.shape[1] == down.shape[0]
        if ok and down.ndim == 4:
            ok = tuple(up.shape[2:]) == (1, 1)
        if not ok:
            raise LoraError(f"{where} has down {list(down.shape)} and up {list(up.shape)} ({down.dtype}), which are "
                            "not a LoRA pair (down [r, in(, k, k)], up [out, r(, 1, 1)])")

    def metadata(self, modules) -> dict[str, str]:
        return {}

    def check_options(self, options) -> None:
        extra = getattr(options, "extra", None) or {}
        asked = [f"--{k}" for k in ("network_dropout", "rank_dropout", "module_dropout") if extra.get(k)]
        if asked:
            raise LoraError(f"{', '.join(asked)}: plain lora trains through mindone.peft layers, whose dropout has no "
                            "MindSpore CPU kernel and no rank/module dropout; use --lora_algo loha or lokr for adapter "
                            "dropout, or leave these flags out")

    def init_tensors(self, base_shape, rank, settings, rng):
        from mindone_lora_plugin.algorithms.base import kaiming_uniform

        down = kaiming_uniform((rank,) + tuple(base_shape[1:]), rng)
        up = np.zeros((base_shape[0], rank) + ((1, 1) if len(base_shape) == 4 else ()), np.float32)
        return {"down": down, "up": up}

    # ------------------------------------------------------------------ MindSpore (mindone.peft)

    def lora_config(self, targets: dict[str, tuple[int, float]], options):
        """A mindone.peft ``LoraConfig`` adapting exactly ``targets`` with their per-module rank and alpha."""
        from mindone.peft import LoraConfig

        from mindone_lora_plugin.state import most_common

        r = most_common(Counter(rk for rk, _ in targets.values()))
        a = most_common(Counter(al for _, al in targets.values()))
        init = "gaussian" if getattr(options, "init", "gaussian") == "gaussian" else True
        return LoraConfig(r=int(r), lora_alpha=a, init_lora_weights=init, target_modules=sorted(targets),
                          rank_pattern={p: rk for p, (rk, _) in targets.items() if rk != r},
                          alpha_pattern={p: al for p, (_, al) in targets.items() if al != a})

    def add_adapters(self, cell, targets, options, modules=None) -> None:
        cell.add_adapter(self.lora_config(targets, options), adapter_name=ADAPTER)

    def owns_layer(self, layer) -> bool:
        from mindone_lora_plugin.models import is_peft_lora_layer

        return is_peft_lora_layer(layer) and ADAPTER in layer.lora_A

    def layer_parameters(self, layer) -> dict:
        return {"lora_A": layer.lora_A[ADAPTER].weight, "lora_B": layer.lora_B[ADAPTER].weight}

    def read_layer(self, layer):
        from mindone_lora_plugin.state import LoraModule

        down = layer.lora_A[ADAPTER].weight.asnumpy().astype(np.float32)
        up = layer.lora_B[ADAPTER].weight.asnumpy().astype(np.float32)
        if up.ndim == 2 and down.ndim == 4:  # keep kohya/PEFT layouts
            up = up[:, :, None, None]
        return LoraModule(down, up, float(layer.lora_alpha[ADAPTER]))

    def write_layer(self, layer, mod, where: str) -> None:
        import mindspore as ms

        if int(layer.r[ADAPTER]) != self.rank(mod):
            raise LoraError(f"{where} has rank {self.rank(mod)} in the file but {layer.r[ADAPTER]} here; use "
                            f"--lora_rank {self.rank(mod)} (and the same targets) to load it")
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        down, up = mod.tensors["down"], mod.tensors["up"]
        up = up.reshape(b.shape) if up.size == int(np.prod(b.shape)) else up
        if tuple(down.shape) != tuple(a.shape) or tuple(up.shape) != tuple(b.shape):
            raise LoraError(f"shape mismatch at {where}: the file has down {list(down.shape)} / up "
                            f"{list(mod.tensors['up'].shape)} but the model expects {list(a.shape)} / "
                            f"{list(b.shape)}")
        a.set_data(ms.Tensor(np.asarray(as_f64(down), dtype=np.float32), dtype=a.dtype))
        b.set_data(ms.Tensor(np.asarray(as_f64(up), dtype=np.float32), dtype=b.dtype))
        layer.lora_alpha[ADAPTER] = float(mod.alpha)
        layer.scaling[ADAPTER] = float(mod.alpha) / self.rank(mod)


@hookimpl
def mindone_lora_algorithms():
    yield PlainLora()
