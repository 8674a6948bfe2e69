"""The CPU backend on the real stack (mindspore 2.7.1, mindone 0.5.0): no mocks.

* every replacement against a float64 numpy reference: forward values, and gradients against central finite
  differences of the numpy reference;
* the counter-based random numbers against a numpy implementation of the same generator, plus their statistics and
  their seeding semantics (``ms.manual_seed``, identical in PyNative and GRAPH_MODE);
* LoRA training steps (forward, ``value_and_grad``, ``AdamWeightDecay``) on tiny SD1.x and SDXL UNets and a tiny CLIP
  text encoder, in PyNative and in GRAPH_MODE (``jit_syntax_level=STRICT``, as mindone's scripts set it);
* mindone's ``TrainStep`` / ``compute_snr`` / ``DDPMScheduler.add_noise`` / ``cast_training_params`` path, a VAE round
  trip and 2-step pipeline inference.

GRAPH_MODE compiles are slow on a small CPU (tens of seconds each), so there are four of them, on tiny inputs.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))

ms = pytest.importorskip("mindspore")

from mindspore import mint, nn  # noqa: E402

from mindone_lora_plugin.runtime import cpu  # noqa: E402

if ms.get_context("device_target") != "CPU":  # pragma: no cover - the backend exists for CPU only
    pytest.skip("the CPU backend tests need MindSpore's CPU target", allow_module_level=True)

from mindone_lora_plugin.runtime.cpu import install, kernels, rng  # noqa: E402
from mindone_lora_plugin.runtime.process import quiet_mindone_imports  # noqa: E402

quiet_mindone_imports()

SD1_UNET = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=32)
SDXL_UNET = dict(SD1_UNET, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=80, transformer_layers_per_block=(1, 2),
                 use_linear_projection=True, cross_attention_dim=64)
CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4, vocab_size=1000,
            max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=0, eos_token_id=1,
            pad_token_id=1)
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(autouse=True)
def cpu_backend_in_pynative(monkeypatch, ms_tools):
    """Every test runs with the backend active, in PyNative (whatever an earlier test module left behind)."""
    pynative = ms_tools.pynative
    monkeypatch.delenv(cpu.ENV_SWITCH, raising=False)
    assert cpu.activate() is True
    with pynative():
        yield


# ---------------------------------------------------------------------------------------------------------------------
# numpy references (float64)
# ---------------------------------------------------------------------------------------------------------------------

_erf = np.vectorize(math.erf)


def np_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    kh, kw = w.shape[2:]
    if padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = ((th // 2, th - th // 2), (tw // 2, tw - tw // 2))
    elif padding == "valid":
        pads = ((0, 0), (0, 0))
    else:
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        pads = ((ph, ph), (pw, pw))
    x = np.pad(x, ((0, 0), (0, 0)) + pads)
    n, c, h, wd = x.shape
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (wd - dw * (kw - 1) - 1) // sw + 1
    cin, cout = c // groups, w.shape[0] // groups
    out = np.zeros((n, w.shape[0], oh, ow))
    for g in range(groups):
        xg = x[:, g * cin:(g + 1) * cin]
        wg = w[g * cout:(g + 1) * cout]
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                out[:, g * cout:(g + 1) * cout] += np.einsum("nchw,oc->nohw", patch, wg[:, :, i, j])
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


def np_layer_norm(x, normalized_shape, w=None, b=None, eps=1e-5):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps)
    if w is not None:
        out = out * w
    if b is not None:
        out = out + b
    return out


def np_gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def np_pad(x, padding, value=0.0):
    """torch's constant_pad_nd: pairs for the last dims first; negative amounts crop."""
    pads = [(0, 0)] * x.ndim
    for k in range(len(padding) // 2):
        pads[x.ndim - 1 - k] = (padding[2 * k], padding[2 * k + 1])
    out = np.pad(x, [(max(a, 0), max(b, 0)) for a, b in pads], constant_values=value)
    index = tuple(slice(-min(a, 0), out.shape[d] + min(b, 0)) for d, (a, b) in enumerate(pads))
    return out[index]


_U64 = np.uint64
_GOLDEN, _MIX1, _MIX2 = _U64(0x9E3779B97F4A7C15), _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)


def np_mix64(z):
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _U64(30))) * _MIX1
        z = (z ^ (z >> _U64(27))) * _MIX2
    return z ^ (z >> _U64(31))


def np_uniform53(shape, seed, offset, lane):
    """A numpy implementation of the backend's documented generator (SplitMix64 keyed by seed and offset)."""
    with np.errstate(over="ignore"):
        seed = np.array([seed], np.int64).view(np.uint64)
        offset = np.array([offset], np.int64).view(np.uint64)
        key = np_mix64(np_mix64(seed * _GOLDEN) ^ (offset * _MIX1 + _GOLDEN))
        index = np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape)
        bits = np_mix64(key + (index * _U64(2) + _U64(lane + 1)) * _GOLDEN) >> _U64(11)
    return bits.astype(np.float64) * 2.0 ** -53


