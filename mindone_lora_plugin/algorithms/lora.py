"""The built-in ``lora`` algorithm: plain LoRA (LoCon on convs), ``ΔW = up @ down * alpha / rank``.

Tensor roles ``down`` ``[r, in(, k, k)]`` and ``up`` ``[out, r(, 1, 1)]``, kohya's and PEFT's layouts (they agree):
``lora_down.weight``/``lora_up.weight`` in kohya files, ``lora_A.weight``/``lora_B.weight`` in PEFT/diffusers files.
The MindSpore layers are mindone.peft's (``LoraConfig`` + ``add_adapter``), so any mindone script can load the result.

DoRA (weight-decomposed LoRA) is plain LoRA with one more tensor, the ``magnitude`` ``m``:
``W' = m * (W + dW) / ||W + dW||``, the norm taken per output row (peft, LyCORIS ``wd_on_out=True``; the setting
``dora_axis="out"``) or per input column (LyCORIS's ``wd_on_out=False``; ``dora_axis="in"``). Files: PEFT's
``lora_magnitude_vector`` shaped ``[out]`` in diffusers files (output side only), ``dora_scale`` shaped ``[out, 1]``
(output side) or ``[1, in]`` (input side) in kohya/LyCORIS files. In memory the magnitude keeps the shape it was read
with; the writers reshape it (:meth:`PlainLora.file_tensor`).

Registered through the ``mindone_lora`` entry-point group like any plugin
(``lora = mindone_lora_plugin.algorithms.lora``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from mindone_lora_plugin.algorithms.base import LoraAlgorithm, as_f64
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.hookspecs import hookimpl
from mindone_lora_plugin.models import ADAPTER
from mindone_lora_plugin.state import LoraModule


class PlainLora(LoraAlgorithm):
    name = "lora"
    description = "plain LoRA (LoCon on convs): delta W = up @ down * alpha / rank; kohya and diffusers files"
    roles = ("down", "up")
    optional_roles = ("magnitude",)
    kohya_names = {"down": "lora_down.weight", "up": "lora_up.weight", "magnitude": "dora_scale"}
    peft_names = {"down": "lora_A.weight", "up": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
    up_roles = ("up",)
    network_module = "networks.lora"

    # ------------------------------------------------------------------ numpy

    def rank(self, mod) -> int:
        return int(mod.tensors["down"].shape[0])

    def base_shape(self, mod) -> tuple[int, ...]:
        down, up = mod.tensors["down"], mod.tensors["up"]
        return (int(up.shape[0]),) + tuple(int(s) for s in down.shape[1:])

    def lora_delta(self, mod) -> np.ndarray:
        """``up @ down * alpha / rank`` in the base weight's layout (float64), DoRA's magnitude not applied."""
        down, up = mod.tensors["down"], mod.tensors["up"]
        out = (as_f64(up).reshape(up.shape[0], -1) @ as_f64(down).reshape(down.shape[0], -1)) * self.scale(mod)
        return out.reshape(self.base_shape(mod))

    def delta(self, mod, base_weight=None) -> np.ndarray:
        if "magnitude" not in mod.tensors:
            return self.lora_delta(mod)
        if base_weight is None:
            raise LoraError("a DoRA module's weight change depends on the base weight; merge it with the base model "
                            "(this operation was given none)")
        base = as_f64(base_weight).reshape(self.base_shape(mod))
        return dora_weight(base + self.lora_delta(mod), mod.tensors["magnitude"], dora_axis(mod)) - base

    def needs_base_weight(self, mod) -> bool:
        return "magnitude" in mod.tensors

    def label(self, mod) -> str:
        return "lora+dora" if "magnitude" in mod.tensors else "lora"

    def settings_from_tensors(self, mod) -> dict:
        return {"dora_axis": dora_axis(mod)} if "magnitude" in mod.tensors else {}

    def scaled(self, mod, weight: float):
        if "magnitude" in mod.tensors and weight != 1:
            raise LoraError("a DoRA module cannot be re-weighted on its own (its effect is not linear in the weight); "
                            "merge it into the model with that weight instead")
        return super().scaled(mod, weight)

    def file_tensor(self, mod, role, value, style):
        if role != "magnitude":
            return value
        axis, base = dora_axis(mod), self.base_shape(mod)
        if style == "peft":
            if axis != "out":
                raise LoraError("this DoRA module is decomposed on the input side (LyCORIS wd_on_out=False), which "
                                "diffusers/PEFT files cannot hold (peft normalises output rows); save it as kohya")
            return np.asarray(value).reshape(base[0])
        ones = (1,) * (len(base) - 1)
        return np.asarray(value).reshape((base[0],) + ones if axis == "out" else (1, base[1]) + ones[1:])

    def validate(self, mod, where: str) -> None:
        super().validate(mod, where)
        down, up = np.asarray(mod.tensors["down"]), np.asarray(mod.tensors["up"])
        ok = down.ndim in (2, 4) and up.ndim == down.ndim and up.shape[1] == down.shape[0]
        if ok and down.ndim == 4:
            ok = tuple(up.shape[2:]) == (1, 1)
        if not ok:
            raise LoraError(f"{where} has down {list(down.shape)} and up {list(up.shape)} ({down.dtype}), which are "
                            "not a LoRA pair (down [r, in(, k, k)], up [out, r(, 1, 1)])")
        if "magnitude" in mod.tensors:
            shape = self.base_shape(mod)
            m = np.asarray(mod.tensors["magnitude"])
            if m.size not in (shape[0], shape[1]) or sum(int(s) != 1 for s in m.shape) > 1:
                raise LoraError(f"{where}: the DoRA magnitude (dora_scale/lora_magnitude_vector) is {list(m.shape)} "
                                f"but the module adapts a {list(shape)} weight; expected [out], [out, 1] or [1, in]")

    def metadata(self, modules) -> dict[str, str]:
        dora = [m for m in modules if "magnitude" in m.tensors]
        if not dora:
            return {}
        return {"algo": "lora", "dora_wd": "True", "wd_on_out": str(dora_axis(dora[0]) == "out")}

    def check_options(self, options) -> None:
        from mindone_lora_plugin.algorithms.layers import dropout_rates

        asked = [f"--{k}" for k in dropout_rates(options) if k != "module_dropout"]
        if asked and getattr(options, "dora", False):
            raise LoraError(f"{', '.join(asked)} cannot be combined with --lora_dora (DoRA renormalises the whole "
                            "weight, so dropping ranks or neurons has no kohya meaning); use --module_dropout with "
                            "DoRA, or leave out --lora_dora")

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

    def settings_from(self, options) -> dict:  # DoRA layers (plain ones with dropout: see add_adapters)
        from mindone_lora_plugin.algorithms.layers import dropout_rates

        return {"dora_axis": "out", **dropout_rates(options)} if getattr(options, "dora", False) else {}

    def add_adapters(self, cell, targets, options, modules=None) -> None:
        """mindone.peft layers; with adapter dropout the same layers (same initial tensors) are then swapped for
        :func:`lora_layer_class` ones, which drop as kohya does; DoRA layers with ``--lora_dora``."""
        from mindone_lora_plugin.algorithms.layers import dropout_rates, wrap_modules

        dora = getattr(options, "dora", False) or any("magnitude" in m.tensors for m in (modules or {}).values())
        if not dora:
            cell.add_adapter(self.lora_config(targets, options), adapter_name=ADAPTER)
            rates = dropout_rates(options)
            if rates:
                def swap(path, peft_layer):
                    mod = self.read_layer(peft_layer)
                    return lora_layer_class()(peft_layer.get_base_layer(), self.name, mod.tensors, mod.alpha, rates)

                wrap_modules(cell, sorted(targets), swap)
            return
        from mindone_lora_plugin.models import is_linear

        named = dict(cell.cells_and_names())
        convs = sorted(p for p in targets if p in named and not is_linear(named[p]))
        if convs:
            raise LoraError(f"--lora_dora adapts Linear layers only, but the targets include {len(convs)} conv(s), "
                            f"e.g. {convs[0]}; use --lora_targets attn (or Linear names), or leave out --lora_dora")
        super().add_adapters(cell, targets, options, modules)  # DoRA layers (dora_layer_class), one per target

    def make_layer(self, base_layer, tensors, alpha, settings):
        if "magnitude" not in tensors:  # a fresh DoRA adapter: m = ||W|| per output row, so W' = W at the start
            w = base_layer.weight.asnumpy().astype(np.float64)
            tensors = dict(tensors, magnitude=np.linalg.norm(w.reshape(w.shape[0], -1), axis=1).astype(np.float32))
        settings = dict(settings)
        settings.setdefault("dora_axis", dora_axis(LoraModule(algorithm="lora", tensors=tensors, alpha=alpha)))
        return dora_layer_class()(base_layer, self.name, tensors, alpha, settings)

    def owns_layer(self, layer) -> bool:
        from mindone_lora_plugin.models import is_peft_lora_layer

        if super().owns_layer(layer):  # a DoRA layer, or a plain one with dropout
            return True
        return is_peft_lora_layer(layer) and ADAPTER in layer.lora_A

    def layer_parameters(self, layer) -> dict:
        if _is_dora_layer(layer):
            return super().layer_parameters(layer)
        if super().owns_layer(layer):  # the peft roles, so parameter names (LoRA+, checkpoints) do not change
            return {"lora_A": layer.down, "lora_B": layer.up}
        return {"lora_A": layer.lora_A[ADAPTER].weight, "lora_B": layer.lora_B[ADAPTER].weight}

    def read_layer(self, layer):
        from mindone_lora_plugin.state import LoraModule

        if super().owns_layer(layer):
            return super().read_layer(layer)

        down = layer.lora_A[ADAPTER].weight.asnumpy().astype(np.float32)
        up = layer.lora_B[ADAPTER].weight.asnumpy().astype(np.float32)
        if up.ndim == 2 and down.ndim == 4:  # keep kohya/PEFT layouts
            up = up[:, :, None, None]
        return LoraModule(down, up, float(layer.lora_alpha[ADAPTER]))

    def write_layer(self, layer, mod, where: str) -> None:
        import mindspore as ms

        dora_layer = _is_dora_layer(layer)
        if dora_layer != ("magnitude" in mod.tensors):
            raise LoraError(f"{where} is {'a DoRA' if not dora_layer else 'a plain'} LoRA module in the file but the "
                            f"adapter here is {'plain' if not dora_layer else 'DoRA'}; "
                            f"{'add' if not dora_layer else 'leave out'} --lora_dora to load it")
        if dora_layer:
            if mod.settings.get("dora_axis", dora_axis(mod)) != layer.settings.get("dora_axis"):
                raise LoraError(f"{where}: the file's DoRA magnitude normalises the other axis than this adapter")
            m, p = np.asarray(mod.tensors["magnitude"]), layer.magnitude
            if m.size == int(np.prod(p.shape)):  # [out] (peft) and [out, 1] (kohya) are one vector
                mod = LoraModule(algorithm=mod.algorithm, alpha=mod.alpha, settings=mod.settings,
                                 tensors=dict(mod.tensors, magnitude=m.reshape(tuple(p.shape))))
            return super().write_layer(layer, mod, where)

        own = super().owns_layer(layer)  # a plain layer with dropout
        rank = int(layer.down.shape[0]) if own else int(layer.r[ADAPTER])
        if rank != self.rank(mod):
            raise LoraError(f"{where} has rank {self.rank(mod)} in the file but {rank} here; use "
                            f"--lora_rank {self.rank(mod)} (and the same targets) to load it")
        a, b = (layer.down, layer.up) if own else (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
        down, up = mod.tensors["down"], mod.tensors["up"]
        up = up.reshape(b.shape) if up.size == int(np.prod(b.shape)) else up
        if tuple(down.shape) != tuple(a.shape) or tuple(up.shape) != tuple(b.shape):
            raise LoraError(f"shape mismatch at {where}: the file has down {list(down.shape)} / up "
                            f"{list(mod.tensors['up'].shape)} but the model expects {list(a.shape)} / "
                            f"{list(b.shape)}")
        a.set_data(ms.Tensor(np.asarray(as_f64(down), dtype=np.float32), dtype=a.dtype))
        b.set_data(ms.Tensor(np.asarray(as_f64(up), dtype=np.float32), dtype=b.dtype))
        if own:
            layer.set_alpha(float(mod.alpha))
            return
        layer.lora_alpha[ADAPTER] = float(mod.alpha)
        layer.scaling[ADAPTER] = float(mod.alpha) / self.rank(mod)


def dora_axis(mod) -> str:
    """``"out"`` when the module's DoRA magnitude normalises output rows (peft ``[out]``, LyCORIS ``[out, 1]``),
    ``"in"`` when it normalises input columns (LyCORIS ``[1, in]``)."""
    m = np.asarray(mod.tensors["magnitude"])
    out = int(mod.tensors["up"].shape[0])
    if m.ndim == 1 or (int(m.shape[0]) == out and m.size == out):
        return "out"
    return "in"


def dora_weight(weight: np.ndarray, magnitude, axis: str) -> np.ndarray:
    """``magnitude * weight / ||weight||`` with the norm per output row (``axis="out"``) or input column (float64)."""
    w = as_f64(weight)
    m = as_f64(magnitude).reshape(-1)
    ones = (1,) * (w.ndim - 1)
    if axis == "out":
        norm = np.linalg.norm(w.reshape(w.shape[0], -1), axis=1).reshape((w.shape[0],) + ones)
        return w * (m.reshape((w.shape[0],) + ones) / norm)
    norm = np.linalg.norm(np.swapaxes(w, 0, 1).reshape(w.shape[1], -1), axis=1).reshape((1, w.shape[1]) + ones[1:])
    return w * (m.reshape((1, w.shape[1]) + ones[1:]) / norm)


def _is_dora_layer(layer) -> bool:
    return "magnitude" in getattr(layer, "role_names", ())


_LORA_CLASS = None


def lora_layer_class():
    """Plain LoRA as a MindSpore layer with kohya's dropouts (``networks.lora``), used only when one is asked for.

    ``y = base(x) + up(drop(down(x))) * scale``: ``down`` is a matmul (a conv with the base layer's kernel, stride,
    padding and dilation on LoCon convs), ``up`` a matmul (a 1×1 conv). In train mode ``network_dropout`` is inverted
    dropout of the down output's neurons, ``rank_dropout`` zeroes whole ranks per sample and multiplies the scale by
    ``1 / (1 - p)``, ``module_dropout`` drops the adapter's whole contribution for the call. In eval mode it gives
    exactly what the mindone.peft layer gives.
    """
    global _LORA_CLASS
    if _LORA_CLASS is None:
        import mindspore as ms
        from mindspore import mint, ops

        from mindone_lora_plugin.algorithms.layers import adapter_layer_class

        class LoraLayer(adapter_layer_class()):
            def rank(self):
                return int(self.down.shape[0])

            def delta_weight(self):
                out, r = self.base_shape[0], self.rank()
                dw = ops.matmul(self.up.reshape(out, r), self.down.reshape(r, -1)) * self.scaling
                return dw.reshape(self.base_shape)

            def construct(self, x):
                out = self.base_layer(x)
                h = x.astype(ms.float32)
                if self.is_conv:
                    lx = mint.nn.functional.conv2d(h, self.down, None, self.stride, self.padding, self.dilation,
                                                   self.groups)
                else:
                    lx = ops.matmul(h, self.down.swapaxes(0, 1))
                scale = self.scaling
                if self.training and self.network_dropout > 0:
                    lx = lx * self._keep(lx.shape, self.network_dropout)
                if self.training and self.rank_dropout > 0:  # one draw per (sample, rank)
                    if self.is_conv:
                        shape = (lx.shape[0], lx.shape[1], 1, 1)
                    else:
                        shape = (lx.shape[0],) + (1,) * (len(lx.shape) - 2) + (lx.shape[-1],)
                    lx = lx * self._kept(shape, self.rank_dropout)
                    scale = scale / (1.0 - self.rank_dropout)
                if self.is_conv:
                    extra = mint.nn.functional.conv2d(lx, self.up, None, 1, 0, 1, 1)
                else:
                    extra = ops.matmul(lx, self.up.swapaxes(0, 1))
                return self._module_kept(out, extra * scale)

        _LORA_CLASS = LoraLayer
    return _LORA_CLASS


_DORA_CLASS = None


def dora_layer_class():
    """The MindSpore DoRA layer (an :func:`~.layers.adapter_layer_class` subclass; built on the first call).

    ``y = base(x) + x @ (W' - W)^T`` with ``W' = m * V / ||V||``, ``V = W + up @ down * scale``; the norm is detached
    from the gradient, as peft and the DoRA paper do (section 4.3).
    """
    global _DORA_CLASS
    if _DORA_CLASS is None:
        import mindspore as ms
        from mindspore import ops

        from mindone_lora_plugin.algorithms.layers import adapter_layer_class

        class DoraLayer(adapter_layer_class()):
            def rank(self):
                return int(self.down.shape[0])

            def delta_weight(self):
                w = self.base_layer.weight.astype(ms.float32)
                v = w + ops.matmul(self.up, self.down) * self.scaling
                if self.settings.get("dora_axis", "out") == "out":
                    norm = ops.sqrt((v * v).sum(axis=1, keepdims=True))
                    m = self.magnitude.reshape(-1, 1)
                else:
                    norm = ops.sqrt((v * v).sum(axis=0, keepdims=True))
                    m = self.magnitude.reshape(1, -1)
                return v * (m / ops.stop_gradient(norm)) - w

        _DORA_CLASS = DoraLayer
    return _DORA_CLASS


@hookimpl
def mindone_lora_algorithms():
    yield PlainLora()
