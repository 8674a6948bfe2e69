"""The CPU backend's chunked attention (``runtime/cpu/attention.py``): the same values and gradients as the
materialised ``softmax(q kᵀ) v``, in PyNative and GRAPH_MODE, chosen only for large unmasked calls, and a UNet LoRA
step through it equal to mindone's own attention path."""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore import mint, nn  # noqa: E402

from mindone_lora_plugin.runtime import cpu  # noqa: E402
from mindone_lora_plugin.runtime.cpu import attention as cpu_attention  # noqa: E402

if ms.get_context("device_target") != "CPU":  # pragma: no cover
    pytest.skip("the CPU backend exists for CPU only", allow_module_level=True)


@pytest.fixture(autouse=True)
def backend(monkeypatch, ms_tools):
    pynative = ms_tools.pynative
    monkeypatch.delenv(cpu.ENV_SWITCH, raising=False)
    assert cpu.activate() is True
    with pynative():
        yield


def np_attention_and_grads(q, k, v, w):
    """float64 reference: ``sum(softmax(q kᵀ) v * w)`` and its gradients with respect to q, k, v."""
    q, k, v, w = (a.astype(np.float64) for a in (q, k, v, w))
    s = q @ k.swapaxes(-1, -2)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    dv = p.swapaxes(-1, -2) @ w
    dp = w @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    return float((out * w).sum()), ds @ k, ds.swapaxes(-1, -2) @ q, dv


class WeightedSum(nn.Cell):
    def construct(self, q, k, v, w):
        return (cpu_attention.chunked_attention(q, k, v) * w).sum()


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_chunked_attention_matches_numpy(mode, monkeypatch, ms_tools):
    T, graph_mode, pynative = ms_tools.T, ms_tools.graph_mode, ms_tools.pynative
    monkeypatch.setattr(cpu_attention, "CHUNK_ELEMENTS", 2 * 3 * 5 * 11)  # 5 queries a chunk: 4 chunks for 17
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 3, 17, 8)), rng.standard_normal((2, 3, 11, 8))
    v, w = rng.standard_normal((2, 3, 11, 6)), rng.standard_normal((2, 3, 17, 6))
    grad = ms.value_and_grad(WeightedSum(), grad_position=(0, 1, 2))
    with graph_mode() if mode == "graph" else pynative():
        value, grads = grad(*(T(a, ms.float32) for a in (q, k, v, w)))
    ref_value, *ref_grads = np_attention_and_grads(q, k, v, w)
    np.testing.assert_allclose(float(value.asnumpy()), ref_value, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got.asnumpy(), want, atol=1e-5)


def test_half_precision_inputs_come_back_in_their_dtype(ms_tools):
    T = ms_tools.T
    rng = np.random.default_rng(1)
    q, k, v = (T(rng.standard_normal((1, 2, 9, 4)), ms.float16) for _ in range(3))
    out = cpu_attention.chunked_attention(q, k, v)
    assert out.dtype == ms.float16 and out.shape == (1, 2, 9, 4)
    ref = np_attention_and_grads(*(a.asnumpy() for a in (q, k, v)), np.ones((1, 2, 9, 4)))[0]
    np.testing.assert_allclose(float(out.astype(ms.float32).asnumpy().sum()), ref, rtol=1e-2)


def test_only_large_unmasked_calls_take_the_chunked_path(ms_tools):
    T = ms_tools.T
    small = T(np.zeros((1, 8, 64, 40)), ms.float32)
    large = T(np.zeros((1, 8, 4096, 40)), ms.float32)  # SD1.5's first level at 512 px: 8 × 4096 × 4096 scores
    assert not cpu_attention.wanted(small, small)
    assert cpu_attention.wanted(large, large)
    assert not cpu_attention.wanted(large, large, attn_mask=T(np.zeros((1, 1, 4096, 4096)), ms.float32))
    assert not cpu_attention.wanted(large, large, is_causal=True)
    assert not cpu_attention.wanted(large, large, dropout_p=0.1)
    assert not cpu_attention.wanted(large, T(np.zeros((1, 8, 77, 40)), ms.float32))  # cross-attention: small


def test_the_backend_routes_mindone_attention_through_it():
    from mindone.diffusers.models.attention_processor import Attention

    assert Attention.scaled_dot_product_attention is cpu_attention.sd_attention
    assert cpu_attention.install_into(Attention) is False  # idempotent