def np_randn(shape, seed, offset):
    u1, u2 = np_uniform53(shape, seed, offset, 0), np_uniform53(shape, seed, offset, 1)
    return np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * np.pi * u2)


# ---------------------------------------------------------------------------------------------------------------------
# forward + finite-difference gradient checks
# ---------------------------------------------------------------------------------------------------------------------


def check_op(ms_tools, ms_fn, np_fn, inputs, wrt=(0,), atol=2e-5, rtol=2e-5, grad_tol=2e-3, seed=0):
    """``ms_fn`` on float32 tensors matches ``np_fn`` on float64 arrays; so do the gradients of ``sum(out * R)``
    with respect to the inputs in ``wrt`` (MindSpore's autodiff vs numpy central differences)."""
    T = ms_tools.T
    rng = np.random.default_rng(seed)
    inputs64 = [np.asarray(a, np.float64) for a in inputs]
    expected = np_fn(*inputs64)
    got = ms_fn(*[T(a, ms.float32) for a in inputs64])
    np.testing.assert_allclose(got.asnumpy(), expected, atol=atol, rtol=rtol)
    if not wrt:
        return
    weights = rng.standard_normal(expected.shape)

    def objective(*args):
        return (ms_fn(*args) * T(weights, ms.float32)).sum()

    grads = ms.grad(objective, grad_position=tuple(wrt))(*[T(a, ms.float32) for a in inputs64])
    if not isinstance(grads, (tuple, list)):
        grads = (grads,)
    eps = 1e-6
    for position, grad in zip(wrt, grads):
        numeric = np.zeros_like(inputs64[position])
        for index in np.ndindex(numeric.shape):
            plus = [a.copy() for a in inputs64]
            minus = [a.copy() for a in inputs64]
            plus[position][index] += eps
            minus[position][index] -= eps
            numeric[index] = ((np_fn(*plus) * weights).sum() - (np_fn(*minus) * weights).sum()) / (2 * eps)
        scale = max(1.0, float(np.abs(numeric).max()))
        np.testing.assert_allclose(grad.asnumpy() / scale, numeric / scale, atol=grad_tol,
                                   err_msg=f"gradient of input {position}")


RNG = np.random.default_rng(1234)


def randn(*shape):
    return RNG.standard_normal(shape)


