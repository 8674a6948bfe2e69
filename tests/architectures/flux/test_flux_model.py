"""Tiny FLUX.1 models (dev and schnell layouts), their LoRA presets, the flow-matching loss and generation on CPU."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindone_lora_plugin.architectures.flux import timesteps as ts  # noqa: E402
from mindone_lora_plugin.errors import LoraError  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    from mindone_lora_plugin.architectures.flux.tiny import ensure_tiny_model

    root = tmp_path_factory.mktemp("flux")
    return {kind: ensure_tiny_model(kind, str(root / f"tiny-flux-{kind}")) for kind in ("dev", "schnell")}


@pytest.fixture(autouse=True)
def in_pynative(ms_tools):
    pynative = ms_tools.pynative
    with pynative():
        yield


def transformer(folder):
    from mindone.diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    for p in model.get_parameters():
        p.requires_grad = False
    return model


def np_pack(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)


def np_unpack(t, h, w):
    n, _, d = t.shape
    return t.reshape(n, h // 2, w // 2, d // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(n, d // 4, h, w)


def np_image_ids(h, w):
    ids = np.zeros((h // 2, w // 2, 3), np.float32)
    ids[..., 1] = np.arange(h // 2)[:, None]
    ids[..., 2] = np.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def batch(guidance: bool, n=2, seed=0):
    """latents, noise, sigmas, weights, T5 embeds, pooled (+ guidance) as numpy arrays."""
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal((n, 16, 16, 16)).astype(np.float32), rng.standard_normal((n, 16, 16, 16)).astype(
        np.float32), ts.sample_sigmas(rng, n, "sigma", 3.0), np.array([1.0, 0.5][:n], np.float32),
           rng.standard_normal((n, 8, 32)).astype(np.float32), rng.standard_normal((n, 32)).astype(np.float32)]
    if guidance:
        out.append(np.full(n, 3.5, np.float32))
    return out


def reference_loss(pred_fn, latents, noise, sigmas, weights, embeds, pooled, guidance=None):
    """diffusers'/kohya's formula in numpy around a transformer call ``pred_fn(packed, ...) -> packed``."""
    s = sigmas.reshape(-1, 1, 1, 1).astype(np.float64)
    noisy = ((1 - s) * latents + s * noise).astype(np.float32)
    h, w = latents.shape[2:]
    pred = pred_fn(np_pack(noisy), embeds, pooled, sigmas, np_image_ids(h, w), np.zeros((embeds.shape[1], 3),
                                                                                           np.float32), guidance)
    err = (np_unpack(pred.astype(np.float64), h, w) - (noise - latents)) ** 2
    return float((err.reshape(len(err), -1).mean(1) * weights).mean())


# ---------------------------------------------------------------------------------------------------------------------
# the tiny folders
# ---------------------------------------------------------------------------------------------------------------------


def test_tiny_folders_are_small_flux_pipelines(folders):
    for kind, folder in folders.items():
        index = json.load(open(os.path.join(folder, "model_index.json")))
        assert index["_class_name"] == "FluxPipeline"
        assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
        assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
        assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
        config = json.load(open(os.path.join(folder, "transformer", "config.json")))
        assert config["guidance_embeds"] is (kind == "dev")
        assert config["in_channels"] == 64 and sum(config["axes_dims_rope"]) == config["attention_head_dim"]
        vae = json.load(open(os.path.join(folder, "vae", "config.json")))
        assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
        assert vae["use_quant_conv"] is False and vae["use_post_quant_conv"] is False
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
        assert size < 6 * 2 ** 20, size


def test_tiny_tokenizers_and_text_encoders_load_from_the_folder(folders):
    from mindone.transformers import CLIPTextModel, T5EncoderModel
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = folders["dev"]
    t5_tok = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2")
    ids = t5_tok("a photo of sks dog", padding="max_length", max_length=12).input_ids
    assert t5_tok.convert_ids_to_tokens(ids[:6]) == ["▁a", "▁photo", "▁of", "▁sks", "▁dog", "</s>"]
    assert ids[6:] == [t5_tok.pad_token_id] * 6
    clip_tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    clip_ids = clip_tok(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="np").input_ids
    t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2")
    # the token table is loaded (not initialised at random): embed_tokens equals the saved shared table
    from mindone_lora_plugin import safetensors_io

    saved, _ = safetensors_io.load(os.path.join(folder, "text_encoder_2", "model.safetensors"))
    np.testing.assert_array_equal(t5.encoder.embed_tokens.weight.asnumpy(), saved["shared.weight"])
    hidden = t5(ms.Tensor(np.array([ids], np.int32)))[0]
    assert hidden.shape == (1, 12, 32) and np.isfinite(hidden.asnumpy()).all()
    pooled = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")(ms.Tensor(clip_ids.astype(np.int32)))[1]
    assert pooled.shape == (1, 32)


# ---------------------------------------------------------------------------------------------------------------------
# presets, timesteps, packing
# ---------------------------------------------------------------------------------------------------------------------


def test_presets_pick_attention_projections_or_every_block_linear(folders):
    from mindone_lora_plugin.architectures.flux.targets import transformer_targets

    model = transformer(folders["dev"])
    attn = transformer_targets(model, "attn", 4, 8.0)
    assert sorted(p for p in attn if p.startswith("transformer_blocks.0.")) == sorted(
        f"transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                   "add_v_proj", "to_add_out"))
    assert sorted(p for p in attn if p.startswith("single_transformer_blocks.1.")) == [
        f"single_transformer_blocks.1.attn.{n}" for n in ("to_k", "to_q", "to_v")]
    assert len(attn) == 8 + 2 * 3 and set(attn.values()) == {(4, 8.0)}
    every = transformer_targets(model, "kohya", 4, 4.0)
    # double block: 8 attention + ff (2) + ff_context (2) + norm1/norm1_context modulation; single: q/k/v, proj_mlp,
    # proj_out, norm.linear
    assert len(every) == 14 + 2 * 6
    assert {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.ff_context.net.2",
            "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.norm.linear"} <= set(every)
    assert not any(p.startswith(("x_embedder", "context_embedder", "proj_out", "norm_out", "time_text_embed"))
                   for p in every)
    assert sorted(transformer_targets(model, ["proj_mlp"], 2, 2.0)) == [
        "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_mlp"]
    with pytest.raises(LoraError, match="the target preset 'conv' is not defined for the FLUX.1 transformer; "
                                        "choose one of attn, kohya"):
        transformer_targets(model, "conv", 4, 4.0)


def test_timestep_sampling_modes():
    rng = np.random.default_rng(0)
    sigma = ts.sample_sigmas(rng, 4000, "sigma", 3.0)
    # shifted discrete schedule: σ = 3s/(1+2s) for s = k/1000
    s = 1000 * sigma / (3 - 2 * sigma)
    np.testing.assert_allclose(s, np.round(s), atol=2e-3)
    assert sigma.min() > 0 and sigma.max() <= 1.0 and np.median(sigma) > 0.6  # the shift moves mass to high noise
    unshifted = ts.sample_sigmas(np.random.default_rng(0), 4000, "sigma", 1.0)
    assert abs(np.median(unshifted) - 0.5) < 0.03
    uniform = ts.sample_sigmas(np.random.default_rng(1), 4000, "uniform", 3.0)
    assert abs(uniform.mean() - 0.5) < 0.02 and len(np.unique(uniform)) > 3000  # continuous, shift ignored
    logit = ts.sample_sigmas(np.random.default_rng(2), 4000, "logit_normal", 1.0, logit_std=0.5)
    assert abs(np.median(logit) - 0.5) < 0.03 and logit.std() < uniform.std()
    shifted = ts.sample_sigmas(np.random.default_rng(3), 4000, "shift", 3.0)
    u = 1 / (1 + np.exp(-np.random.default_rng(3).standard_normal(4000)))
    np.testing.assert_allclose(shifted, 3 * u / (1 + 2 * u), rtol=1e-6)
    assert sigma.dtype == np.float32
    with pytest.raises(LoraError, match="unknown --timestep_sampling 'cosine'"):
        ts.sample_sigmas(rng, 2, "cosine")
    with pytest.raises(LoraError, match="--discrete_flow_shift must be positive"):
        ts.sample_sigmas(rng, 2, "sigma", 0.0)


def test_packing_and_image_ids_match_numpy():
    from mindone_lora_plugin.architectures.flux.loss import image_ids, pack_latents, unpack_latents

    x = np.random.default_rng(0).standard_normal((2, 16, 8, 12)).astype(np.float32)
    packed = pack_latents(ms.Tensor(x))
    np.testing.assert_array_equal(packed.asnumpy(), np_pack(x))
    # token (i, j) holds the patch x[:, c, 2i:2i+2, 2j:2j+2], channel-major
    np.testing.assert_array_equal(packed.asnumpy()[1, 1 * 6 + 2].reshape(16, 2, 2), x[1, :, 2:4, 4:6])
    np.testing.assert_array_equal(unpack_latents(packed, 8, 12).asnumpy(), x)
    np.testing.assert_array_equal(image_ids(8, 12).asnumpy(), np_image_ids(8, 12))


# ---------------------------------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------------------------------


def mindone_pred_fn(model):
    def run(packed, embeds, pooled, sigmas, img_ids, txt_ids, guidance):
        T = ms.Tensor
        out = model(T(packed), T(embeds), T(pooled), T(sigmas), T(img_ids), T(txt_ids),
                    None if guidance is None else T(guidance), return_dict=False)[0]
        return out.asnumpy()

    return run


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_flow_matching_loss_matches_the_numpy_formula(folders, kind):
    from mindone_lora_plugin.architectures.flux.loss import FlowMatchLoss

    model = transformer(folders[kind])
    data = batch(guidance=kind == "dev")
    loss = float(FlowMatchLoss(model)(*[ms.Tensor(a) for a in data]).asnumpy())
    np.testing.assert_allclose(loss, reference_loss(mindone_pred_fn(model), *data), rtol=1e-5)
    # the weights weigh samples: doubling one sample's weight changes the loss
    data[3] = np.array([1.0, 1.0], np.float32)
    assert float(FlowMatchLoss(model)(*[ms.Tensor(a) for a in data]).asnumpy()) != pytest.approx(loss)


@pytest.mark.interop
def test_transformer_and_loss_match_torch_diffusers(folders):
    """The same folder in Hugging Face diffusers (torch): same transformer outputs and loss (≤ 1e-4), so the CPU
    backend's FLUX replacements compute what the real model computes."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from mindone_lora_plugin.architectures.flux.loss import FlowMatchLoss

    for kind in ("dev", "schnell"):
        ref = diffusers.FluxTransformer2DModel.from_pretrained(folders[kind], subfolder="transformer").eval()

        def torch_pred(packed, embeds, pooled, sigmas, img_ids, txt_ids, guidance):
            t = torch.from_numpy
            with torch.no_grad():
                out = ref(hidden_states=t(packed), encoder_hidden_states=t(embeds), pooled_projections=t(pooled),
                          timestep=t(sigmas), img_ids=t(img_ids), txt_ids=t(txt_ids),
                          guidance=None if guidance is None else t(guidance), return_dict=False)[0]
            return out.numpy()

        model = transformer(folders[kind])
        data = batch(guidance=kind == "dev", seed=1)
        packed = np_pack(data[0])
        args = (packed, data[4], data[5], data[2], np_image_ids(16, 16), np.zeros((8, 3), np.float32),
                data[6] if kind == "dev" else None)
        np.testing.assert_allclose(mindone_pred_fn(model)(*args), torch_pred(*args), atol=1e-4)
        loss = float(FlowMatchLoss(model)(*[ms.Tensor(a) for a in data]).asnumpy())
        np.testing.assert_allclose(loss, reference_loss(torch_pred, *data), rtol=1e-4)


