"""Installing the CPU backend: the replacement tables and how they are put in place.

How the replacements are installed (:func:`install`):

* every loaded ``mindspore*``/``mindone*`` module attribute that *is* a kernel-less primitive object (matched by the
  primitive's class) or one of the ``functional_overload`` dispatchers for ``conv2d``/``gelu`` is rebound to the
  replacement; modules imported later are treated the same way by an import hook, so activation can happen before
  mindone is imported (it is cheap: one pass over module dictionaries);
* as a PyNative safety net, the primitive classes' ``__call__`` is redirected to the replacement (this also covers
  primitive objects stored on Cells built before :func:`install`; for GRAPH_MODE use :func:`patch_cells`);
* mindone's ``GEGLU``/``SwiGLU`` split their projection with the Tensor method ``.chunk()``, which GRAPH_MODE
  compiles to the kernel-less ``Chunk``/``SplitTensor``; their ``construct`` is routed through :func:`geglu_construct`
  / :func:`swiglu_construct`, which slice instead.

FLUX.1's primitives (``Outer``, ``RepeatInterleaveInt``, ``Embedding``, ``FillScalar``/``FillTensor``, mindone's
``scaled_dot_product_attention`` and the FLUX constructs that call ``Tensor.chunk``/``split``/``unbind``) are replaced
by :mod:`mindone_lora_plugin.runtime.cpu.transformer`, merged into the tables here. Large unmasked attention calls of
the SD/SDXL UNet take :mod:`mindone_lora_plugin.runtime.cpu.attention`'s chunked attention, which does not keep the
score matrices for the backward pass (the memory of full-size models at 512 px and more).

This leans on MindSpore's private module layout, so it asks by feature: the primitive tables are resolved by name
(a primitive a MindSpore release renamed or dropped is skipped: ``primitives.ABSENT_PRIMITIVES``), and the
``Generator`` patch is installed only where PyNative's STEP does not advance the offset (2.7; 2.8 and later step
natively, and lack the private ``pyboost_generator`` the patch runs). Which was done is in :data:`FEATURES`. None of
the other replaced primitives has a CPU kernel in MindSpore 2.10.0 either (measured, docs/compatibility.md), so they
stay replaced. The versions it runs on are ``mindone_lora_plugin.runtime.process.SUPPORTED``; every replacement has a
numerical test against numpy.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

from mindspore.ops import functional_overload
from mindspore.ops.auto_generate import gen_ops_prim, pyboost_inner_prim

import mindone_lora_plugin.runtime.cpu.attention as cpu_attention
import mindone_lora_plugin.runtime.cpu.kernels as kernels
import mindone_lora_plugin.runtime.cpu.primitives as primitives
import mindone_lora_plugin.runtime.cpu.rng as rng
import mindone_lora_plugin.runtime.cpu.transformer as cpu_transformer

# --------------------------------------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------------------------------------

#: primitive class -> replacement (the classes are matched exactly, so subclasses with other kernels are untouched)
PRIMITIVE_REPLACEMENTS = primitives.primitive_table(gen_ops_prim, {
    "Conv2DExt": kernels.conv2d_ext_op,
    "Conv2DPadding": kernels.conv2d_padding_op,
    "LayerNormExt": kernels.layer_norm_ext_op,
    "GeluExt": kernels.gelu_ext_op,
    "Arange": kernels.arange_op,
    "MSELossExt": kernels.mse_loss_ext_op,
    "ConstantPadND": kernels.constant_pad_nd_op,
    "ZerosLikeExt": kernels.zeros_like_ext_op,
    "OnesLikeExt": kernels.ones_like_ext_op,
    "SplitWithSize": kernels.split_with_size_op,
    "SplitTensor": kernels.split_tensor_op,
    "Chunk": kernels.chunk_op,
    "Randn": rng.randn_op,
    "RandnLike": rng.randn_like_op,
    "RandExt": rng.rand_ext_op,
    "RandLikeExt": rng.rand_like_ext_op,
    "RandInt": rng.randint_op,
    "RandIntLike": rng.randint_like_op,
    "NormalFloatFloat": rng.normal_float_float_op,
    "NormalTensorTensor": rng.normal_tensor_tensor_op,
    "NormalTensorFloat": rng.normal_tensor_float_op,
    "NormalFloatTensor": rng.normal_float_tensor_op,
    "DropoutExt": rng.dropout_ext_op,
    "FuncDropoutExt": rng.func_dropout_ext_op,
})
PRIMITIVE_REPLACEMENTS.update(primitives.primitive_table(pyboost_inner_prim,
                                                        {"_PyboostStackExtPrim": kernels.stack_ext_impl}))
PRIMITIVE_REPLACEMENTS.update(cpu_transformer.PRIMITIVE_REPLACEMENTS)  # FLUX.1: rotary tables, T5 embeddings, mint.full

#: original dispatcher function -> replacement
DISPATCHER_REPLACEMENTS = {getattr(functional_overload, name): replacement
                           for name, replacement in (("conv2d", kernels.conv2d), ("gelu", kernels.gelu),
                                                              ("einsum", kernels.einsum))
                           if hasattr(functional_overload, name)}

#: construct methods replaced, by module and class
_CONSTRUCT_PATCHES = {**kernels.CONSTRUCT_PATCHES, **cpu_transformer.CONSTRUCT_PATCHES}

#: the packages whose modules the backend patches (a module of one, or the package itself)
PACKAGES = ("mindspore", "mindone")


def _is_target_module(name) -> bool:
    """``mindspore``/``mindone`` and their submodules (not e.g. ``mindone_lora_plugin``)."""
    if not isinstance(name, str):
        return False
    return name in PACKAGES or name.split(".", 1)[0] in PACKAGES


_lock = threading.RLock()
_installed = False
_rebound: list[tuple[str, str]] = []  # (module, attribute) pairs that were rebound, for diagnostics
_original_calls: dict[type, object] = {}
#: what :func:`install` found in the running MindSpore: feature -> "native" (left as shipped) or "patched"
FEATURES: dict[str, str] = {}


def _replacement_for(value):
    replacement = PRIMITIVE_REPLACEMENTS.get(type(value))
    if replacement is not None:
        return replacement
    if callable(value) and not isinstance(value, type):
        try:
            return DISPATCHER_REPLACEMENTS.get(value)
        except TypeError:  # unhashable callables
            return None
    return None


def _register_function_replacements(module) -> None:
    """For a module named in ``cpu_transformer.FUNCTION_REPLACEMENTS``: its original functions join
    :data:`DISPATCHER_REPLACEMENTS`, so they are replaced there and in every module that imported them."""
    for name, replacement in cpu_transformer.FUNCTION_REPLACEMENTS.get(getattr(module, "__name__", None), {}).items():
        original = vars(module).get(name)
        if original is not None and original is not replacement:
            DISPATCHER_REPLACEMENTS[original] = replacement


def _rebind_module(module) -> int:
    """Rebind the kernel-less primitive objects and dispatchers that ``module`` holds; returns how many."""
    try:
        namespace = vars(module)
    except TypeError:
        return 0
    _register_function_replacements(module)
    cpu_transformer.adopt_globals(module)
    count = 0
    for name, value in list(namespace.items()):
        if name.startswith("__"):
            continue
        replacement = _replacement_for(value)
        if replacement is not None and replacement is not value:
            namespace[name] = replacement
            _rebound.append((getattr(module, "__name__", "?"), name))
            count += 1
    patches = _CONSTRUCT_PATCHES.get(getattr(module, "__name__", None))
    if patches:
        for target, construct in patches.items():
            cls_name, _, method = target.partition(".")
            method = method or "construct"
            cls = namespace.get(cls_name)
            if isinstance(cls, type) and cls.__dict__.get(method) is not construct:
                setattr(cls, method, construct)
                count += 1
    if getattr(module, "__name__", None) == cpu_attention.ATTENTION_MODULE and cpu_attention.install_into(
            namespace.get("Attention")):
        count += 1
    return count


def _redirect_call(cls, replacement):
    if cls in _original_calls:
        return
    _original_calls[cls] = cls.__dict__.get("__call__")

    def __call__(self, *args, **kwargs):  # noqa: N807
        return replacement(*args, **kwargs)

    __call__.__name__ = f"{cls.__name__}__cpu_call"
    cls.__call__ = __call__


class _RebindOnImport(importlib.abc.MetaPathFinder):
    """Applies :func:`_rebind_module` to every mindspore/mindone module right after it is executed.

    It finds nothing itself: it asks the other finders and wraps the found loader instance's ``exec_module`` (the
    loader keeps its class, so nothing that inspects loaders notices).
    """

    def find_spec(self, fullname, path, target=None):
        if not _is_target_module(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return spec
        if "exec_module" not in getattr(loader, "__dict__", {"exec_module": None}):
            exec_module = loader.exec_module

            def exec_and_rebind(module):
                exec_module(module)
                _rebind_module(module)

            try:
                loader.exec_module = exec_and_rebind
            except (AttributeError, TypeError):  # loaders without an instance __dict__ stay as they are
                pass
        return spec


_finder = _RebindOnImport()


def install() -> int:
    """Install the CPU replacements (idempotent). Returns the number of attributes rebound by this call."""
    global _installed
    with _lock:
        count = 0
        for name in cpu_transformer.FUNCTION_REPLACEMENTS:  # before the pass: modules that imported them come first
            if sys.modules.get(name) is not None:
                _register_function_replacements(sys.modules[name])
        for name, module in list(sys.modules.items()):
            if module is not None and _is_target_module(name):
                count += _rebind_module(module)
        if not _installed:
            for cls, replacement in PRIMITIVE_REPLACEMENTS.items():
                _redirect_call(cls, replacement)
            FEATURES["generator_step"] = rng.patch_generator(_original_calls)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            _installed = True
        return count


def is_installed() -> bool:
    return _installed


def rebound_attributes() -> list[tuple[str, str]]:
    """``(module, attribute)`` pairs rebound so far."""
    return list(_rebound)


def patch_cells(*cells) -> int:
    """Rebind kernel-less primitive objects held as attributes of already-built Cells (needed for GRAPH_MODE when a
    model was built before :func:`install`). Returns how many were rebound."""
    count = 0
    for root in cells:
        for _, cell in root.cells_and_names():
            prims = cell.__dict__.get("_primitives", {})
            for name, prim in list(prims.items()):
                replacement = PRIMITIVE_REPLACEMENTS.get(type(prim))
                if replacement is not None:
                    del prims[name]
                    object.__setattr__(cell, name, replacement)
                    count += 1
    return count