@pytest.mark.parametrize("stride,padding,dilation,groups,bias", [
    (1, 1, 1, 1, True),
    (2, (1, 0), 1, 1, False),
    (1, 0, 2, 2, True),
])
def test_conv2d_ext_matches_numpy(stride, padding, dilation, groups, bias, ms_tools):
    x, w = randn(2, 4, 6, 5), randn(6, 4 // groups, 3, 3)
    args = [x, w] + ([randn(6)] if bias else [])

    def ms_fn(x, w, b=None):
        return kernels.conv2d_ext_op(x, w, b, stride, padding, dilation, groups)

    def np_fn(x, w, b=None):
        return np_conv2d(x, w, b, stride, padding, dilation, groups)

    check_op(ms_tools, ms_fn, np_fn, args, wrt=tuple(range(len(args))), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv2d_padding_matches_numpy(padding, ms_tools):
    x, w, b = randn(1, 3, 5, 5), randn(4, 3, 3, 3), randn(4)
    check_op(ms_tools, lambda x, w, b: kernels.conv2d_padding_op(x, w, b, 1, padding),
             lambda x, w, b: np_conv2d(x, w, b, 1, padding), [x, w, b], wrt=(0, 1, 2), atol=1e-4, rtol=1e-4)


def test_conv2d_through_mint_and_unbatched_input(ms_tools):
    T = ms_tools.T
    x, w, b = randn(3, 5, 5), randn(4, 3, 1, 1), randn(4)
    got = mint.nn.functional.conv2d(T(x, ms.float32), T(w, ms.float32), T(b, ms.float32), 1, "same")
    np.testing.assert_allclose(got.asnumpy(), np_conv2d(x[None], w, b, 1, "same")[0], atol=1e-5)
    conv = mint.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    got = conv(T(x[None], ms.float32))
    expected = np_conv2d(x[None], conv.weight.asnumpy().astype(np.float64), conv.bias.asnumpy(), 2, 1)
    np.testing.assert_allclose(got.asnumpy(), expected, atol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_numpy(affine, ms_tools):
    x = randn(2, 3, 6)
    if affine:
        args, wrt = [x, randn(6), randn(6)], (0, 1, 2)
        ms_fn = lambda x, w, b: kernels.layer_norm_ext_op(x, (6,), w, b, 1e-5)[0]  # noqa: E731
        np_fn = lambda x, w, b: np_layer_norm(x, (6,), w, b)  # noqa: E731
    else:
        args, wrt = [x], (0,)
        ms_fn = lambda x: kernels.layer_norm_ext_op(x, (3, 6))[0]  # noqa: E731
        np_fn = lambda x: np_layer_norm(x, (3, 6))  # noqa: E731
    check_op(ms_tools, ms_fn, np_fn, args, wrt=wrt, atol=1e-4, rtol=1e-4)


def test_layer_norm_statistics_half_precision_and_mint(ms_tools):
    T = ms_tools.T
    x = randn(2, 5, 8)
    out, mean, rstd = kernels.layer_norm_ext_op(T(x, ms.float32), (8,))
    np.testing.assert_allclose(mean.asnumpy().reshape(2, 5), x.mean(-1), atol=1e-5)
    np.testing.assert_allclose(rstd.asnumpy().reshape(2, 5), 1 / np.sqrt(x.var(-1) + 1e-5), rtol=1e-4)
    half = mint.nn.functional.layer_norm(T(x, ms.float16), (8,))
    assert half.dtype == ms.float16
    np.testing.assert_allclose(half.asnumpy(), np_layer_norm(x, (8,)), atol=1e-2)
    grad = ms.grad(lambda a: mint.nn.LayerNorm(8, dtype=ms.float16)(a).astype(ms.float32).sum())(T(x, ms.float16))
    assert grad.dtype == ms.float16 and np.isfinite(grad.asnumpy()).all()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_numpy(approximate, ms_tools):
    T = ms_tools.T
    check_op(ms_tools, lambda x: kernels.gelu_ext_op(x, approximate), lambda x: np_gelu(x, approximate),
             [randn(3, 7) * 2], atol=1e-5, rtol=1e-4)
    got = mint.nn.functional.gelu(T(randn(4), ms.float32), approximate=approximate)
    assert got.shape == (4,)


def test_arange_matches_numpy():
    out = mint.arange(0, 7)
    assert out.dtype == ms.int64 and out.asnumpy().tolist() == list(range(7))
    np.testing.assert_allclose(mint.arange(start=0, end=5, dtype=ms.float32).asnumpy(), np.arange(5.0))
    np.testing.assert_allclose(kernels.arange_op(1.0, 2.0, 0.25).asnumpy(), np.arange(1.0, 2.0, 0.25))
    np.testing.assert_array_equal(kernels.arange_op(10, 2, -3, ms.int32).asnumpy(), np.arange(10, 2, -3))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_matches_numpy(reduction, ms_tools):
    reduce = {"mean": np.mean, "sum": np.sum, "none": lambda v: v}[reduction]
    check_op(ms_tools, lambda a, b: mint.nn.functional.mse_loss(a, b, reduction=reduction) * 1.0,
             lambda a, b: reduce((a - b) ** 2), [randn(2, 3), randn(2, 3)], wrt=(0, 1))


@pytest.mark.parametrize("padding", [(0, 1, 0, 1), (1, 2), (-1, 1, 2, 0, 1, 1)])
def test_constant_pad_nd_matches_numpy(padding, ms_tools):
    T = ms_tools.T
    check_op(ms_tools, lambda x: kernels.constant_pad_nd_op(x, padding, 0.5), lambda x: np_pad(x, padding, 0.5),
             [randn(2, 3, 4)])
    got = mint.nn.functional.pad(T(randn(1, 2, 3, 3), ms.float32), padding)
    assert got.shape == np_pad(np.zeros((1, 2, 3, 3)), padding).shape


def test_zeros_ones_like(ms_tools):
    T = ms_tools.T
    x = T(randn(2, 3), ms.float32)
    assert mint.zeros_like(x).asnumpy().tolist() == np.zeros((2, 3)).tolist()
    ones = mint.ones_like(x, dtype=ms.int32)
    assert ones.dtype == ms.int32 and ones.asnumpy().tolist() == np.ones((2, 3)).tolist()


def test_stack_split_chunk_match_numpy(ms_tools):
    T = ms_tools.T
    a, b = randn(2, 5), randn(2, 5)
    check_op(ms_tools, lambda a, b: kernels.stack_ext_impl([a, b], 1), lambda a, b: np.stack([a, b], 1), [a, b],
             wrt=(0, 1))
    np.testing.assert_allclose(mint.stack([T(a, ms.float32), T(b, ms.float32)]).asnumpy(), np.stack([a, b]),
                               atol=1e-6)
    x = randn(3, 7)
    pieces = {
        "sizes": (lambda x: kernels.split_with_size_op(x, (2, 4, 1), 1), lambda x: np.split(x, [2, 6], 1)),
        "size": (lambda x: kernels.split_tensor_op(x, 3, -1), lambda x: np.split(x, [3, 6], 1)),
        "chunk": (lambda x: kernels.chunk_op(x, 3, 1), lambda x: np.split(x, [3, 6], 1)),
        "chunk0": (lambda x: kernels.chunk_op(x, 2, 0), lambda x: np.split(x, [2], 0)),
    }
    for name, (ms_split, np_split) in pieces.items():
        count = len(np_split(x))
        for k in range(count):
            check_op(ms_tools, lambda x, k=k: ms_split(x)[k] * 1.0, lambda x, k=k: np_split(x)[k], [x])
        assert len(ms_split(T(x, ms.float32))) == count, name


def test_geglu_is_routed_through_slicing(ms_tools):
    from mindone.diffusers.models.activations import GEGLU

    T = ms_tools.T

    assert GEGLU.construct is kernels.geglu_construct
    layer = GEGLU(4, 3)
    x = randn(2, 4)
    weight, bias = layer.proj.weight.asnumpy().astype(np.float64), layer.proj.bias.asnumpy()
    h = x @ weight.T + bias
    np.testing.assert_allclose(layer(T(x, ms.float32)).asnumpy(), h[:, :3] * np_gelu(h[:, 3:]), atol=1e-5)


@pytest.mark.smoke
def test_installation_is_idempotent_and_covers_the_known_primitives():
    import time

    from mindspore.ops.auto_generate import gen_ops_prim

    start = time.perf_counter()
    assert cpu.activate("CPU") is True and cpu.activate() is True and cpu.is_active()
    assert install.install() == 0  # nothing left to rebind
    assert time.perf_counter() - start < 0.5
    assert gen_ops_prim.conv2d_ext_op is kernels.conv2d_ext_op
    assert mint.nn.functional.gelu is kernels.gelu
    rebound = {name for _, name in install.rebound_attributes()}
    for name in ("conv2d_ext_op", "conv2d_padding_op", "layer_norm_ext_op", "gelu_ext_op", "randn_", "randint_"):
        assert name in rebound


def test_patch_cells_and_the_pynative_safety_net(ms_tools):
    from mindspore.ops.auto_generate import gen_ops_prim

    T = ms_tools.T

    class Holder(nn.Cell):
        def __init__(self):
            super().__init__()
            self.conv = gen_ops_prim.Conv2DExt()  # as a Cell built before install() would hold it

        def construct(self, x, w):
            return self.conv(x, w, None, 1, 1)

    x, w = randn(1, 2, 4, 4), randn(3, 2, 3, 3)
    holder = Holder()
    expected = np_conv2d(x, w, None, 1, 1)
    np.testing.assert_allclose(holder(T(x, ms.float32), T(w, ms.float32)).asnumpy(), expected, atol=1e-5)  # __call__
    assert install.patch_cells(holder) == 1 and holder.conv is kernels.conv2d_ext_op
    np.testing.assert_allclose(holder(T(x, ms.float32), T(w, ms.float32)).asnumpy(), expected, atol=1e-5)


def test_modules_imported_after_install_are_rebound(tmp_path, monkeypatch):
    package = tmp_path / "cpu_backend_probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "late.py").write_text(
        "from mindspore.ops.auto_generate.gen_ops_prim import LayerNormExt, Randn\n"
        "from mindspore.ops import functional_overload\n"
        "norm = LayerNormExt()\n"
        "draw = Randn()\n"
        "gelu = functional_overload.__dict__['gelu']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(install, "PACKAGES", install.PACKAGES + ("cpu_backend_probe_pkg",))
    import importlib

    late = importlib.import_module("cpu_backend_probe_pkg.late")
    try:
        assert late.norm is kernels.layer_norm_ext_op and late.draw is rng.randn_op
        assert late.gelu is kernels.gelu  # already rebound in functional_overload itself
    finally:
        sys.modules.pop("cpu_backend_probe_pkg.late", None)
        sys.modules.pop("cpu_backend_probe_pkg", None)


# ---------------------------------------------------------------------------------------------------------------------
# random numbers
# ---------------------------------------------------------------------------------------------------------------------


def test_random_replacements_match_numpy_reference(ms_tools):
    T = ms_tools.T
    shape, seed, offset = (3, 4, 5), 1234567, 36
    s, o = T(np.int64(seed)), T(np.int64(offset))
    np.testing.assert_allclose(rng.randn_op(shape, s, o).asnumpy(), np_randn(shape, seed, offset), atol=1e-6)
    np.testing.assert_allclose(rng.randn_like_op(T(np.zeros(shape), ms.float16), s, o).asnumpy(),
                               np_randn(shape, seed, offset), atol=2e-3)
    np.testing.assert_allclose(rng.rand_ext_op(shape, s, o).asnumpy(), np_uniform53(shape, seed, offset, 0),
                               atol=1e-7)
    expected = np.floor(np_uniform53(shape, seed, offset, 0) * 13).astype(np.int64) - 3
    np.testing.assert_array_equal(rng.randint_op(-3, 10, shape, s, o).asnumpy(), expected)
    normal = rng.normal_float_float_op(2.0, 0.5, shape, s, o)
    np.testing.assert_allclose(normal.asnumpy(), 2.0 + 0.5 * np_randn(shape, seed, offset), atol=1e-6)


def test_random_statistics(ms_tools):
    T = ms_tools.T
    s, o = T(np.int64(7)), T(np.int64(0))
    normal = rng.randn_op((200_000,), s, o).asnumpy().astype(np.float64)
    assert abs(normal.mean()) < 0.01 and abs(normal.std() - 1) < 0.01
    grid = np.linspace(-3, 3, 13)
    cdf = 0.5 * (1 + _erf(grid / math.sqrt(2)))
    assert np.abs((normal[:, None] <= grid).mean(0) - cdf).max() < 0.005  # Kolmogorov-Smirnov-style distance
    uniform = rng.rand_ext_op((200_000,), s, o).asnumpy()
    assert uniform.min() >= 0 and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.005
    ints = rng.randint_op(0, 10, (200_000,), s, o).asnumpy()
    counts = np.bincount(ints, minlength=10)
    assert len(counts) == 10 and np.abs(counts / len(ints) - 0.1).max() < 0.005
    other = rng.randn_op((200_000,), s, T(np.int64(12))).asnumpy()
    assert abs(np.corrcoef(normal, other)[0, 1]) < 0.01  # the next offset is an independent stream


@pytest.mark.smoke
def test_mint_random_ops_follow_manual_seed(ms_tools):
    T = ms_tools.T
    ms.manual_seed(42)
    first = [mint.randn(2, 3), mint.randn_like(T(np.zeros((2, 3)), ms.float32)), mint.randint(0, 100, (5,)),
             mint.rand(4), mint.normal(0.0, 1.0, (3,))]
    ms.manual_seed(42)
    again = [mint.randn(2, 3), mint.randn_like(T(np.zeros((2, 3)), ms.float32)), mint.randint(0, 100, (5,)),
             mint.rand(4), mint.normal(0.0, 1.0, (3,))]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    assert not np.array_equal(first[0].asnumpy(), first[1].asnumpy())  # successive draws differ
    assert first[2].dtype == ms.int64 and 0 <= first[2].asnumpy().min() and first[2].asnumpy().max() < 100
    ms.manual_seed(42)
    np.testing.assert_array_equal(rng.randn((2, 3)).asnumpy(), first[0].asnumpy())
    state = ms.get_rng_state()  # exact resume: restoring the generator state replays the stream
    draw = mint.randn(5).asnumpy()
    ms.set_rng_state(state)
    np.testing.assert_array_equal(mint.randn(5).asnumpy(), draw)


def test_dropout(ms_tools):
    T = ms_tools.T
    x = T(np.ones((100, 100)), ms.float32)
    layer = mint.nn.Dropout(p=0.25)
    layer.set_train(True)
    out = layer(x).asnumpy()
    np.testing.assert_allclose(np.unique(out), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs((out == 0).mean() - 0.25) < 0.02
    ms.manual_seed(3)
    mask_out = mint.nn.functional.dropout(x, p=0.5, training=True)
    ms.manual_seed(3)
    grad = ms.grad(lambda a: mint.nn.functional.dropout(a, p=0.5, training=True).sum())(x)
    np.testing.assert_allclose(grad.asnumpy(), mask_out.asnumpy())  # d(out)/dx = mask / (1 - p)
    layer.set_train(False)
    np.testing.assert_array_equal(layer(x).asnumpy(), x.asnumpy())


@pytest.mark.slow
def test_random_numbers_identical_in_graph_mode(ms_tools):
    """Compile 1 of 4: GRAPH_MODE draws the same numbers as PyNative from the same generator state."""
    T, graph_mode = ms_tools.T, ms_tools.graph_mode

    class Draw(nn.Cell):
        def construct(self, x):
            return mint.randn_like(x), mint.randint(0, 1000, (4,)), mint.randn_like(x)

    x = T(np.zeros((2, 3)), ms.float32)
    ms.manual_seed(11)
    eager = [t.asnumpy() for t in Draw()(x)] + [t.asnumpy() for t in Draw()(x)]
    with graph_mode():
        ms.manual_seed(11)
        cell = Draw()
        graph = [t.asnumpy() for t in cell(x)]
        state = ms.get_rng_state()
        graph += [t.asnumpy() for t in cell(x)]
        ms.set_rng_state(state)
        replay = [t.asnumpy() for t in cell(x)]
    for a, b in zip(eager, graph):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(graph[3:], replay):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(eager[0], eager[2]) and not np.array_equal(eager[0], eager[3])


# ---------------------------------------------------------------------------------------------------------------------
# LoRA training steps on tiny models
# ---------------------------------------------------------------------------------------------------------------------


def _seed(value=0):
    ms.set_seed(value)
    np.random.seed(value)
    ms.manual_seed(value)


def _randomise_lora_b(ms_tools, model, seed=0):
    """LoRA B starts at zero, which makes every A gradient zero on the first step; give B small values instead."""
    T = ms_tools.T
    rng = np.random.default_rng(seed)
    for param in model.get_parameters():
        if param.requires_grad and "lora_B" in param.name:
            param.set_data(T(rng.normal(0, 0.02, param.shape).astype(np.float32)))


def _add_lora(ms_tools, model, targets, rank=4, dropout=0.0):
    from mindone.peft import LoraConfig

    for param in model.get_parameters():
        param.requires_grad = False
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets,
                                 lora_dropout=dropout))
    _randomise_lora_b(ms_tools, model)
    return model


def tiny_unet(ms_tools, config):
    from mindone.diffusers import UNet2DConditionModel

    _seed(0)
    return _add_lora(ms_tools, UNet2DConditionModel(**config), UNET_TARGETS)


def tiny_clip(ms_tools, with_projection=False, dropout=0.0):
    from mindone.transformers import CLIPTextModel, CLIPTextModelWithProjection
    from transformers import CLIPTextConfig

    _seed(0)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _add_lora(ms_tools, cls(CLIPTextConfig(**CLIP)), CLIP_TARGETS, dropout=dropout)


class GradStep(nn.Cell):
    """forward + value_and_grad + AdamWeightDecay step; returns the loss and the gradients."""

    def __init__(self, loss_cell, optimizer):
        super().__init__()
        self.loss_cell = loss_cell
        self.optimizer = optimizer
        self.grad_fn = ms.value_and_grad(loss_cell, None, optimizer.parameters)

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        self.optimizer(grads)
        return loss, grads


def run_lora_step(ms_tools, model, loss_cell, inputs, graph):
    """One training step on ``model``'s trainable (LoRA) parameters; checks what a LoRA step must do."""
    graph_mode = ms_tools.graph_mode
    trainable = [p for p in model.get_parameters() if p.requires_grad]
    frozen = [p for p in model.get_parameters() if not p.requires_grad]
    assert trainable and all("lora_" in p.name for p in trainable)
    before = {id(p): p.asnumpy().copy() for p in model.get_parameters()}  # (wrapping cells renames parameters)
    optimizer = nn.AdamWeightDecay(trainable, learning_rate=1e-3, weight_decay=0.0)
    step = GradStep(loss_cell, optimizer)
    with graph_mode() if graph else contextlib.nullcontext():
        loss, grads = step(*inputs)
        loss, grads = float(loss.asnumpy()), [g.asnumpy() for g in grads]
    assert np.isfinite(loss)
    assert len(grads) == len(trainable)
    for param, grad in zip(trainable, grads):
        assert np.isfinite(grad).all(), param.name
        assert np.abs(grad).max() > 0, f"zero gradient for {param.name}"
        assert not np.array_equal(param.asnumpy(), before[id(param)]), f"{param.name} did not move"
    for param in frozen:
        np.testing.assert_array_equal(param.asnumpy(), before[id(param)], err_msg=param.name)
    return loss, grads


class UNetLoss(nn.Cell):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def construct(self, latents, timesteps, encoder_hidden_states, target):
        pred = self.unet(latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        return mint.nn.functional.mse_loss(pred.float(), target.float())


class SDXLUNetLoss(nn.Cell):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def construct(self, latents, timesteps, encoder_hidden_states, text_embeds, time_ids, target):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        pred = self.unet(latents, timesteps, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]
        return mint.nn.functional.mse_loss(pred.float(), target.float())


class CLIPLoss(nn.Cell):
    def __init__(self, encoder, weights):
        super().__init__()
        self.encoder = encoder
        self.weights = weights

    def construct(self, input_ids):
        hidden = self.encoder(input_ids, output_hidden_states=False, return_dict=False)[0]
        return (hidden * self.weights).sum()


def sd1_inputs(ms_tools, batch=1, size=16):
    T = ms_tools.T
    rng = np.random.default_rng(5)
    return (T(rng.standard_normal((batch, 4, size, size)), ms.float32), T(np.array([10, 500][:batch]), ms.int32),
            T(rng.standard_normal((batch, 7, 32)), ms.float32),
            T(rng.standard_normal((batch, 4, size, size)), ms.float32))


def sdxl_inputs(ms_tools, batch=1, size=16):
    T = ms_tools.T
    rng = np.random.default_rng(6)
    return (T(rng.standard_normal((batch, 4, size, size)), ms.float32), T(np.array([10, 500][:batch]), ms.int32),
            T(rng.standard_normal((batch, 7, 64)), ms.float32), T(rng.standard_normal((batch, 32)), ms.float32),
            T(np.tile([[size * 8, size * 8, 0, 0, size * 8, size * 8]], (batch, 1)), ms.float32),
            T(rng.standard_normal((batch, 4, size, size)), ms.float32))


def clip_inputs(ms_tools):
    T = ms_tools.T
    return (T(np.array([[0, 5, 17, 300, 999, 1, 1]]), ms.int32),)


@pytest.mark.slow
def test_sdxl_unet_lora_step_pynative_and_graph(ms_tools):
    """Compile 2 of 4. Both modes start from the same weights and get the same loss, gradients and update."""
    results = []
    for graph in (False, True):
        unet = tiny_unet(ms_tools, SDXL_UNET)
        loss, grads = run_lora_step(ms_tools, unet, SDXLUNetLoss(unet), sdxl_inputs(ms_tools), graph=graph)
        results.append((loss, grads, [p.asnumpy() for p in unet.get_parameters() if p.requires_grad]))
    (eager_loss, eager_grads, eager_params), (graph_loss, graph_grads, graph_params) = results
    np.testing.assert_allclose(graph_loss, eager_loss, rtol=1e-4)
    for a, b in zip(eager_grads, graph_grads):
        np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-5 * max(1.0, float(np.abs(a).max())))
    for a, b in zip(eager_params, graph_params):
        np.testing.assert_allclose(b, a, atol=1e-5)


@pytest.mark.slow
def test_clip_text_encoder_lora_step_pynative_and_graph(ms_tools):
    """Compile 3 of 4: hidden_act="gelu" puts the GELU replacement on the path, lora_dropout=0.1 the dropout one
    (same generator seed in both modes, so the same dropout masks and the same loss)."""
    T = ms_tools.T
    weights = T(np.random.default_rng(2).standard_normal((1, 7, 32)), ms.float32)
    losses = []
    for graph in (False, True):
        encoder = tiny_clip(ms_tools, dropout=0.1)
        encoder.set_train(True)
        ms.manual_seed(5)
        inputs = clip_inputs(ms_tools)
        losses.append(run_lora_step(ms_tools, encoder, CLIPLoss(encoder, weights), inputs, graph=graph)[0])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    encoder = tiny_clip(ms_tools, dropout=0.1)
    encoder.set_train(True)
    ms.manual_seed(6)
    assert abs(CLIPLoss(encoder, weights)(*clip_inputs(ms_tools)).asnumpy() - losses[0]) > 1e-6  # dropout is active


def test_clip_with_projection_lora_step(ms_tools):
    encoder = tiny_clip(ms_tools, with_projection=True)

    class ProjectionLoss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def construct(self, input_ids):
            out = self.encoder(input_ids, return_dict=False)
            return (out[0] ** 2).sum() + out[1].sum()  # text_embeds and last_hidden_state

    run_lora_step(ms_tools, encoder, ProjectionLoss(), clip_inputs(ms_tools), graph=False)


class SDTrainStep:
    """Builds mindone's ``TrainStep`` for the text-to-image LoRA pattern: VAE encoding (latents sampled with
    ``mint.randn_like``), noise and timesteps drawn with ``mint``, ``DDPMScheduler.add_noise``, v-prediction target,
    min-SNR weighted MSE (γ = 5), a dynamic loss scaler and gradient clipping at 1.0."""

    @staticmethod
    def build(unet, vae, scheduler, optimizer):
        from mindone.diffusers.training_utils import TrainStep, compute_snr

        class _Step(TrainStep):
            def __init__(self):
                from mindspore.amp import DynamicLossScaler

                super().__init__(unet, optimizer, loss_scaler=DynamicLossScaler(2.0 ** 10, 2, 1000),
                                 max_grad_norm=1.0, gradient_accumulation_steps=1)
                self.unet = unet
                self.vae = vae
                self.scaling_factor = vae.config.scaling_factor
                self.scheduler = scheduler
                self.num_train_timesteps = scheduler.config.num_train_timesteps

            def forward(self, pixel_values, encoder_hidden_states):
                # (not vae.diag_gauss_dist.sample: it draws with numpy, which GRAPH_MODE runs once, at compile time)
                mean, _, _, std = self.vae.diag_gauss_dist.init(self.vae.encode(pixel_values)[0])
                latents = (mean + std * mint.randn_like(mean)) * self.scaling_factor
                noise = mint.randn_like(latents)
                timesteps = mint.randint(0, self.num_train_timesteps, (latents.shape[0],))
                noisy = self.scheduler.add_noise(latents, noise, timesteps)
                target = self.scheduler.get_velocity(latents, noise, timesteps)
                pred = self.unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
                snr = compute_snr(self.scheduler, timesteps)
                weights = mint.stack([snr, 5.0 * mint.ones_like(snr)], dim=1).min(dim=1)[0] / (snr + 1)
                loss = mint.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
                loss = (loss.mean(axis=(1, 2, 3)) * weights).mean()
                return self.scale_loss(loss), pred

        return _Step()


def tiny_vae():
    from mindone.diffusers import AutoencoderKL

    _seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=32,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    for param in vae.get_parameters():
        param.requires_grad = False
    return vae


def _scheduler():
    from mindone.diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type="v_prediction")


@pytest.mark.slow
def test_mindone_train_step_pynative_and_graph(ms_tools):
    """Compile 4 of 4: a LoRA step on the tiny SD1.x UNet with mindone's TrainStep (value_and_grad +
    AdamWeightDecay) in both modes, from the same weights and generator seed: the same loss and the same update."""
    T, graph_mode = ms_tools.T, ms_tools.graph_mode
    rng = np.random.default_rng(9)
    pixels = T(rng.uniform(-1, 1, (2, 3, 32, 32)), ms.float32)
    text = T(rng.standard_normal((2, 7, 32)), ms.float32)
    results = []
    for graph in (False, True):
        unet = tiny_unet(ms_tools, SD1_UNET)
        trainable = [p for p in unet.get_parameters() if p.requires_grad]
        before = {id(p): p.asnumpy().copy() for p in unet.get_parameters()}
        vae = tiny_vae()
        frozen_vae = [(p, p.asnumpy().copy()) for p in vae.get_parameters()]
        step = SDTrainStep.build(unet, vae, _scheduler(), nn.AdamWeightDecay(trainable, 1e-3, weight_decay=0.0))
        if not graph:  # the gradients themselves, through TrainStep's own value_and_grad
            ms.manual_seed(21)
            grads = step.forward_and_backward(pixels, text)[1]
            assert len(grads) == len(trainable) == 96  # 6 transformer blocks x 2 attentions x 4 targets x (A, B)
            for param, grad in zip(trainable, grads):
                grad = grad.asnumpy()
                assert np.isfinite(grad).all() and np.abs(grad).max() > 0, f"zero gradient for {param.name}"
        with graph_mode() if graph else contextlib.nullcontext():
            ms.manual_seed(21)
            loss = float(step(pixels, text)[0].asnumpy())
        assert np.isfinite(loss)
        for param in unet.get_parameters():
            moved = not np.array_equal(param.asnumpy(), before[id(param)])
            # AdamWeightDecay without weight decay moves a parameter exactly where its gradient is non-zero
            assert moved == param.requires_grad, param.name
        for param, value in frozen_vae:
            np.testing.assert_array_equal(param.asnumpy(), value)
        results.append((loss, [p.asnumpy() for p in trainable]))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_add_noise_and_compute_snr_match_numpy(ms_tools):
    from mindone.diffusers.training_utils import compute_snr

    T = ms_tools.T

    scheduler = _scheduler()
    alphas = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    x, noise = randn(2, 4, 3, 3), randn(2, 4, 3, 3)
    t = np.array([3, 999])
    got = scheduler.add_noise(T(x, ms.float32), T(noise, ms.float32), T(t, ms.int32)).asnumpy()
    a = alphas[t].reshape(2, 1, 1, 1)
    np.testing.assert_allclose(got, np.sqrt(a) * x + np.sqrt(1 - a) * noise, atol=1e-5)
    np.testing.assert_allclose(compute_snr(scheduler, T(t, ms.int32)).asnumpy(), alphas[t] / (1 - alphas[t]),
                               rtol=1e-4)


def test_half_precision_unet_with_float32_lora(ms_tools):
    """fp16 frozen weights, LoRA weights upcast by cast_training_params: the step runs and stays finite."""
    from mindone.diffusers.training_utils import cast_training_params

    unet = tiny_unet(ms_tools, SD1_UNET)
    unet.to(ms.float16)
    cast_training_params(unet, ms.float32)
    dtypes = {p.requires_grad: p.dtype for p in unet.get_parameters()}
    assert dtypes == {True: ms.float32, False: ms.float16}
    latents, timesteps, text, target = sd1_inputs(ms_tools)
    run_lora_step(ms_tools, unet, UNetLoss(unet), (latents.half(), timesteps, text.half(), target), graph=False)


def test_vae_round_trip_is_finite(ms_tools):
    T = ms_tools.T
    vae = tiny_vae()
    images = T(np.random.default_rng(3).uniform(-1, 1, (1, 3, 32, 32)), ms.float32)
    moments = vae.encode(images)[0]
    latents = vae.diag_gauss_dist.sample(moments, generator=np.random.default_rng(0))
    assert latents.shape == (1, 4, 16, 16) and np.isfinite(latents.asnumpy()).all()
    decoded = vae.decode(latents)[0]
    assert decoded.shape == (1, 3, 32, 32) and np.isfinite(decoded.asnumpy()).all()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_tiny_pipeline_inference(kind, tmp_path):
    from mindone_lora_plugin.architectures.sd.tiny import build_pipeline

    pipe = build_pipeline(kind, str(tmp_path))
    images = pipe("a photo of a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=np.random.default_rng(0))[0]
    images = np.asarray(images)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


# ---------------------------------------------------------------------------------------------------------------------
# activation
# ---------------------------------------------------------------------------------------------------------------------


def _python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_import_does_not_import_mindspore_and_env_switch_turns_it_off():
    out = _python("import sys\n"
                  "from mindone_lora_plugin.runtime import cpu\n"
                  "assert 'mindspore' not in sys.modules\n"
                  "assert cpu.activate('CPU') is False and not cpu.is_active()\n"
                  "assert 'mindspore' not in sys.modules\n"
                  "print('ok')", MINDONE_LORA_CPU_BACKEND="0")
    assert out.strip() == "ok"


@pytest.mark.parametrize("target", ["Ascend", "GPU", "ascend"])
def test_activation_on_other_targets_returns_false(target):
    assert cpu.activate(target) is False
