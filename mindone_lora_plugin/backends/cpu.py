"""Run mindone 0.5.0's Stable Diffusion models on MindSpore 2.7.1's CPU backend.

mindone's diffusers/transformers code calls ``mindspore.mint``, and several of the primitives behind ``mint`` have no
CPU kernel (``Conv2DExt``, ``LayerNormExt``, ``GeluExt``, ``Arange``, ``Randn``, ...). This module replaces each of
them by a small Python function with the primitive's own call signature, built from primitives that do have CPU
kernels (legacy ``Conv2D``, ``LayerNorm``, ``Erf``, ``Range``, slicing, integer arithmetic). GRAPH_MODE inlines the
Python functions, PyNative runs them op by op; both differentiate through them.

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

Random numbers: the random primitives (``Randn``, ``RandnLike``, ``RandInt``, ``RandExt``, ``Normal*``, dropout)
receive a ``(seed, offset)`` pair from a ``mindspore.Generator`` (``ms.manual_seed`` seeds the default one; note that
``ms.set_seed`` does not). The replacements turn that pair into numbers with a counter-based generator (SplitMix64
over the element index, Box-Muller for normals). Stock PyNative never advances a generator's offset on CPU (its STEP
command is a no-op in Python, left to Ascend's kernels), so the ``Generator`` primitive is made to run its STEP kernel,
as GRAPH_MODE does. Result: on CPU, ``mint.randn_like``/``mint.randint``/dropout/... follow ``ms.manual_seed`` and
``ms.get_rng_state``/``ms.set_rng_state``, and give the same numbers in PyNative and GRAPH_MODE (different numbers
from Ascend's Philox kernels for the same seed). :func:`randn`, :func:`rand` and :func:`randint` are the same samplers
with a plain signature.

FLUX.1's primitives (``Outer``, ``RepeatInterleaveInt``, ``Embedding``, ``FillScalar``/``FillTensor``, mindone's
``scaled_dot_product_attention`` and the FLUX constructs that call ``Tensor.chunk``/``split``/``unbind``) are replaced
by :mod:`mindone_lora_plugin.backends.cpu_transformer`, merged into the tables here. Large unmasked attention calls of
the SD/SDXL UNet take :mod:`mindone_lora_plugin.backends.cpu_attention`'s chunked attention, which does not keep the
score matrices for the backward pass (the memory of full-size models at 512 px and more).

Known limits (not on the SD/SDXL/FLUX LoRA paths, left as shipped; measured with the backend active): ``mint.mul``
with a Python scalar (``Muls``; the ``*`` operator works), ``mint.full_like``, ``mint.empty``, ``mint.argmax``,
``mint.topk``/``mint.sort``, ``mint.norm``, ``mint.std``, ``mint.baddbmm``, ``mint.index_select``,
``repeat_interleave`` with a tensor of counts, ``mint.einsum``, avg/max/adaptive pooling and ``conv_transpose2d``
still have no CPU kernel.

This leans on MindSpore's private module layout, so it asks by feature: the primitive tables are resolved by name
(a primitive a MindSpore release renamed or dropped is skipped: ``backends.primitives.ABSENT_PRIMITIVES``), and the
``Generator`` patch is installed only where PyNative's STEP does not advance the offset (2.7; 2.8 and later step
natively, and lack the private ``pyboost_generator`` the patch runs). Which was done is in :data:`FEATURES`. None of
the other replaced primitives has a CPU kernel in MindSpore 2.10.0 either (measured, docs/compatibility.md), so they
stay replaced. The versions it runs on are ``mindone_lora_plugin.runtime.SUPPORTED``; every replacement has a numerical
test against numpy.
"""

from __future__ import annotations

import importlib.abc
import math
import sys
import threading

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore.common import dtype as mstype
from mindspore.ops import functional_overload, operations as P
from mindspore.ops._primitive_cache import _get_cache_prim
from mindspore.ops.auto_generate import gen_ops_prim, pyboost_inner_prim
from mindspore.ops.operations import _inner_ops

import mindone_lora_plugin.backends.cpu_attention as cpu_attention
import mindone_lora_plugin.backends.cpu_transformer as cpu_transformer
import mindone_lora_plugin.backends.primitives as primitives
from mindone_lora_plugin.errors import LoraError

