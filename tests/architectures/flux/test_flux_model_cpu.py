"""The CPU backend's replacements for the primitives FLUX.1 reaches (runtime/cpu/transformer.py), each against numpy:
forward values, gradients by finite differences where the replacement is on the training path, and GRAPH_MODE for
the replaced constructs."""

from __future__ import annotations

import math

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore import mint, nn, ops  # noqa: E402

from mindone_lora_plugin.runtime import cpu  # noqa: E402

if ms.get_context("device_target") != "CPU":  # pragma: no cover - the backend exists for CPU only
    pytest.skip("the CPU backend tests need MindSpore's CPU target", allow_module_level=True)

from mindone_lora_plugin.runtime.cpu import install, transformer as ct  # noqa: E402
from mindone_lora_plugin.runtime.process import quiet_mindone_imports  # noqa: E402

quiet_mindone_imports()


def T(array, dtype=ms.float32):
    """A MindSpore tensor of ``array``, float32 unless told."""
    return ms.Tensor(np.asarray(array), dtype=dtype)


@pytest.fixture(autouse=True)
def cpu_backend_in_pynative(monkeypatch, ms_tools):
    pynative = ms_tools.pynative
    monkeypatch.delenv(cpu.ENV_SWITCH, raising=False)
    assert cpu.activate() is True
    with pynative():
        yield


