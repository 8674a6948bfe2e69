"""CPU replacements for MindSpore's random-number primitives, and the PyNative ``Generator`` STEP patch.

The random primitives (``Randn``, ``RandnLike``, ``RandInt``, ``RandExt``, ``Normal*``, dropout)
receive a ``(seed, offset)`` pair from a ``mindspore.Generator`` (``ms.manual_seed`` seeds the default one; note that
``ms.set_seed`` does not). The replacements turn that pair into numbers with a counter-based generator (SplitMix64
over the element index, Box-Muller for normals). Stock PyNative never advances a generator's offset on CPU (its STEP
command is a no-op in Python, left to Ascend's kernels), so the ``Generator`` primitive is made to run its STEP kernel,
as GRAPH_MODE does. Result: on CPU, ``mint.randn_like``/``mint.randint``/dropout/... follow ``ms.manual_seed`` and
``ms.get_rng_state``/``ms.set_rng_state``, and give the same numbers in PyNative and GRAPH_MODE (different numbers
from Ascend's Philox kernels for the same seed). :func:`randn`, :func:`rand` and :func:`randint` are the same samplers
with a plain signature.
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore.common import dtype as mstype
from mindspore.ops import operations as P
from mindspore.ops.operations import _inner_ops

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.runtime.cpu.kernels import scalar

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
        along = P.Range()(scalar(0, mstype.int64), scalar(size, mstype.int64), scalar(1, mstype.int64))
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


def patch_generator(original_calls: dict) -> str:
    """Make PyNative's STEP advance the offset where MindSpore does not; returns what was done, for diagnostics."""
    if generator_steps_natively():
        return "native"
    if not callable(getattr(_inner_ops, "pyboost_generator", None)):
        raise LoraError(f"MindSpore {ms.__version__}'s random-number generator does not step on CPU and the CPU "
                        f"backend cannot patch it; install a MindSpore in the supported range (docs/compatibility.md)")
    original_calls[_inner_ops.Generator] = _inner_ops.Generator.__dict__.get("__call__")
    _inner_ops.Generator.__call__ = _generator_call
    return "patched"