# --------------------------------------------------------------------------------------------------------------------
# Small helpers (all graph-mode safe: constant folding handles the Python-level shape arithmetic)
# --------------------------------------------------------------------------------------------------------------------


def _pair(value):
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return (value[0], value[0])
        return (value[0], value[1])
    return (value, value)


def _narrow(x, dim, start, length):
    """``x`` restricted to ``[start, start + length)`` along ``dim`` (a static slice)."""
    ndim = x.ndim
    if dim < 0:
        dim = dim + ndim
    shape = x.shape
    begin = (0,) * dim + (start,) + (0,) * (ndim - dim - 1)
    size = shape[:dim] + (length,) + shape[dim + 1:]
    return ops.slice(x, begin, size)


def _split_sizes(x, sizes, dim):
    outs = ()
    start = 0
    for size in sizes:
        outs = outs + (_narrow(x, dim, start, size),)
        start = start + size
    return outs


def _chunk_sizes(total, chunk):
    """Sizes of ``ceil(total / chunk)`` pieces of at most ``chunk`` elements (torch's ``split(int)``)."""
    sizes = ()
    for i in range((total + chunk - 1) // chunk):
        sizes = sizes + (min(chunk, total - i * chunk),)
    return sizes


# --------------------------------------------------------------------------------------------------------------------
# Replacements: one per kernel-less primitive, same call signature as the primitive object
# --------------------------------------------------------------------------------------------------------------------


def _conv2d(input, weight, bias, stride, pad_mode, pad, dilation, groups):
    conv = _get_cache_prim(P.Conv2D)(weight.shape[0], weight.shape[2:4], 1, pad_mode, pad, _pair(stride),
                                     _pair(dilation), groups, "NCHW")
    out = conv(input, weight)
    if bias is not None:
        out = _get_cache_prim(P.BiasAdd)()(out, bias)
    return out


def conv2d_ext_op(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``Conv2DExt`` (numeric padding) via the legacy ``Conv2D`` primitive."""
    unbatched = input.ndim == 3
    if unbatched:
        input = input.expand_dims(0)
    ph, pw = _pair(padding)
    out = _conv2d(input, weight, bias, stride, "pad", (ph, ph, pw, pw), dilation, groups)
    if unbatched:
        out = out.squeeze(0)
    return out


def conv2d_padding_op(input, weight, bias=None, stride=1, padding="valid", dilation=1, groups=1):
    """``Conv2DPadding`` (``padding="same"``/``"valid"``) via the legacy ``Conv2D`` primitive."""
    unbatched = input.ndim == 3
    if unbatched:
        input = input.expand_dims(0)
    out = _conv2d(input, weight, bias, stride, padding, 0, dilation, groups)
    if unbatched:
        out = out.squeeze(0)
    return out


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """The ``functional_overload.conv2d`` dispatcher (``mint.nn.functional.conv2d``)."""
    if isinstance(padding, str):
        return conv2d_padding_op(input, weight, bias, stride, padding, dilation, groups)
    return conv2d_ext_op(input, weight, bias, stride, padding, dilation, groups)


def layer_norm_ext_op(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``LayerNormExt`` -> ``(output, mean, rstd)`` via the legacy ``LayerNorm`` primitive, computed in float32.

    (The legacy kernel's float16 backward is unreliable on CPU, so half-precision inputs are upcast and the output is
    cast back.)
    """
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    axis = input.ndim - len(normalized_shape)
    dtype = input.dtype
    x = input.astype(mstype.float32)
    if weight is None:
        gamma = ops.ones(normalized_shape, mstype.float32)
    else:
        gamma = weight.astype(mstype.float32)
    if bias is None:
        beta = ops.zeros(normalized_shape, mstype.float32)
    else:
        beta = bias.astype(mstype.float32)
    out, mean, var = P.LayerNorm(axis, axis, eps)(x, gamma, beta)
    rstd = ops.rsqrt(var + eps)
    return out.astype(dtype), mean, rstd


_INV_SQRT2 = 0.7071067811865476


def gelu_ext_op(input, approximate="none"):
    """``GeluExt``: exact GELU ``x * Phi(x)`` via ``Erf``; ``approximate="tanh"`` via the legacy ``GeLU``."""
    dtype = input.dtype
    x = input.astype(mstype.float32)
    if approximate == "tanh":
        out = P.GeLU()(x)
    else:
        out = 0.5 * x * (1.0 + ops.erf(x * _INV_SQRT2))
    return out.astype(dtype)


def gelu(input, approximate="none"):
    """The ``functional_overload.gelu`` dispatcher (``mint.nn.functional.gelu``)."""
    return gelu_ext_op(input, approximate)


def arange_op(start, end, step, dtype=None):
    """``Arange`` via the ``Range`` primitive (int64 when all bounds are integers and no dtype is given)."""
    if dtype is None:
        if isinstance(start, int) and isinstance(end, int) and isinstance(step, int):
            dtype = mstype.int64
        else:
            dtype = mstype.float32
    if dtype in (mstype.int32, mstype.int64, mstype.float32, mstype.float64):
        work = dtype
    elif dtype in (mstype.int8, mstype.int16, mstype.uint8):
        work = mstype.int64
    else:
        work = mstype.float32
    out = P.Range()(_scalar(start, work), _scalar(end, work), _scalar(step, work))
    return out.astype(dtype)


def _scalar(value, dtype):
    if isinstance(value, Tensor):
        return value.astype(dtype)
    return ops.scalar_to_tensor(value, dtype)


def mse_loss_ext_op(input, target, reduction="mean"):
    """``MSELossExt`` as plain arithmetic."""
    diff = input - target
    loss = diff * diff
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def constant_pad_nd_op(input, padding, value=0.0):
    """``ConstantPadND`` (torch-ordered, possibly negative padding) via the legacy ``PadV3`` primitive."""
    padding = tuple(padding)
    if not padding:
        return input
    pads = ops.stack(padding).astype(mstype.int64) if isinstance(padding[0], Tensor) else Tensor(padding, mstype.int64)
    return P.PadV3(mode="constant", paddings_contiguous=True)(input, pads, _scalar(value, input.dtype))


def zeros_like_ext_op(input, dtype=None):
    """``ZerosLikeExt`` via ``ZerosLike`` (+ ``Cast``)."""
    out = P.ZerosLike()(input)
    if dtype is not None:
        out = out.astype(dtype)
    return out


def ones_like_ext_op(input, dtype=None):
    """``OnesLikeExt`` via ``OnesLike`` (+ ``Cast``)."""
    out = P.OnesLike()(input)
    if dtype is not None:
        out = out.astype(dtype)
    return out


def stack_ext_impl(tensors, dim=0):
    """``StackExt`` via the legacy ``Stack`` primitive."""
    return P.Stack(dim)(tuple(tensors))


def split_with_size_op(input, split_size, dim=0):
    """``SplitWithSize`` (explicit sizes) as static slices."""
    return _split_sizes(input, tuple(split_size), dim)


def split_tensor_op(input, split_size, dim=0):
    """``SplitTensor`` (pieces of ``split_size``, the last one smaller) as static slices."""
    return _split_sizes(input, _chunk_sizes(input.shape[dim], split_size), dim)


def chunk_op(input, chunks, dim=0):
    """``Chunk`` (torch semantics: pieces of ``ceil(n / chunks)``) as static slices."""
    total = input.shape[dim]
    return _split_sizes(input, _chunk_sizes(total, (total + chunks - 1) // chunks), dim)


# --------------------------------------------------------------------------------------------------------------------
# Counter-based random numbers: SplitMix64 (Steele, Lea & Flood 2014) keyed by a generator's (seed, offset)
# --------------------------------------------------------------------------------------------------------------------


def _i64(value):
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return Tensor(np.array(value, np.uint64).astype(np.int64))


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)
_TWO_POW_M53 = 1.0 / float(1 << 53)
_TWO_PI = 2.0 * math.pi


def _srl(z, s):
    """Logical right shift of int64 bits."""
    shift = ops.scalar_to_tensor(s, mstype.int64)
    mask = ops.scalar_to_tensor((1 << (64 - s)) - 1, mstype.int64)
    return ops.bitwise_and(P.RightShift()(z, shift), mask)


def _mix64(z):
    """SplitMix64's finaliser (int64 arithmetic wraps like uint64)."""
    z = ops.bitwise_xor(z, _srl(z, 30)) * _MIX1
    z = ops.bitwise_xor(z, _srl(z, 27)) * _MIX2
    return ops.bitwise_xor(z, _srl(z, 31))


def _element_index(shape):
    """int64 tensor of ``shape`` holding each element's row-major index."""
    index = ops.zeros(shape, mstype.int64)
    stride = 1
    ndim = len(shape)
    for k in range(ndim):
        axis = ndim - 1 - k
        size = shape[axis]
        along = P.Range()(_scalar(0, mstype.int64), _scalar(size, mstype.int64), _scalar(1, mstype.int64))
        along = along.reshape((size,) + (1,) * (ndim - 1 - axis))
        index = index + along * stride
        stride = stride * size
    return index


def _stream_key(seed, offset):
    """An int64 key for the stream that a generator's ``(seed, offset)`` pair names."""
    seed = _as_int64(seed)
    offset = _as_int64(offset)
    return _mix64(ops.bitwise_xor(_mix64(seed * _GOLDEN), offset * _MIX1 + _GOLDEN))


def _as_int64(value):
    if isinstance(value, Tensor):
        return value.astype(mstype.int64).reshape(())
    return ops.scalar_to_tensor(value, mstype.int64)


def _uniform53(shape, seed, offset, lane):
    """Float64 uniforms in ``[0, 1)`` (53 random bits), one per element; ``lane`` picks an independent sub-stream."""
    key = _stream_key(seed, offset)
    counter = (_element_index(shape) * 2 + (lane + 1)) * _GOLDEN
    bits = _srl(_mix64(key + counter), 11)
    return bits.astype(mstype.float64) * _TWO_POW_M53


def _normal64(shape, seed, offset):
    """Standard normals (float64) by Box-Muller on two sub-streams."""
    u1 = _uniform53(shape, seed, offset, 0)
    u2 = _uniform53(shape, seed, offset, 1)
    radius = ops.sqrt(-2.0 * ops.log(1.0 - u1))
    return radius * ops.cos(_TWO_PI * u2)


def _shape_tuple(shape):
    if isinstance(shape, int):
        return (shape,)
    return tuple(shape)


def _float_dtype(dtype):
    return mstype.float32 if dtype is None else dtype


def randn_op(shape, seed, offset, dtype=None, device=None):
    """``Randn``: standard normals keyed by ``(seed, offset)``. (``device``, which MindSpore 2.8 and later pass to
    every random primitive, is the CPU the replacements run on.)"""
    return _normal64(_shape_tuple(shape), seed, offset).astype(_float_dtype(dtype))


def randn_like_op(input, seed, offset, dtype=None, device=None):
    """``RandnLike``."""
    return _normal64(input.shape, seed, offset).astype(input.dtype if dtype is None else dtype)


def rand_ext_op(shape, seed, offset, dtype=None, device=None):
    """``RandExt``: uniforms in ``[0, 1)``."""
    return _uniform53(_shape_tuple(shape), seed, offset, 0).astype(_float_dtype(dtype))


def rand_like_ext_op(tensor, seed, offset, dtype=None, device=None):
    """``RandLikeExt``."""
    return _uniform53(tensor.shape, seed, offset, 0).astype(tensor.dtype if dtype is None else dtype)


def _randint(low, high, shape, seed, offset):
    u = _uniform53(shape, seed, offset, 0)
    span = (high - low)
    return ops.floor(u * span).astype(mstype.int64) + low


def randint_op(low, high, shape, seed, offset, dtype=None, device=None):
    """``RandInt``: integers uniform in ``[low, high)``."""
    out = _randint(low, high, _shape_tuple(shape), seed, offset)
    return out.astype(mstype.int64 if dtype is None else dtype)


def randint_like_op(input, low, high, seed, offset, dtype=None, device=None):
    """``RandIntLike``."""
    out = _randint(low, high, input.shape, seed, offset)
    return out.astype(input.dtype if dtype is None else dtype)


def normal_float_float_op(mean, std, size, seed, offset):
    """``NormalFloatFloat``: ``mean + std * N(0, 1)`` of shape ``size``."""
    return (_normal64(_shape_tuple(size), seed, offset) * std + mean).astype(mstype.float32)


def normal_tensor_tensor_op(mean, std, seed, offset):
    """``NormalTensorTensor``."""
    return _normal64((mean + std).shape, seed, offset).astype(mean.dtype) * std + mean


def normal_tensor_float_op(mean, std, seed, offset):
    """``NormalTensorFloat``."""
    return _normal64(mean.shape, seed, offset).astype(mean.dtype) * std + mean


def normal_float_tensor_op(mean, std, seed, offset):
    """``NormalFloatTensor``."""
    return _normal64(std.shape, seed, offset).astype(std.dtype) * std + mean


def _dropout(input, p, seed, offset):
    keep = _uniform53(input.shape, seed, offset, 0) >= p
    mask = keep.astype(input.dtype)
    return input * mask * (1.0 / (1.0 - p)), keep


def dropout_ext_op(input, p, seed, offset):
    """``DropoutExt`` -> ``(output, mask)``."""
    return _dropout(input, p, seed, offset)


def func_dropout_ext_op(input, p=0.5, training=True, inplace=False, seed=0, offset=0):
    """``FuncDropoutExt`` (``mint.nn.Dropout``/``mint.nn.functional.dropout``); ``inplace`` returns a new tensor."""
    if not training or p == 0:
        return input
    if p == 1:
        return input * 0.0
    return _dropout(input, p, seed, offset)[0]


# --------------------------------------------------------------------------------------------------------------------
# Public samplers with a plain signature (usable eagerly and inside jitted code)
# --------------------------------------------------------------------------------------------------------------------

_GENERATOR_STEP = Tensor(12, mstype.int64)


def _next_seed_offset(generator):
    if generator is None:
        generator = ms.common.generator.default_generator
    return generator._step(_GENERATOR_STEP)  # pylint: disable=protected-access


def randn(shape, dtype=None, generator=None):
    """Standard normal samples of ``shape`` drawn from ``generator`` (default: MindSpore's default generator)."""
    seed, offset = _next_seed_offset(generator)
    return randn_op(shape, seed, offset, dtype)


def rand(shape, dtype=None, generator=None):
    """Uniform samples in ``[0, 1)``."""
    seed, offset = _next_seed_offset(generator)
    return rand_ext_op(shape, seed, offset, dtype)


def randint(low, high, shape, dtype=None, generator=None):
    """Integers uniform in ``[low, high)`` (int64 unless ``dtype``)."""
    seed, offset = _next_seed_offset(generator)
    return randint_op(low, high, shape, seed, offset, dtype)


# --------------------------------------------------------------------------------------------------------------------
# GEGLU / SwiGLU without the Tensor method ``.chunk()``
# --------------------------------------------------------------------------------------------------------------------


def _halves(x):
    half = x.shape[-1] // 2
    return _narrow(x, -1, 0, half), _narrow(x, -1, half, half)


def geglu_construct(self, hidden_states):
    """mindone's ``GEGLU.construct`` with slicing instead of ``.chunk(2, dim=-1)``."""
    hidden_states, gate = _halves(self.proj(hidden_states))
    return hidden_states * self.gelu(gate)


def swiglu_construct(self, hidden_states):
    """mindone's ``SwiGLU.construct`` with slicing instead of ``.chunk(2, dim=-1)``."""
    hidden_states, gate = _halves(self.proj(hidden_states))
    return hidden_states * self.activation(gate)


def gather_rows(table, ids, out_shape):
    """Rows ``ids`` (flat) of ``table`` (``Gather`` on axis 0), reshaped to ``out_shape``. The CPU ``Gather`` and
    ``Reshape`` kernels have no bfloat16 variant, so a bfloat16 table is gathered and reshaped in float32 and the rows
    cast back: exact, since every bfloat16 value is a float32 one (the float32 copy is a transient of the call)."""
    if table.dtype == mstype.bfloat16:
        rows = ops.gather(table.astype(mstype.float32), ids, 0)
        return rows.reshape(out_shape).astype(mstype.bfloat16)
    return ops.gather(table, ids, 0).reshape(out_shape)


def embedding_construct(self, ids):
    """``mindspore.nn.Embedding.construct`` (what mindone's CLIP embeddings use) with :func:`gather_rows`."""
    out_shape = ids.shape + (self.embedding_size,)
    flat_ids = ids.reshape((-1,))
    if self.use_one_hot:
        rows = self.array_mul(self.one_hot(flat_ids, self.vocab_size, self.on_value, self.off_value),
                              self.embedding_table)
        return rows.reshape(out_shape)
    return gather_rows(self.embedding_table, flat_ids, out_shape)


_CONSTRUCT_PATCHES = {
    "mindone.diffusers.models.activations": {"GEGLU": geglu_construct, "SwiGLU": swiglu_construct},
    "mindspore.nn.layer.embedding": {"Embedding": embedding_construct},
}
_CONSTRUCT_PATCHES.update(cpu_transformer.CONSTRUCT_PATCHES)

# --------------------------------------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------------------------------------

#: primitive class -> replacement (the classes are matched exactly, so subclasses with other kernels are untouched)
PRIMITIVE_REPLACEMENTS = primitives.primitive_table(gen_ops_prim, {
    "Conv2DExt": conv2d_ext_op,
    "Conv2DPadding": conv2d_padding_op,
    "LayerNormExt": layer_norm_ext_op,
    "GeluExt": gelu_ext_op,
    "Arange": arange_op,
    "MSELossExt": mse_loss_ext_op,
    "ConstantPadND": constant_pad_nd_op,
    "ZerosLikeExt": zeros_like_ext_op,
    "OnesLikeExt": ones_like_ext_op,
    "SplitWithSize": split_with_size_op,
    "SplitTensor": split_tensor_op,
    "Chunk": chunk_op,
    "Randn": randn_op,
    "RandnLike": randn_like_op,
    "RandExt": rand_ext_op,
    "RandLikeExt": rand_like_ext_op,
    "RandInt": randint_op,
    "RandIntLike": randint_like_op,
    "NormalFloatFloat": normal_float_float_op,
    "NormalTensorTensor": normal_tensor_tensor_op,
    "NormalTensorFloat": normal_tensor_float_op,
    "NormalFloatTensor": normal_float_tensor_op,
    "DropoutExt": dropout_ext_op,
    "FuncDropoutExt": func_dropout_ext_op,
})
PRIMITIVE_REPLACEMENTS.update(primitives.primitive_table(pyboost_inner_prim, {"_PyboostStackExtPrim": stack_ext_impl}))
PRIMITIVE_REPLACEMENTS.update(cpu_transformer.PRIMITIVE_REPLACEMENTS)  # FLUX.1: rotary tables, T5 embeddings, mint.full

#: original dispatcher function -> replacement
DISPATCHER_REPLACEMENTS = {getattr(functional_overload, name): replacement
                           for name, replacement in (("conv2d", conv2d), ("gelu", gelu))
                           if hasattr(functional_overload, name)}

_PACKAGES = ("mindspore", "mindone")


def _is_target_module(name) -> bool:
    """``mindspore``/``mindone`` and their submodules (not e.g. ``mindone_lora_plugin``)."""
    if not isinstance(name, str):
        return False
    return name in _PACKAGES or name.split(".", 1)[0] in _PACKAGES


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


def _generator_call(self, cmd, inputs):
    """PyNative ``Generator`` primitive that also runs the STEP command (stock 2.7 returns the seed/offset
    Parameters without advancing them, leaving it to Ascend's random kernels); GRAPH_MODE already runs the kernel."""
    return _inner_ops.pyboost_generator(self, [cmd, inputs])


def generator_steps_natively() -> bool:
    """Whether a PyNative ``mindspore.Generator`` advances its offset on STEP as shipped (MindSpore 2.8 and later
    run the command in C++; 2.7 returns the offset unchanged). Asked by behaviour, before :func:`install` patches."""
    generator = ms.Generator()
    first = int(generator._step(_GENERATOR_STEP)[1])  # pylint: disable=protected-access
    return int(generator._step(_GENERATOR_STEP)[1]) != first  # pylint: disable=protected-access


def _patch_generator() -> str:
    """Make PyNative's STEP advance the offset where MindSpore does not; returns what was done, for diagnostics."""
    if generator_steps_natively():
        return "native"
    if not callable(getattr(_inner_ops, "pyboost_generator", None)):
        raise LoraError(f"MindSpore {ms.__version__}'s random-number generator does not step on CPU and the CPU "
                        f"backend cannot patch it; install a MindSpore in the supported range (docs/compatibility.md)")
    _original_calls[_inner_ops.Generator] = _inner_ops.Generator.__dict__.get("__call__")
    _inner_ops.Generator.__call__ = _generator_call
    return "patched"


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
            FEATURES["generator_step"] = _patch_generator()
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
