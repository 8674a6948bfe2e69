"""Memory-efficient attention for the CPU backend: what keeps full-size UNets at 512 px within a laptop's memory.

On CPU, mindone's ``Attention.scaled_dot_product_attention`` falls back to ``softmax(q kᵀ) v`` with the whole score
matrix materialised, and autodiff keeps it (and, in GRAPH_MODE, more copies of it) until the backward pass. At the
64×64-latent level of SD1.5 at 512 px that is 8 heads × 4096 × 4096 floats = 512 MiB per self-attention layer, five
such layers, against torch's CPU flash attention, which keeps none. :class:`ChunkedAttention` computes the same
function in query chunks whose score blocks stay under :data:`CHUNK_ELEMENTS`, and defines its own backward
(``bprop``), which recomputes each chunk's scores from ``q``, ``k`` and ``v`` instead of keeping them: what the
backward keeps is ``q``, ``k``, ``v`` and the output, as flash attention's does. The arithmetic is the same as the
materialised path in float32 (each query row's softmax is computed whole), so results agree to rounding.

It is used where it matters, calls with a score matrix of at least :data:`MIN_SCORE_ELEMENTS` and no mask, causal
flag or dropout; every other call keeps mindone's own path. The backward recomputes the scores with another product
than the forward's (``q @ kᵀ`` against ``BatchMatMul(transpose_b)``) so that GRAPH_MODE's common-subexpression pass
cannot merge them with the forward's and keep them alive.
"""

from __future__ import annotations

from mindspore import nn, ops
from mindspore.common import dtype as mstype
from mindspore.ops import operations as P

#: score-matrix size (batch × heads × queries × keys) from which the chunked path is used: 8 Mi floats = 32 MiB;
#: below it (every tiny test model, SD at 256 px and less) the score matrix is small and mindone's path is kept
MIN_SCORE_ELEMENTS = 1 << 23
#: the largest score block one chunk computes: 16 Mi floats = 64 MiB (the backward holds four such blocks at once)
CHUNK_ELEMENTS = 1 << 24

_softmax = P.Softmax(-1)
_bmm = P.BatchMatMul()  # a @ b (the legacy primitive: twice as fast on CPU as ``ops.bmm``'s BatchMatMulExt)
_bmm_nt = P.BatchMatMul(transpose_b=True)  # a @ bᵀ
_bmm_tn = P.BatchMatMul(transpose_a=True)  # aᵀ @ b


