"""CPU replacements for the ``mindspore.mint`` primitives mindone 0.5.0's SD/SDXL UNet, VAE and CLIP reach that have no
kernel on MindSpore's CPU target.

mindone's diffusers/transformers code calls ``mindspore.mint``, and several of the primitives behind ``mint`` have no
CPU kernel (``Conv2DExt``, ``LayerNormExt``, ``GeluExt``, ``Arange``, ``Randn``, ...). This module replaces each of
them by a small Python function with the primitive's own call signature, built from primitives that do have CPU
kernels (legacy ``Conv2D``, ``LayerNorm``, ``Erf``, ``Range``, slicing, integer arithmetic). GRAPH_MODE inlines the
Python functions, PyNative runs them op by op; both differentiate through them.

The random-number primitives are in :mod:`~mindone_lora_plugin.runtime.cpu.rng`, how the replacements are installed in
:mod:`~mindone_lora_plugin.runtime.cpu.install`.

Known limits (not on the SD/SDXL/FLUX LoRA paths, left as shipped; measured with the backend active): ``mint.mul``
with a Python scalar (``Muls``; the ``*`` operator works), ``mint.full_like``, ``mint.empty``, ``mint.argmax``,
``mint.topk``/``mint.sort``, ``mint.norm``, ``mint.std``, ``mint.baddbmm``, ``mint.index_select``,
``repeat_interleave`` with a tensor of counts, ``mint.einsum`` other than a one-operand permutation (SD3's
unpatchify ``nhwpqc->nchpwq``: :func:`einsum`), avg/max/adaptive pooling and ``conv_transpose2d``
still have no CPU kernel.
"""

from __future__ import annotations

from mindspore import Tensor, ops
from mindspore.common import dtype as mstype
from mindspore.ops import operations as P
from mindspore.ops._primitive_cache import _get_cache_prim

# --------------------------------------------------------------------------------------------------------------------
# Small helpers (all graph-mode safe: constant folding handles the Python-level shape arithmetic)
# --------------------------------------------------------------------------------------------------------------------


def _pair(value):
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return (value[0], value[0])
        return (value[0], value[1])
    return (value, value)


def narrow(x, dim, start, length):
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
        outs = outs + (narrow(x, dim, start, size),)
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


def permutation(equation: str) -> tuple[int, ...] | None:
    """The axis order of a one-operand einsum ``equation`` that only permutes axes (``"nhwpqc->nchpwq"`` →
    ``(0, 5, 1, 3, 2, 4)``), else None."""
    equation = equation.replace(" ", "")
    if equation.count("->") != 1 or "," in equation or "." in equation:
        return None
    source, target = equation.split("->")
    if len(set(source)) != len(source) or sorted(source) != sorted(target):
        return None
    return tuple(source.index(c) for c in target)


#: the einsum equations mindone reaches on the LoRA paths → their axis order (SD3's unpatchify); a table, so GRAPH_MODE
#: looks the order up instead of parsing the string
PERMUTATIONS = {e: permutation(e) for e in ("nhwpqc->nchpwq",)}


def einsum(equation, *operands):
    """The ``functional_overload.einsum`` dispatcher (``mint.einsum``, Ascend only as shipped) for the one-operand
    axis permutations of :data:`PERMUTATIONS`, as a transpose (another equation: ``KeyError``)."""
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = operands[0]
    return operands[0].transpose(PERMUTATIONS[equation])


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
    out = P.Range()(scalar(start, work), scalar(end, work), scalar(step, work))
    return out.astype(dtype)


def scalar(value, dtype):
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
    return P.PadV3(mode="constant", paddings_contiguous=True)(input, pads, scalar(value, input.dtype))


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
# GEGLU / SwiGLU without the Tensor method ``.chunk()``
# --------------------------------------------------------------------------------------------------------------------


def _halves(x):
    half = x.shape[-1] // 2
    return narrow(x, -1, 0, half), narrow(x, -1, half, half)


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


CONSTRUCT_PATCHES = {
    "mindone.diffusers.models.activations": {"GEGLU": geglu_construct, "SwiGLU": swiglu_construct},
    "mindspore.nn.layer.embedding": {"Embedding": embedding_construct},
}