def finite_difference(f, x, eps=1e-3):
    """d sum(f(x) * w) / dx for a fixed random w, by central differences (float64 on the numpy side)."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat = x.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f(x)
        flat[i] = old - eps
        down = f(x)
        flat[i] = old
        grad.reshape(-1)[i] = (up - down) / (2 * eps)
    return grad


def np_sdpa(q, k, v, mask=None, causal=False, scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ np.swapaxes(k, -1, -2) * scale
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    s = np.exp(s - s.max(-1, keepdims=True))
    return (s / s.sum(-1, keepdims=True)) @ v


def np_rotary_axis(pos, dim, theta):
    angles = pos[:, None] * theta ** (-np.arange(0, dim, 2) / dim)[None]
    return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)


def np_apply_rotary(x, cos, sin):
    a, b = x[..., 0::2], x[..., 1::2]
    rotated = np.stack([-b, a], axis=-1).reshape(x.shape)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


# ---------------------------------------------------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------------------------------------------------


def test_outer_and_repeat_interleave_match_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(5), rng.standard_normal(3)
    np.testing.assert_allclose(mint.outer(T(a), T(b)).asnumpy(), np.outer(a, b), rtol=1e-6)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    for dim in (0, 1, -1):
        np.testing.assert_array_equal(T(x).repeat_interleave(3, dim=dim).asnumpy(), np.repeat(x, 3, axis=dim))
    np.testing.assert_array_equal(ct.repeat_interleave_int_op(T(x), 2).asnumpy(), np.repeat(x, 2))


def test_embedding_matches_numpy_and_padding_row_gets_no_gradient():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((7, 4)).astype(np.float32)
    ids = np.array([[0, 3, 6], [2, 2, 0]])
    out = mint.nn.functional.embedding(T(ids, ms.int32), T(table))
    np.testing.assert_array_equal(out.asnumpy(), table[ids])
    w = ms.Parameter(T(table), name="w")
    grad = ms.grad(lambda t: (ct.embedding_op(T(ids, ms.int32), t, padding_idx=2) * 2.0).sum())(w)
    expected = np.zeros_like(table)
    for i in ids.reshape(-1):
        if i != 2:
            expected[i] += 2.0
    np.testing.assert_array_equal(grad.asnumpy(), expected)
    bf = ct.embedding_op(T(ids, ms.int32), T(table, ms.bfloat16))
    assert bf.dtype == ms.bfloat16
    with pytest.raises(ValueError, match="max_norm"):
        ct.embedding_op(T(ids, ms.int32), T(table), max_norm=1.0)


def test_full_follows_torch_dtypes():
    assert mint.full((2, 3), 1.5).dtype == ms.float32
    np.testing.assert_array_equal(mint.full((2, 3), 1.5).asnumpy(), np.full((2, 3), 1.5, np.float32))
    assert mint.full((2,), 3).dtype == ms.int64 and mint.full((2,), True).dtype == ms.bool_
    assert ct.fill_scalar_op((2,), 2.0, ms.bfloat16).dtype == ms.bfloat16
    np.testing.assert_array_equal(ct.fill_tensor_op((2, 2), T([4.0])).asnumpy(), np.full((2, 2), 4.0))


@pytest.mark.parametrize("case", ["plain", "bool_mask", "additive_mask", "causal", "gqa", "half"])
def test_scaled_dot_product_attention_matches_numpy(case):
    from mindone.diffusers.models.layers_compat import scaled_dot_product_attention  # the rebound function

    assert scaled_dot_product_attention is ct.scaled_dot_product_attention
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 4, 5, 8)).astype(np.float32) for _ in range(3))
    kw, ref_kw = {}, {}
    if case == "bool_mask":
        mask = rng.random((2, 1, 5, 5)) > 0.3
        mask[..., 0] = True
        kw["attn_mask"], ref_kw["mask"] = T(mask, ms.bool_), mask
    if case == "additive_mask":
        mask = rng.standard_normal((5, 5)).astype(np.float32)
        kw["attn_mask"], ref_kw["mask"] = T(mask), mask
    if case == "causal":
        kw["is_causal"], ref_kw["causal"] = True, True
    if case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kw["enable_gqa"] = True
    dtype = ms.float16 if case == "half" else ms.float32
    out = scaled_dot_product_attention(T(q, dtype), T(k, dtype), T(v, dtype), scale=0.3, **kw)
    assert out.dtype == dtype
    if case == "gqa":
        k, v = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    np.testing.assert_allclose(out.asnumpy(), np_sdpa(q, k, v, scale=0.3, **ref_kw),
                               atol=3e-3 if case == "half" else 1e-5)


def test_scaled_dot_product_attention_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 3, 4)).astype(np.float32) for _ in range(3))
    w = rng.standard_normal((1, 2, 3, 4))

    def f(qq):
        return float((np_sdpa(qq.astype(np.float64), k, v) * w).sum())

    grad = ms.grad(lambda t: (ct.scaled_dot_product_attention(t, T(k), T(v)) * T(w)).sum())(T(q))
    np.testing.assert_allclose(grad.asnumpy(), finite_difference(f, q.astype(np.float64)), atol=1e-4)


def test_rotary_tables_and_application_match_numpy():
    from mindone.diffusers.models.transformers.transformer_flux import FluxPosEmbed

    rng = np.random.default_rng(4)
    ids = np.stack([np.zeros(6), rng.integers(0, 4, 6), rng.integers(0, 4, 6)], axis=1).astype(np.float32)
    embed = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])
    cos, sin = embed(T(ids))
    parts = [np_rotary_axis(ids[:, i].astype(np.float64), d, 10000) for i, d in enumerate((4, 6, 6))]
    np.testing.assert_allclose(cos.asnumpy(), np.concatenate([p[0] for p in parts], 1), atol=1e-6)
    np.testing.assert_allclose(sin.asnumpy(), np.concatenate([p[1] for p in parts], 1), atol=1e-6)
    x = rng.standard_normal((2, 6, 3, 16)).astype(np.float32)
    c, s = cos.asnumpy(), sin.asnumpy()
    np.testing.assert_allclose(ct.apply_rotary(T(x), (cos, sin)).asnumpy(), np_apply_rotary(x, c, s), atol=1e-6)
    w = rng.standard_normal(x.shape)
    grad = ms.grad(lambda t: (ct.apply_rotary(t, (cos, sin)) * T(w)).sum())(T(x))
    # the rotation is linear: d/dx sum(R(x)·w) = Rᵀ w
    a, b = w[..., 0::2], w[..., 1::2]
    ca, sa = c[None, :, None, 0::2], s[None, :, None, 0::2]
    expected = np.stack([a * ca + b * sa, b * ca - a * sa], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(grad.asnumpy(), expected, atol=1e-5)


def test_ada_layer_norm_constructs_match_numpy():
    from mindone.diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle

    assert AdaLayerNormZero.construct is ct.ada_layer_norm_zero_construct
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    emb = rng.standard_normal((2, 8)).astype(np.float32)

    def norm(v):
        return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6)

    for cls, count in ((AdaLayerNormZero, 6), (AdaLayerNormZeroSingle, 3)):
        cell = cls(8)
        out = cell(T(x), emb=T(emb))
        silu = emb / (1 + np.exp(-emb))
        mod = silu @ cell.linear.weight.asnumpy().T + cell.linear.bias.asnumpy()
        pieces = np.split(mod, count, axis=1)
        expected = norm(x) * (1 + pieces[1][:, None]) + pieces[0][:, None]
        np.testing.assert_allclose(out[0].asnumpy(), expected, atol=1e-5)
        for got, want in zip(out[1:], pieces[2:]):
            np.testing.assert_allclose(got.asnumpy(), want, atol=1e-6)


def test_rotary_attention_and_modulation_compile_in_graph_mode(ms_tools):
    """The replaced constructs compile with STRICT syntax and give the PyNative values."""
    from mindone.diffusers.models.normalization import AdaLayerNormZero
    from mindone.diffusers.models.transformers.transformer_flux import FluxPosEmbed

    graph_mode = ms_tools.graph_mode

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.pos = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])
            self.norm = AdaLayerNormZero(16)

        def construct(self, ids, x, emb, q, k, v):
            freqs = self.pos(ids)
            y = self.norm(x, emb=emb)[0]
            att = ct.scaled_dot_product_attention(ct.apply_rotary(q, freqs).transpose((0, 2, 1, 3)), k, v)
            return y, att, mint.outer(ids[:, 1], ids[:, 2]), ops.sum(freqs[0])

    rng = np.random.default_rng(6)
    ids = T(np.stack([np.zeros(5), np.arange(5), np.arange(5)[::-1]], 1))
    inputs = (ids, T(rng.standard_normal((2, 5, 16))), T(rng.standard_normal((2, 16))),
              T(rng.standard_normal((2, 5, 2, 16))), T(rng.standard_normal((2, 2, 5, 16))),
              T(rng.standard_normal((2, 2, 5, 16))))
    ms.set_seed(0)
    net = Net()
    eager = [o.asnumpy() for o in net(*inputs)]
    with graph_mode():
        compiled = [o.asnumpy() for o in net(*inputs)]
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_transformer_replacements_are_installed():
    for cls in ct.PRIMITIVE_REPLACEMENTS:
        assert cls in install.PRIMITIVE_REPLACEMENTS
    import mindone.diffusers.models.attention_dispatch as dispatch
    from mindone.diffusers.models.transformers import transformer_flux

    assert dispatch.scaled_dot_product_attention is ct.scaled_dot_product_attention
    assert transformer_flux.FluxAttnProcessor.__call__ is ct.flux_attn_processor_call
    assert ct.dispatch_attention_fn is dispatch.dispatch_attention_fn
