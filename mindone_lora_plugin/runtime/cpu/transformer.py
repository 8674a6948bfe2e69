"""CPU replacements for the primitives that mindone 0.5.0's FLUX.1 models reach and MindSpore 2.7.1's CPU backend
lacks (rotary position embeddings, RMS norms, attention, T5's gated GELU, flow-matching sampling).

Kept apart from :mod:`mindone_lora_plugin.runtime.cpu.kernels` so each module reads in one sitting; ``cpu`` merges
:data:`PRIMITIVE_REPLACEMENTS` into its own table and installs them the same way (rebinding module attributes, and
the primitive classes' ``__call__`` as a PyNative safety net). Every replacement has the primitive object's call
signature and is built from primitives with CPU kernels; tests/architectures/flux/test_flux_model_cpu.py checks each
against numpy.
"""

from __future__ import annotations

import math

from mindspore import ops
from mindspore.common import dtype as mstype
from mindspore.ops import operations as P
from mindspore.ops.auto_generate import gen_ops_prim

import mindone_lora_plugin.runtime.cpu.attention as cpu_attention
import mindone_lora_plugin.runtime.cpu.primitives as primitives


def outer_op(input, vec2):
    """``Outer``: ``input[:, None] * vec2[None, :]``."""
    return input.reshape((-1, 1)) * vec2.reshape((1, -1))


def _repeat_each(input, repeats, dim):
    """Every slice along ``dim`` repeated ``repeats`` times in place (``[a, b] -> [a, a, b, b]``)."""
    ndim = input.ndim
    if dim < 0:
        dim = dim + ndim
    shape = input.shape
    expanded = input.expand_dims(dim + 1)
    tiled = ops.broadcast_to(expanded, shape[:dim + 1] + (repeats,) + shape[dim + 1:])
    return tiled.reshape(shape[:dim] + (shape[dim] * repeats,) + shape[dim + 1:])