UNET = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4), norm_num_groups=32)


class UNetLoss(nn.Cell):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def construct(self, latents, timesteps, embeds, target):
        pred = self.unet(latents, timesteps, embeds, return_dict=False)[0]
        return mint.nn.functional.mse_loss(pred, target)


def _lora_unet(ms_tools):
    from mindone.diffusers import UNet2DConditionModel
    from mindone.peft import LoraConfig

    T = ms_tools.T

    ms.set_seed(0)
    np.random.seed(0)
    unet = UNet2DConditionModel(**UNET)
    for p in unet.get_parameters():
        p.requires_grad = False
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    rng = np.random.default_rng(0)
    for p in unet.get_parameters():
        if p.requires_grad and "lora_B" in p.name:  # non-zero B, so that every LoRA gradient is non-zero
            p.set_data(T(rng.normal(0, 0.02, p.shape), ms.float32))
    return unet


def test_unet_lora_gradients_equal_through_chunked_attention(monkeypatch, ms_tools):
    """mindone's attention (PyNative) against the chunked path (GRAPH_MODE, every self-attention in 4 chunks): the
    loss and every LoRA gradient agree."""
    T, graph_mode = ms_tools.T, ms_tools.graph_mode
    rng = np.random.default_rng(5)
    inputs = (T(rng.standard_normal((1, 4, 16, 16)), ms.float32), T(np.array([500]), ms.int32),
              T(rng.standard_normal((1, 7, 32)), ms.float32), T(rng.standard_normal((1, 4, 16, 16)), ms.float32))
    results = []
    for chunked in (False, True):
        unet = _lora_unet(ms_tools)
        params = [p for p in unet.get_parameters() if p.requires_grad]
        grad = ms.value_and_grad(UNetLoss(unet), None, params)
        if chunked:  # self-attention at 16×16: 256 queries and keys, 2 heads; 64 queries a chunk
            monkeypatch.setattr(cpu_attention, "MIN_SCORE_ELEMENTS", 0)
            monkeypatch.setattr(cpu_attention, "CHUNK_ELEMENTS", 2 * 64 * 256)
            with graph_mode():
                loss, grads = grad(*inputs)
        else:
            loss, grads = grad(*inputs)
        results.append((float(loss.asnumpy()), [g.asnumpy() for g in grads]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert len(grads_a) == 64 and all(np.abs(g).max() > 0 for g in grads_a)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, float(np.abs(a).max())))
    # and the chunked path is the one taken: count its calls in a PyNative forward (every attention layer)
    calls = []
    inner = cpu_attention.chunked_attention
    monkeypatch.setattr(cpu_attention, "chunked_attention", lambda q, k, v: calls.append(q.shape) or inner(q, k, v))
    UNetLoss(_lora_unet(ms_tools))(*inputs)
    # self- and cross-attention: 1 down, 1 mid and 2 up transformer layers
    assert calls == [(1, 2, 256, 16)] * 2 + [(1, 4, 64, 16)] * 2 + [(1, 2, 256, 16)] * 4


def test_flux_attention_function_takes_the_chunked_path_when_large(monkeypatch, ms_tools):
    """mindone's ``layers_compat.scaled_dot_product_attention`` (FLUX) as replaced by the backend: the chunked path
    for a large unmasked call gives the materialised path's values."""
    from mindone_lora_plugin.runtime.cpu import transformer as cpu_transformer

    T = ms_tools.T

    rng = np.random.default_rng(3)
    q, k, v = (T(rng.standard_normal((1, 2, 33, 8)), ms.float32) for _ in range(3))
    plain = cpu_transformer.scaled_dot_product_attention(q, k, v).asnumpy()
    calls = []
    inner = cpu_attention.chunked_attention
    monkeypatch.setattr(cpu_attention, "chunked_attention", lambda *a: calls.append(1) or inner(*a))
    monkeypatch.setattr(cpu_attention, "MIN_SCORE_ELEMENTS", 0)
    monkeypatch.setattr(cpu_attention, "CHUNK_ELEMENTS", 2 * 8 * 33)
    chunked = cpu_transformer.scaled_dot_product_attention(q, k, v).asnumpy()
    assert calls == [1]
    np.testing.assert_allclose(chunked, plain, atol=1e-6)