def lora_training(model, preset, data, steps, lr=1e-2):
    from mindone_lora_plugin.algorithms.lora import PlainLora
    from mindone_lora_plugin.architectures.flux.loss import FlowMatchLoss
    from mindone_lora_plugin.architectures.flux.targets import transformer_targets
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.train.step import build_steps

    options = LoraOptions(rank=4, targets=preset)
    PlainLora().add_adapters(model, transformer_targets(model, preset, 4, 4.0), options)
    params = model.trainable_params()
    assert params and all("lora_" in p.name for p in params)
    frozen = {p.name: p.asnumpy().copy() for p in model.get_parameters() if not p.requires_grad}
    loss_cell = FlowMatchLoss(model)
    loss_cell.set_train(True)
    optimizer = ms.nn.AdamWeightDecay(params, learning_rate=lr, weight_decay=0.0)
    _, step = build_steps(loss_cell, optimizer, max_grad_norm=1.0, accumulation=1)
    inputs = [ms.Tensor(a) for a in data]
    losses = [float(step(*inputs).asnumpy()) for _ in range(steps)]
    for p in model.get_parameters():
        if p.name in frozen:
            np.testing.assert_array_equal(p.asnumpy(), frozen[p.name], err_msg=p.name)
    return losses, params


def test_lora_on_the_dev_transformer_trains_in_graph_mode(folders, ms_tools):
    """Attention-projection LoRA, the package's TrainStep (value_and_grad, clipping, AdamW), GRAPH_MODE: the loss
    is finite and goes down on a fixed batch."""
    graph_mode = ms_tools.graph_mode
    model = transformer(folders["dev"])
    with graph_mode():
        losses, params = lora_training(model, "attn", batch(guidance=True), steps=4)
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    assert all(np.abs(p.asnumpy()).max() > 0 for p in params if "lora_B" in p.name)