def repeat_interleave_int_op(input, repeats, dim=None, output_size=None):
    """``RepeatInterleaveInt`` (an integer repeat count) via broadcast and reshape; ``dim=None`` flattens first."""
    if dim is None:
        return _repeat_each(input.reshape((-1,)), repeats, 0)
    return _repeat_each(input, repeats, dim)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, backend=None):
    """mindone's ``layers_compat.scaled_dot_product_attention`` (torch semantics; ``(..., heads, seq, dim)``) as
    matmul + softmax in float32, instead of the kernel-less ``FlashAttentionScore`` it calls for half precision or by
    default. A boolean ``attn_mask`` keeps the ``True`` positions; any other mask is added to the scores."""
    if not enable_gqa and cpu_attention.wanted(query, key, attn_mask, dropout_p, is_causal):
        factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        return cpu_attention.chunked_attention(query * factor, key, value)  # large, unmasked: chunked
    dtype = query.dtype
    q = query.astype(mstype.float32)
    k = key.astype(mstype.float32)
    v = value.astype(mstype.float32)
    if enable_gqa:
        k = _repeat_each(k, q.shape[-3] // k.shape[-3], -3)
        v = _repeat_each(v, q.shape[-3] // v.shape[-3], -3)
    factor = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = ops.matmul(q, k.swapaxes(-2, -1)) * factor
    length, source = q.shape[-2], k.shape[-2]
    if is_causal:
        keep = ops.tril(ops.ones((length, source), mstype.float32)) > 0.5
        scores = ops.select(keep, scores, ops.fill(mstype.float32, scores.shape, -math.inf))
    if attn_mask is not None:
        if attn_mask.dtype == mstype.bool_:
            scores = ops.select(ops.broadcast_to(attn_mask, scores.shape), scores,
                                ops.fill(mstype.float32, scores.shape, -math.inf))
        else:
            scores = scores + attn_mask.astype(mstype.float32)
    weights = ops.softmax(scores, -1)
    if dropout_p > 0:
        weights = P.Dropout(1.0 - dropout_p)(weights)[0]
    return ops.matmul(weights, v).astype(dtype)


# --------------------------------------------------------------------------------------------------------------------
# Constructs without the Tensor methods ``.chunk()``/``.split()``: GRAPH_MODE compiles those to the kernel-less
# ``Chunk``/``SplitWithSize`` primitives directly (no module attribute to rebind), so the few FLUX modules that call
# them get a ``construct`` that slices instead (same arithmetic otherwise).
# --------------------------------------------------------------------------------------------------------------------


def _pieces(x, sizes, dim):
    """``x`` cut along ``dim`` into consecutive static slices of ``sizes``."""
    if dim < 0:
        dim = dim + x.ndim
    out = ()
    start = 0
    for size in sizes:
        begin = (0,) * dim + (start,) + (0,) * (x.ndim - dim - 1)
        out = out + (ops.slice(x, begin, x.shape[:dim] + (size,) + x.shape[dim + 1:]),)
        start = start + size
    return out


def _equal_pieces(x, count, dim):
    return _pieces(x, (x.shape[dim] // count,) * count, dim)


def _modulate(norm, x, shift, scale):
    return norm(x) * (1 + scale.expand_dims(1)) + shift.expand_dims(1)


def ada_layer_norm_zero_construct(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    """``AdaLayerNormZero.construct`` (FLUX double blocks): six modulation vectors from ``emb``."""
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _equal_pieces(self.linear(self.silu(emb)), 6, 1)
    return _modulate(self.norm, x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


def ada_layer_norm_zero_single_construct(self, x, emb=None):
    """``AdaLayerNormZeroSingle.construct`` (FLUX single blocks): shift, scale and gate from ``emb``."""
    shift, scale, gate = _equal_pieces(self.linear(self.silu(emb)), 3, 1)
    return _modulate(self.norm, x, shift, scale), gate


def sd35_ada_layer_norm_zero_x_construct(self, hidden_states, emb=None):
    """``SD35AdaLayerNormZeroX.construct`` (SD3.5's dual-attention blocks): nine modulation vectors from ``emb``."""
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
     gate_msa2) = _equal_pieces(self.linear(self.silu(emb)), 9, 1)
    norm = self.norm(hidden_states)
    return (norm * (1 + scale_msa.expand_dims(1)) + shift_msa.expand_dims(1), gate_msa, shift_mlp, scale_mlp, gate_mlp,
            norm * (1 + scale_msa2.expand_dims(1)) + shift_msa2.expand_dims(1), gate_msa2)


def _rotary_axis(pos, dim, theta):
    """cos/sin tables ``(S, dim)`` of one rotary axis: angles ``pos · theta^(-2j/dim)``, each repeated twice in
    place (what ``get_1d_rotary_pos_embed(..., use_real=True, repeat_interleave_real=True)`` returns)."""
    j = P.Range()(ops.scalar_to_tensor(0.0, mstype.float32), ops.scalar_to_tensor(float(dim // 2), mstype.float32),
                  ops.scalar_to_tensor(1.0, mstype.float32))
    freqs = ops.exp(j * (-2.0 * math.log(theta) / dim))
    angles = pos.reshape((-1, 1)) * freqs.reshape((1, -1))
    return _repeat_each(ops.cos(angles), 2, 1), _repeat_each(ops.sin(angles), 2, 1)


def flux_pos_embed_construct(self, ids):
    """``FluxPosEmbed.construct``: the rotary tables of the position ids' axes (text/time, row, column), concatenated
    along the feature axis (``Range``, ``Exp`` and broadcasting instead of ``Outer`` and ``repeat_interleave``)."""
    pos = ids.astype(mstype.float32)
    cos_out = ()
    sin_out = ()
    for i in range(ids.shape[-1]):
        cos, sin = _rotary_axis(pos[:, i], self.axes_dim[i], self.theta)
        cos_out = cos_out + (cos,)
        sin_out = sin_out + (sin,)
    return ops.concat(cos_out, -1), ops.concat(sin_out, -1)


def apply_rotary(x, freqs):
    """FLUX's rotary embedding on ``x`` (N, S, heads, D) with ``freqs = (cos, sin)`` of shape (S, D): each feature
    pair ``(a, b)`` becomes ``(a·cos − b·sin, b·cos + a·sin)``, in float32 (``apply_rotary_emb(use_real=True,
    use_real_unbind_dim=-1)`` without ``unbind``/``stack``, whose CPU backward kernels are missing)."""
    cos = freqs[0].expand_dims(0).expand_dims(2)
    sin = freqs[1].expand_dims(0).expand_dims(2)
    xf = x.astype(mstype.float32)
    pairs = xf.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    real, imag = _pieces(pairs, (1, 1), -1)
    rotated = ops.concat((-imag, real), -1).reshape(x.shape)
    return (xf * cos + rotated * sin).astype(x.dtype)


def flux_attn_processor_call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                             image_rotary_emb=None):
    """``FluxAttnProcessor.__call__``: joint text+image attention (double blocks) or image-only (single blocks); the
    joint output is cut back into its text and image parts by slicing rather than ``Tensor.split``."""
    query, key, value, enc_query, enc_key, enc_value = _get_qkv_projections(attn, hidden_states,
                                                                            encoder_hidden_states)
    heads = attn.heads
    query = attn.norm_q(query.reshape(query.shape[:-1] + (heads, -1)))
    key = attn.norm_k(key.reshape(key.shape[:-1] + (heads, -1)))
    value = value.reshape(value.shape[:-1] + (heads, -1))
    if attn.added_kv_proj_dim is not None:
        enc_query = attn.norm_added_q(enc_query.reshape(enc_query.shape[:-1] + (heads, -1)))
        enc_key = attn.norm_added_k(enc_key.reshape(enc_key.shape[:-1] + (heads, -1)))
        enc_value = enc_value.reshape(enc_value.shape[:-1] + (heads, -1))
        query = ops.concat((enc_query, query), 1)
        key = ops.concat((enc_key, key), 1)
        value = ops.concat((enc_value, value), 1)
    if image_rotary_emb is not None:
        query = apply_rotary(query, image_rotary_emb)
        key = apply_rotary(key, image_rotary_emb)
    out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                parallel_config=self._parallel_config)
    out = out.reshape(out.shape[:2] + (-1,)).astype(query.dtype)
    if encoder_hidden_states is None:
        return out
    text = encoder_hidden_states.shape[1]
    enc_out, out = _pieces(out, (text, out.shape[1] - text), 1)
    out = attn.to_out[1](attn.to_out[0](out))
    return out, attn.to_add_out(enc_out)


#: module -> {class name (or "Class.method"; the default method is construct): replacement}
CONSTRUCT_PATCHES = {
    "mindone.diffusers.models.normalization": {"AdaLayerNormZero": ada_layer_norm_zero_construct,
                                               "AdaLayerNormZeroSingle": ada_layer_norm_zero_single_construct,
                                               "SD35AdaLayerNormZeroX": sd35_ada_layer_norm_zero_x_construct},
    "mindone.diffusers.models.transformers.transformer_flux": {"FluxPosEmbed": flux_pos_embed_construct,
                                                               "FluxAttnProcessor.__call__": flux_attn_processor_call},
}

#: module -> the names this module borrows from it (GRAPH_MODE cannot compile imports inside a function, and importing
#: mindone here would be too early): :func:`adopt_globals` copies them in when the module is patched
BORROWED = {"mindone.diffusers.models.transformers.transformer_flux": ("dispatch_attention_fn", "_get_qkv_projections")}


dispatch_attention_fn = _get_qkv_projections = None  # set by adopt_globals


def adopt_globals(module) -> None:
    """Copy the names :data:`BORROWED` from ``module`` into this module's globals."""
    for name in BORROWED.get(getattr(module, "__name__", None), ()):
        if name in vars(module):
            globals()[name] = vars(module)[name]


#: module -> {function name: replacement}; the original function objects are replaced wherever they are bound
FUNCTION_REPLACEMENTS = {
    "mindone.diffusers.models.layers_compat": {"scaled_dot_product_attention": scaled_dot_product_attention},
}

def embedding_op(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False):
    """``Embedding`` (``mint.nn.Embedding``: T5's token and relative-position tables) via ``Gather``; the
    ``padding_idx`` row gets no gradient. (``max_norm``, which renormalises the table in place, is not supported.)"""
    if max_norm is not None:
        raise ValueError("the CPU backend's Embedding does not support max_norm")
    dtype = weight.dtype
    table = weight.astype(mstype.float32) if dtype == mstype.bfloat16 else weight
    rows = ops.gather(table, input.reshape((-1,)), 0).reshape(input.shape + (weight.shape[1],))
    if padding_idx is not None:
        index = padding_idx + weight.shape[0] if padding_idx < 0 else padding_idx
        keep = (input != index).astype(rows.dtype).expand_dims(-1)
        rows = rows * keep + ops.stop_gradient(rows) * (1 - keep)
    return rows.astype(dtype)


def _fill_dtype(value, dtype):
    if dtype is not None:
        return dtype
    if isinstance(value, bool):
        return mstype.bool_
    return mstype.int64 if isinstance(value, int) else mstype.float32


def fill_scalar_op(size, fill_value, dtype=None):
    """``FillScalar`` (``mint.full`` with a number): a broadcast scalar; the dtype follows torch (bool, int64,
    float32) unless given."""
    dtype = _fill_dtype(fill_value, dtype)
    work = mstype.float32 if dtype == mstype.bfloat16 else dtype
    return ops.broadcast_to(ops.scalar_to_tensor(fill_value, work), tuple(size)).astype(dtype)


def fill_tensor_op(size, fill_value, dtype=None):
    """``FillTensor`` (``mint.full`` with a one-element tensor)."""
    dtype = fill_value.dtype if dtype is None else dtype
    return ops.broadcast_to(fill_value.reshape(()), tuple(size)).astype(dtype)


PRIMITIVE_REPLACEMENTS = primitives.primitive_table(gen_ops_prim, {
    "FillScalar": fill_scalar_op,
    "FillTensor": fill_tensor_op,
    "Embedding": embedding_op,
    "Outer": outer_op,
    "RepeatInterleaveInt": repeat_interleave_int_op,
})