class ChunkedAttention(nn.Cell):
    """``softmax(q kᵀ) v`` for ``q (…, L, D)``, ``k (…, S, D)``, ``v (…, S, Dv)`` (the scale already applied to
    ``q``), computed in float32 in query chunks, with a backward that recomputes the scores chunk by chunk."""

    def construct(self, q, k, v):
        shape, dtype = q.shape, q.dtype
        length, keys = shape[-2], k.shape[-2]
        q3 = q.reshape((-1, length, shape[-1])).astype(mstype.float32)
        k3 = k.reshape((-1, keys, k.shape[-1])).astype(mstype.float32)
        v3 = v.reshape((-1, keys, v.shape[-1])).astype(mstype.float32)
        step = CHUNK_ELEMENTS // (q3.shape[0] * keys)  # queries per chunk (inline: GRAPH_MODE parses it so)
        step = 1 if step < 1 else (length if step > length else step)
        outs = []
        for start in range(0, length, step):
            weights = ops.softmax(_bmm_nt(q3[:, start:start + step], k3), -1)
            outs.append(_bmm(weights, v3))
        out = outs[0] if len(outs) == 1 else ops.concat(outs, 1)
        return out.reshape(shape[:-1] + (v.shape[-1],)).astype(dtype)

    def bprop(self, q, k, v, out, dout):
        shape = q.shape
        length, keys = shape[-2], k.shape[-2]
        q3 = q.reshape((-1, length, shape[-1])).astype(mstype.float32)
        k3 = k.reshape((-1, keys, k.shape[-1])).astype(mstype.float32)
        v3 = v.reshape((-1, keys, v.shape[-1])).astype(mstype.float32)
        o3 = out.reshape((-1, length, v.shape[-1])).astype(mstype.float32)
        do3 = dout.reshape((-1, length, v.shape[-1])).astype(mstype.float32)
        delta = (o3 * do3).sum(-1, keepdims=True)  # rowsum(P ∘ dP) = rowsum(O ∘ dO)
        # dP - delta in one product: [dO | delta] · [V | -1]ᵀ. (A broadcast subtract of the (rows, 1) delta from
        # each score block runs at about a tenth of a same-shape op's speed on CPU: 6.5 s of a 512 px SD1.5 step.)
        do_delta = ops.concat((do3, delta), -1)
        v_minus1 = ops.concat((v3, -ops.ones(v3.shape[:-1] + (1,), mstype.float32)), -1)
        kt = k3.swapaxes(1, 2)  # the scores again, as q @ kᵀ with kᵀ made: not the forward's product (see above)
        step = CHUNK_ELEMENTS // (q3.shape[0] * keys)  # queries per chunk (inline: GRAPH_MODE parses it so)
        step = 1 if step < 1 else (length if step > length else step)
        dqs, dk, dv = [], None, None
        for start in range(0, length, step):
            qc, doc = q3[:, start:start + step], do3[:, start:start + step]
            weights = _softmax(_bmm(qc, kt))  # primitives: GRAPH_MODE fails on ops.softmax inside a bprop
            dscores = weights * _bmm_nt(do_delta[:, start:start + step], v_minus1)
            dqs.append(_bmm(dscores, k3))
            dk_c, dv_c = _bmm_tn(dscores, qc), _bmm_tn(weights, doc)
            dk = dk_c if dk is None else dk + dk_c
            dv = dv_c if dv is None else dv + dv_c
        dq = dqs[0] if len(dqs) == 1 else ops.concat(dqs, 1)
        return (dq.reshape(shape).astype(q.dtype), dk.reshape(k.shape).astype(k.dtype),
                dv.reshape(v.shape).astype(v.dtype))


chunked_attention = ChunkedAttention()


def wanted(query, key, attn_mask=None, dropout_p=0.0, is_causal=False) -> bool:
    """Whether a call should take the chunked path: a large score matrix, and nothing it does not implement."""
    if attn_mask is not None or is_causal or dropout_p:
        return False
    rows = 1
    for n in query.shape[:-2]:
        rows *= n
    return rows * query.shape[-2] * key.shape[-2] >= MIN_SCORE_ELEMENTS


#: the module whose ``Attention`` class :func:`install_into` patches
ATTENTION_MODULE = "mindone.diffusers.models.attention_processor"
#: mindone's ``Attention.scaled_dot_product_attention``, kept by :func:`sd_attention` for the calls it passes on
_original = None


def sd_attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """``Attention.scaled_dot_product_attention`` (mindone's SD/SDXL attention): the chunked path for large
    unmasked calls, with the layer's own scale (``self.scale``, as mindone's math path uses), else mindone's."""
    if wanted(query, key, attn_mask, dropout_p, is_causal):
        factor = self.scale if scale is None else scale
        return chunked_attention(query * factor, key, value)
    return _original(self, query, key, value, attn_mask, dropout_p, is_causal, scale)


def install_into(attention_cls) -> bool:
    """Route ``attention_cls.scaled_dot_product_attention`` through :func:`sd_attention` (idempotent)."""
    global _original
    if not isinstance(attention_cls, type):
        return False
    current = attention_cls.__dict__.get("scaled_dot_product_attention")
    if current is None or current is sd_attention:
        return False
    _original = current
    attention_cls.scaled_dot_product_attention = sd_attention
    return True
