"""The algorithm plugin object: *what* an adapter is (plain LoRA, LoHa, LoKr, ...), as opposed to *where* it goes.

A plugin offers algorithms by yielding instances of a :class:`LoraAlgorithm` subclass from its
``mindone_lora_algorithms()`` hook implementation. Strategies decide which modules get an adapter and with which
rank and alpha; the algorithm decides the tensors of each adapter, their initialisation, the MindSpore layer that
wraps the Linear/Conv2d, the weight change (or merged weight) they give, and how the tensors are named in files.

An adapted module in memory is a :class:`~mindone_lora_plugin.state.LoraModule`: the algorithm's name, its named
numpy tensors (the names are the algorithm's *roles*), ``alpha`` and the algorithm's own ``settings``. The numpy half
of an algorithm (everything except :meth:`LoraAlgorithm.add_adapters` and the layer methods) never imports MindSpore.

Two ways to give the MindSpore half:

* override :meth:`add_adapters`, :meth:`owns_layer`, :meth:`layer_parameters`, :meth:`read_layer` and
  :meth:`write_layer` (the built-in ``lora`` algorithm does this through mindone.peft);
* or implement only :meth:`make_layer`, returning an instance of a subclass of
  :func:`~mindone_lora_plugin.algorithms.layers.adapter_layer_class` whose ``delta_weight()`` builds the weight change
  from its parameters; the base class then wraps every target module with it and reads and writes its parameters by
  role (LoHa and LoKr in ``mindone-lora-lycoris`` do this).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from mindone_lora_plugin.dtypes import as_dtype
from mindone_lora_plugin.errors import LoraError


def as_f64(arr) -> np.ndarray:
    """``arr`` as float64 (bfloat16 of any origin included)."""
    from mindone_lora_plugin.dtypes import as_dtype

    return as_dtype(np.asarray(arr), np.float64)


class LoraAlgorithm:
    """Base class of adapter algorithms.

    Class attributes a subclass sets:

    * :attr:`name` (what ``--lora_algo`` accepts) and :attr:`description` (one line for ``mindone-lora plugins``);
    * :attr:`roles` (the tensors every module has) and :attr:`optional_roles`;
    * :attr:`kohya_names`: role → tensor-name suffix in kohya/LyCORIS files (``M.<suffix>``; ``alpha`` is the
      format's business); :attr:`peft_names`: the same for diffusers/PEFT files, or ``None`` when PEFT has no
      layout for this algorithm (the diffusers format then refuses it, naming the formats that can hold it);
    * :attr:`up_roles`: the "up"-like tensors (initialised to zero, or what LoRA+ gives a higher learning rate);
    * :attr:`network_module`: the ``ss_network_module`` kohya files of this algorithm carry;
    * :attr:`plugin_hint`: what to install to get this algorithm, for error lines.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ()
    optional_roles: ClassVar[tuple[str, ...]] = ()
    kohya_names: ClassVar[dict[str, str]] = {}
    peft_names: ClassVar[dict[str, str] | None] = None
    up_roles: ClassVar[tuple[str, ...]] = ()
    network_module: ClassVar[str] = "lycoris.kohya"

    # ------------------------------------------------------------------ numpy: what a module is

    def rank(self, mod) -> int:
        """The module's rank (``alpha / rank`` is its scale unless :meth:`scale` says otherwise)."""
        raise NotImplementedError

    def scale(self, mod) -> float:
        return float(mod.alpha) / self.rank(mod)

    def base_shape(self, mod) -> tuple[int, ...]:
        """The shape of the weight the module adapts (``[out, in]`` or ``[out, in, k, k]``)."""
        raise NotImplementedError

    def delta(self, mod, base_weight: np.ndarray | None = None) -> np.ndarray:
        """The weight change in the base weight's layout (float64), scale applied.

        ``base_weight`` is given when the change depends on it (DoRA); algorithms that need it raise
        :class:`LoraError` without it.
        """
        raise NotImplementedError

    def merged_weight(self, mod, base_weight: np.ndarray, multiplier: float = 1.0) -> np.ndarray:
        """``base_weight`` with the module merged in at ``multiplier`` (float64)."""
        base = as_f64(base_weight)
        return base + multiplier * self.delta(mod, base).reshape(base.shape)

    def needs_base_weight(self, mod) -> bool:
        """True when :meth:`delta` depends on the base weight (DoRA)."""
        return False

    def label(self, mod) -> str:
        """How ``inspect`` names the module's algorithm (``lora+dora`` for a DoRA module; default :attr:`name`)."""
        return self.name

    def file_tensor(self, mod, role: str, value, style: str):
        """``value`` (the module's ``role`` tensor) in the layout a ``style`` file (``kohya`` or ``peft``) holds;
        default unchanged. Raise :class:`LoraError` when that format cannot hold it."""
        return value

    def scaled(self, mod, weight: float):
        """The same module with its effect multiplied by ``weight`` (default: the first up tensor is scaled)."""
        role = self.up_roles[0]
        tensors = dict(mod.tensors)
        t = mod.tensors[role]
        tensors[role] = (as_f64(t) * weight).astype(t.dtype)
        return type(mod)(algorithm=mod.algorithm, tensors=tensors, alpha=mod.alpha, settings=dict(mod.settings))

    def validate(self, mod, where: str) -> None:
        """Raise :class:`LoraError` when the tensors do not form a module of this algorithm."""
        missing = [r for r in self.roles if r not in mod.tensors]
        if missing:
            needs = ', '.join(self.kohya_names.get(r, r) for r in missing)
            raise LoraError(f"{where}: a {self.name} module needs {needs} but it is missing; the file is incomplete")
        for role, t in mod.tensors.items():
            if np.asarray(t).dtype.kind not in "fV" and str(np.asarray(t).dtype) != "bfloat16":
                raise LoraError(f"{where}: tensor {self.kohya_names.get(role, role)} has dtype {np.asarray(t).dtype};"
                                " adapter tensors are floating point")

    def claims(self, roles: set[str]) -> bool:
        """True when a module whose tensors have these roles belongs to this algorithm."""
        return set(self.roles) <= roles <= set(self.roles) | set(self.optional_roles)

    def settings_from(self, options) -> dict:
        """This algorithm's settings for a run, from :class:`~mindone_lora_plugin.options.LoraOptions`."""
        return {}

    def fit_base_shape(self, mod, shape: tuple[int, ...], where: str) -> None:
        """Called when a module read from a file meets its base weight's ``shape``: raise a one-line shape mismatch,
        or record what the tensors alone do not say (LyCORIS flattens conv kernels). Default: nothing."""

    def settings_from_tensors(self, mod) -> dict:
        """The settings a module read from a file implies (LoKr's factor, ...); default none."""
        return {}

    def check_options(self, options) -> None:
        """Raise :class:`LoraError` before any model loads when ``options`` cannot be honoured."""

    def metadata(self, modules) -> dict[str, str]:
        """Extra ``ss_network_args`` entries (strings) for kohya files of these modules (LyCORIS's ``algo``...)."""
        return {"algo": self.name}

    # ------------------------------------------------------------------ numpy: initial tensors

    def init_tensors(self, base_shape: tuple[int, ...], rank: int, settings: dict,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The initial tensors (float32) of a module adapting a weight of ``base_shape`` at ``rank``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ MindSpore: layers

    def add_adapters(self, cell, targets: dict[str, tuple[int, float]], options, modules: dict | None = None) -> None:
        """Put an adapter of this algorithm on every module of ``targets`` (path → ``(rank, alpha)``) in ``cell``.

        ``modules`` (path → :class:`~mindone_lora_plugin.state.LoraModule`, when a file is loaded into a model without
        adapters) gives each layer the file's tensors and settings instead of fresh ones, so the layers have exactly
        the file's layout.
        """
        from mindone_lora_plugin.algorithms.layers import wrap_modules

        settings = self.settings_from(options)
        seed = int(getattr(options, "extra", {}).get("seed", 0) or 0)
        rng = np.random.default_rng([seed, 1301])

        def make(path, base_layer):
            rank, alpha = targets[path]
            if modules and path in modules:
                mod = modules[path]
                tensors = {k: np.asarray(as_f64(v), np.float32) for k, v in mod.tensors.items()}
                return self.make_layer(base_layer, tensors, float(mod.alpha), dict(mod.settings))
            shape = tuple(int(s) for s in base_layer.weight.shape)
            tensors = self.init_tensors(shape, int(rank), settings, rng)
            return self.make_layer(base_layer, tensors, float(alpha), settings)

        wrap_modules(cell, sorted(targets), make)

    def make_layer(self, base_layer, tensors: dict[str, np.ndarray], alpha: float, settings: dict):
        """The MindSpore layer wrapping ``base_layer`` with these initial tensors (see :mod:`.layers`)."""
        raise NotImplementedError(f"algorithm {self.name!r} implements neither make_layer nor add_adapters")

    def owns_layer(self, layer) -> bool:
        """True when ``layer`` (an adapted module of a model) is one of this algorithm's layers."""
        return getattr(layer, "algorithm_name", None) == self.name

    def layer_parameters(self, layer) -> dict:
        """Role → MindSpore ``Parameter`` of the trainable tensors of one of this algorithm's layers."""
        return dict(layer.role_parameters())

    def read_layer(self, layer):
        """The :class:`~mindone_lora_plugin.state.LoraModule` one of this algorithm's layers holds (float32)."""
        from mindone_lora_plugin.state import LoraModule

        tensors = {role: p.asnumpy().astype(np.float32) for role, p in layer.role_parameters()}
        return LoraModule(algorithm=self.name, tensors=tensors, alpha=float(layer.alpha),
                          settings=dict(layer.settings))

    def write_layer(self, layer, mod, where: str) -> None:
        """Put ``mod``'s tensors into one of this algorithm's layers (shapes must match)."""
        import mindspore as ms

        params = dict(layer.role_parameters())
        if set(params) != set(mod.tensors):
            raise LoraError(f"{where}: the file's {self.name} module has tensors {sorted(mod.tensors)} but the "
                            f"adapter here has {sorted(params)}; train with the same --lora_algo settings to load it")
        for role, p in params.items():
            value = np.asarray(as_f64(mod.tensors[role]), dtype=np.float32)
            if tuple(value.shape) != tuple(p.shape):
                raise LoraError(f"{where}: {self.kohya_names.get(role, role)} is {list(value.shape)} in the file but "
                                f"{list(p.shape)} here; use the same --lora_rank/--lora_algo settings to load it")
            p.set_data(ms.Tensor(value, dtype=p.dtype))
        layer.set_alpha(float(mod.alpha))

    # ------------------------------------------------------------------ reporting

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description,
                "kohya_tensors": sorted(self.kohya_names.values()),
                "diffusers": self.peft_names is not None}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def kaiming_uniform(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """torch's ``kaiming_uniform_(a=sqrt(5))``: uniform in ±1/sqrt(fan_in) (fan_in = shape[1] × receptive field)."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


# 16-bit floats: |x| as bits ≥ the all-ones exponent means Inf or NaN (two SIMD passes; numpy's isfinite on fp16 and
# bf16 is a slow scalar loop)
_NONFINITE_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def _all_finite(arr: np.ndarray) -> bool:
    limit = _NONFINITE_BITS.get(arr.dtype.name)
    if limit is not None and arr.dtype.itemsize == 2:
        bits = np.ascontiguousarray(arr).view(np.uint16)
        return bits.size == 0 or int(np.bitwise_and(bits, 0x7FFF).max()) < limit
    a = arr if arr.dtype.kind in "fc" else arr.astype(np.float32)
    return bool(np.isfinite(a).all())


def check_finite(tensors: dict, where: str) -> None:
    """Raise :class:`LoraError` naming the first tensor (in key order) holding NaN or Inf."""
    for key in tensors:
        arr = np.asarray(tensors[key])
        if (arr.dtype.kind in "fc" or arr.dtype.name == "bfloat16") and not _all_finite(arr):
            a = as_dtype(arr, np.float32)
            bad = "NaN" if np.isnan(a).any() else "Inf"
            raise LoraError(f"{where}: tensor '{key}' holds {bad} values; the file is corrupted (training "
                            "diverged?); nothing was written")