def test_lora_on_every_block_linear_of_schnell_trains_in_pynative(folders):
    model = transformer(folders["schnell"])
    losses, params = lora_training(model, "kohya", batch(guidance=False), steps=2)
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    assert len(params) == 2 * 26


# ---------------------------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------------------------


def test_flux_pipeline_generates_on_cpu_and_a_lora_changes_the_image(folders):
    from mindone_lora_plugin.algorithms.lora import PlainLora
    from mindone_lora_plugin.architectures.flux import pipeline
    from mindone_lora_plugin.architectures.flux.targets import transformer_targets
    from mindone_lora_plugin.options import LoraOptions

    pipe = pipeline.load_pipeline(folders["dev"])
    assert pipeline.size_step(pipe) == 4
    first = pipeline.generate(pipe, "a photo of sks dog", steps=1, seed=3, height=32, width=32)
    again = pipeline.generate(pipe, "a photo of sks dog", steps=1, seed=3, height=32, width=32)  # reproducible
    assert len(first) == 1 and first[0].size == (32, 32)
    pixels = np.asarray(first[0], np.float32)
    assert pixels.std() > 0
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(first[0]))
    model = pipe.transformer
    PlainLora().add_adapters(model, transformer_targets(model, "attn", 4, 4.0), LoraOptions(rank=4))
    rng = np.random.default_rng(0)
    for p in model.trainable_params():
        if "lora_B" in p.name:
            p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)))
    live = pipeline.live_pipeline(model, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer,
                                  pipe.tokenizer_2, pipe.scheduler)
    adapted = pipeline.generate(live, "a photo of sks dog", steps=1, seed=3, height=32, width=32)
    assert np.abs(np.asarray(adapted[0], np.float32) - pixels).max() > 0
    with pytest.raises(LoraError, match="--height 30 must be a positive multiple of 4"):
        pipeline.generate(pipe, "x", steps=1, height=30, width=32)
