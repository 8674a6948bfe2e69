"""The generic MindSpore adapter layer for algorithms that build a weight change from their own tensors.

:class:`AdapterLayer` wraps a Linear or Conv2d: ``y = base(x) + f(x, ΔW)`` where ``ΔW = delta_weight()`` (scale
included) is computed from the layer's parameters on every call and ``f`` is the base layer's own operation (a matmul,
or a convolution with the base layer's stride, padding, dilation and groups). A subclass implements only
:meth:`AdapterLayer.delta_weight` with MindSpore ops; GRAPH_MODE compiles it like any cell.

kohya's adapter dropouts run inside the layer in train mode only (``set_train(True)``): ``module_dropout`` skips the
whole adapter for a step with that probability, ``rank_dropout`` zeroes elements of the weight change (kohya drops
rank rows of the down matrix; for algorithms without a single rank axis the output-channel rows of ΔW are dropped,
as LyCORIS does), and ``network_dropout`` drops input elements of the adapter path (plain LoRA's own layer,
:func:`~.lora.lora_layer_class`, drops ranks and down-output neurons exactly as kohya's ``networks.lora``). Files and
validation (eval mode) are unaffected: the rates are layer attributes, never settings a file records.

The masks come from ``mint.rand``, which follows MindSpore's default generator (``ms.manual_seed``) on Ascend and,
through the CPU backend's replacement, on CPU in PyNative and GRAPH_MODE alike; :func:`seed_dropout` reseeds it
from (seed, micro-step), so a resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

#: kohya's adapter dropout flags (``--network_dropout`` ...), in the order they act
DROPOUTS = ("network_dropout", "rank_dropout", "module_dropout")


def dropout_rates(options) -> dict[str, float]:
    """The adapter dropout rates asked for in ``options.extra`` (only those above 0)."""
    extra = getattr(options, "extra", None) or {}
    return {k: float(extra[k]) for k in DROPOUTS if extra.get(k)}


def seed_dropout(*key: int) -> None:
    """Reseed MindSpore's default generator (what the dropout masks draw from) from ``key``, e.g. (seed, micro-step,
    worker): the masks of a step then depend on the step only, and a resume reproduces them."""
    import mindspore as ms

    ms.manual_seed(int(np.random.default_rng([*key, 303]).integers(1, 2 ** 62)))


def wrap_modules(cell, paths, make) -> None:
    """Replace every module at ``paths`` in ``cell`` by ``make(path, module)`` (parents keep their attribute)."""
    named = dict(cell.cells_and_names())
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = named.get(parent_path) if parent_path else cell
        target = named.get(path)
        if parent is None or target is None:
            from mindone_lora_plugin.errors import LoraError

            raise LoraError(f"no module {path} in the model to put an adapter on")
        setattr(parent, child, make(path, target))


_CLASS = None


def adapter_layer_class():
    """The ``AdapterLayer`` MindSpore base class (built, and MindSpore imported, on the first call)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_adapter_layer()
    return _CLASS


def is_adapter_layer(cell) -> bool:
    """True for a layer of an algorithm built on ``AdapterLayer`` (no MindSpore import needed)."""
    return _CLASS is not None and isinstance(cell, _CLASS)


def _make_adapter_layer():
    import mindspore as ms
    from mindspore import Parameter, Tensor, mint, nn, ops

    class _AdapterLayer(nn.Cell):
        """``base(x) + f(x, delta_weight())``; parameters are the algorithm's tensors, named by role."""

        def __init__(self, base_layer, algorithm_name: str, tensors: dict, alpha: float, settings: dict):
            super().__init__()
            self.base_layer = base_layer
            self.algorithm_name = algorithm_name
            self.settings = {k: v for k, v in settings.items() if k not in DROPOUTS}
            self.role_names = tuple(sorted(tensors))
            for role in self.role_names:
                value = np.asarray(tensors[role], dtype=np.float32)
                setattr(self, role, Parameter(Tensor(value, ms.float32), name=role))
            shape = tuple(int(s) for s in base_layer.weight.shape)
            self.base_shape = shape
            self.is_conv = len(shape) == 4
            if self.is_conv:
                self.stride = tuple(base_layer.stride)
                self.padding = base_layer.padding
                self.dilation = tuple(base_layer.dilation)
                self.groups = int(base_layer.groups)
            self.alpha = float(alpha)
            self.scaling = self.scale_for(self.alpha)
            self.network_dropout = float(settings.get("network_dropout", 0.0) or 0.0)
            self.rank_dropout = float(settings.get("rank_dropout", 0.0) or 0.0)
            self.module_dropout = float(settings.get("module_dropout", 0.0) or 0.0)

        # ---------------------------------------------------------------- what subclasses give

        def scale_for(self, alpha: float) -> float:
            """The scale ``delta_weight`` applies (default ``alpha / rank``)."""
            return float(alpha) / self.rank()

        def rank(self) -> int:
            raise NotImplementedError

        def delta_weight(self):
            """The weight change (float32, base layout, scale applied) from the current parameters."""
            raise NotImplementedError

        # ---------------------------------------------------------------- plumbing

        def get_base_layer(self):
            return self.base_layer

        def role_parameters(self):
            return [(role, getattr(self, role)) for role in self.role_names]

        def set_alpha(self, alpha: float) -> None:
            self.alpha = float(alpha)
            self.scaling = self.scale_for(self.alpha)

        def _kept(self, shape, p):
            """1 with probability ``1 - p``, else 0 (float32, ``shape``); no rescaling."""
            return (mint.rand(shape) >= p).astype(ms.float32)

        def _keep(self, shape, p):
            """Inverted dropout mask: kept elements scaled by ``1 / (1 - p)``."""
            return self._kept(shape, p) / (1.0 - p)

        def _module_kept(self, out, extra):
            """``out + extra``, the adapter's part dropped for this call with probability ``module_dropout`` (a mask,
            not a branch, so GRAPH_MODE compiles no control flow; the sum is exactly ``out`` when dropped)."""
            if self.training and self.module_dropout > 0:
                extra = extra * self._kept((1,), self.module_dropout)
            return out + extra.astype(out.dtype)

        def construct(self, x):
            out = self.base_layer(x)
            dw = self.delta_weight()
            if self.training and self.rank_dropout > 0:
                dw = dw * self._keep((dw.shape[0],) + (1,) * (dw.ndim - 1), self.rank_dropout)
            h = x.astype(ms.float32)
            if self.training and self.network_dropout > 0:
                h = h * self._keep(h.shape, self.network_dropout)
            if self.is_conv:
                extra = mint.nn.functional.conv2d(h, dw, None, self.stride, self.padding, self.dilation, self.groups)
            else:
                extra = ops.matmul(h, dw.swapaxes(0, 1))
            return self._module_kept(out, extra)

    return _AdapterLayer
