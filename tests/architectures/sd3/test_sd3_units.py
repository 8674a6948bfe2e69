"""The SD3 family without training: folder and LoRA-file detection, the MMDiT ⇄ diffusers key table, kohya names and
the fused-qkv layout read back exactly, timestep sampling and loss weights against diffusers' formulas (numpy), and
the CPU backend's replacements SD3 needs (``mint.einsum``'s unpatchify, SD3.5's nine-way AdaLN) against numpy."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mindone_lora_plugin.architectures.base import FolderInfo
from mindone_lora_plugin.architectures.sd3 import keys
from mindone_lora_plugin.architectures.sd3.arch import variant
from mindone_lora_plugin.architectures.sd3.timesteps import loss_weights, sample_sigmas
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.state import LoraModule, LoraState

SD35_LARGE = {"_class_name": "SD3Transformer2DModel", "num_layers": 38, "qk_norm": "rms_norm",
              "dual_attention_layers": []}
SD35_MEDIUM = {"_class_name": "SD3Transformer2DModel", "num_layers": 24, "qk_norm": "rms_norm",
               "dual_attention_layers": list(range(13))}
SD3_MEDIUM = {"_class_name": "SD3Transformer2DModel", "num_layers": 24}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mindone_lora_plugin.architectures.sd3.tiny import ensure_tiny_model

    root = tmp_path_factory.mktemp("sd3-units")
    return {kind: ensure_tiny_model(kind, str(root / kind)) for kind in ("3", "3.5")}


def folder_info(path: str) -> FolderInfo:
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    configs = {}
    for sub in index:
        cfg = os.path.join(path, sub, "config.json")
        if os.path.isfile(cfg):
            with open(cfg) as f:
                configs[sub] = json.load(f)
    return FolderInfo(index, configs)


def test_folders_are_detected_as_sd3_with_their_variant(tiny):
    from mindone_lora_plugin.architectures import detect_folder

    for kind, want in (("3", "3-medium"), ("3.5", "3.5-medium")):
        info = folder_info(tiny[kind])
        assert detect_folder(info) == "sd3"
        assert variant(info.configs["transformer"]) == want
        assert set(info.configs) >= {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert [variant(c) for c in (SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE)] == ["3-medium", "3.5-medium", "3.5-large"]
    assert detect_folder(FolderInfo({"_class_name": "FluxPipeline"}, {"transformer": {
        "_class_name": "FluxTransformer2DModel"}})) == "flux"


def test_lora_files_are_detected_from_keys_or_metadata(plugin_manager):
    from mindone_lora_plugin.architectures import get_architecture

    sd3, flux = get_architecture("sd3"), get_architecture("flux")

    def evidence(names, metadata=None):
        found = {a.name: a.detect_lora(names, {}, metadata or {}) for a in (sd3, flux)}
        return {n: e.score for n, e in found.items() if e is not None}

    for names, meta in ((["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"], None),
                        (["transformer.transformer_blocks.0.attn2.to_q.lora_A.weight"], None),
                        (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
                         {"modelspec.architecture": "stable-diffusion-3.5-large/lora"})):
        scores = evidence(names, meta)
        assert scores["sd3"] > scores.get("flux", 0), (names, scores)
    assert "sd3" not in evidence(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
    assert "sd3" not in evidence(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
                                 {"modelspec.architecture": "flux-1-dev/lora"})
    # SDXL's second text encoder is a CLIP-G too: its kohya names are not SD3's
    assert "sd3" not in evidence(["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"])


def test_the_mmdit_table_round_trips_and_names_kohya_modules():
    for template, paths in keys.MMDIT_TO_DIFFUSERS.items():
        name = template.replace("{i}", "7")
        parts = keys.mmdit_parts(name)
        assert parts == tuple(p.replace("{i}", "7") for p in paths)
        for n, path in enumerate(parts):
            assert keys.mmdit_name(path) == (name, n, parts)
            assert keys.TRANSFORMER_PATH_RE.fullmatch(path) or path.startswith("transformer_blocks.7.attn2")
    assert keys.kohya_module_name("transformer", "transformer_blocks.3.attn.add_k_proj") == \
        "lora_unet_joint_blocks_3_context_block_attn_qkv"
    assert keys.kohya_module_name("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1") == \
        "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    assert keys.diffusers_path("text_encoder", "text_model_encoder_layers_0_self_attn_q_proj") == \
        "text_model.encoder.layers.0.self_attn.q_proj"
    assert keys.is_swapped("joint_blocks_1_context_block_adaLN_modulation_1", (64, 32))
    assert not keys.is_swapped("joint_blocks_0_context_block_adaLN_modulation_1", (192, 32))


def _module(rng, out, inp, rank, alpha):
    return LoraModule(rng.standard_normal((rank, inp)).astype(np.float32),
                      rng.standard_normal((out, rank)).astype(np.float32), alpha)


def test_kohya_layout_fuses_qkv_and_reads_back_exactly(tmp_path, plugin_manager):
    from mindone_lora_plugin.formats.kohya import KohyaFormat
    from mindone_lora_plugin.formats.reader import read_lora

    rng = np.random.default_rng(0)
    state = LoraState(architecture="sd3")
    for path in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_v_proj", "norm1_context.linear"):
        out = 64 if path == "norm1_context.linear" else 32  # the last block's context stream is pre-only: 2 × width
        state.add("transformer", f"transformer_blocks.1.{path}", _module(rng, out, 32, 2, 1.0))
    state.add("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj", _module(rng, 32, 32, 2, 3.0))
    path = str(tmp_path / "k.safetensors")
    KohyaFormat().write(state, path)
    from mindone_lora_plugin import safetensors_io

    tensors, _ = safetensors_io.load(path)
    up = tensors["lora_unet_joint_blocks_1_x_block_attn_qkv.lora_up.weight"]
    assert up.shape == (96, 6)  # q, k, v: ranks side by side, block-diagonal
    swapped = tensors["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight"]
    original = state.components["transformer"]["transformer_blocks.1.norm1_context.linear"].tensors["up"]
    np.testing.assert_array_equal(swapped, np.concatenate([original[32:], original[:32]]))
    back = read_lora(path)
    assert back.architecture == "sd3"
    assert {(c, p) for c, p, _ in back.modules()} == {(c, p) for c, p, _ in state.modules()}
    for comp, p, mod in state.modules():
        np.testing.assert_allclose(back.components[comp][p].delta(), mod.delta(), rtol=1e-6, atol=1e-6)


def test_an_sd3_lora_for_another_family_is_one_line(tmp_path, plugin_manager):
    from mindone_lora_plugin.base_model_info import BaseModelInfo
    from mindone_lora_plugin.formats.common import read_plain_lora
    from mindone_lora_plugin.formats.kohya import KohyaFormat

    state = LoraState(architecture="sd3")
    state.add("transformer", "transformer_blocks.0.attn.to_q", _module(np.random.default_rng(1), 32, 32, 2, 2.0))
    path = str(tmp_path / "sd3.safetensors")
    KohyaFormat().write(state, path)
    base = BaseModelInfo(architecture="sd1", base_config={}, modules={"unet": {}})
    with pytest.raises(LoraError, match=r"LoRA for SD3 .* base model is SD1") as e:
        read_plain_lora(path, base)
    assert "\n" not in str(e.value)


def test_sigmas_and_weights_follow_diffusers_formulas():
    n, shift = 4000, 3.0
    for scheme in ("logit_normal", "mode", "none"):
        got = sample_sigmas(np.random.default_rng(3), n, scheme, shift, 0.0, 1.0, 1.29)
        rng = np.random.default_rng(3)
        if scheme == "logit_normal":
            u = 1 / (1 + np.exp(-rng.normal(0.0, 1.0, n)))
        else:
            u = rng.random(n)
            if scheme == "mode":
                u = 1 - u - 1.29 * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
        t = np.linspace(1, 1000, 1000)[::-1] / 1000  # the scheduler's sigmas before the shift, high noise first
        want = shift * t / (1 + (shift - 1) * t)
        np.testing.assert_allclose(got, want[np.clip((u * 1000).astype(int), 0, 999)], rtol=1e-6)
    s = np.array([0.2, 0.5, 0.9], np.float32)
    np.testing.assert_allclose(loss_weights(s, "sigma_sqrt", False), s.astype(np.float64) ** -2, rtol=1e-6)
    np.testing.assert_allclose(loss_weights(s, "cosmap", False), 2 / (np.pi * (1 - 2 * s + 2 * s * s)), rtol=1e-6)
    np.testing.assert_allclose(loss_weights(s, "none", True), s.astype(np.float64) ** 2, rtol=1e-6)
    with pytest.raises(LoraError, match="weighting_scheme"):
        sample_sigmas(np.random.default_rng(0), 2, "bogus")


def test_cpu_einsum_and_sd35_adaln_match_numpy(tiny):
    import mindspore as ms
    from mindspore import mint

    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 2, 2, 5)).astype(np.float32)
    got = mint.einsum("nhwpqc->nchpwq", ms.Tensor(x)).asnumpy()
    np.testing.assert_array_equal(got, np.einsum("nhwpqc->nchpwq", x))

    from mindone.diffusers.models.normalization import SD35AdaLayerNormZeroX

    norm = SD35AdaLayerNormZeroX(8)
    h = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    emb = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    out = [o.asnumpy() for o in norm(ms.Tensor(h), emb=ms.Tensor(emb))]
    w, b = norm.linear.weight.asnumpy(), norm.linear.bias.asnumpy()
    mod = (emb / (1 + np.exp(-emb))) @ w.T + b
    pieces = np.split(mod, 9, axis=1)
    ln = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out[0], ln * (1 + pieces[1][:, None]) + pieces[0][:, None], atol=1e-5)
    np.testing.assert_allclose(out[5], ln * (1 + pieces[7][:, None]) + pieces[6][:, None], atol=1e-5)
    for i, k in ((1, 2), (2, 3), (3, 4), (4, 5), (6, 8)):
        np.testing.assert_allclose(out[i], pieces[k], atol=1e-6)


@pytest.mark.parametrize("key, component, name", [
    ("transformer.transformer_blocks.0.attn2.to_q.lora_A.weight", "transformer", "transformer_blocks.0.attn2.to_q"),
    ("base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight", "transformer", "transformer_blocks.0.attn.to_q"),
    ("lora_transformer_transformer_blocks_0_attn_to_out_0.lora_down.weight", "transformer",
     "transformer_blocks.0.attn.to_out.0"),
    ("diffusion_model.joint_blocks.1.context_block.attn.qkv.lora_up.weight", "transformer",
     "joint_blocks_1_context_block_attn_qkv"),
    ("lora_te3_encoder_block_0_layer_0_SelfAttention_q.alpha", "text_encoder_3",
     "encoder.block.0.layer.0.SelfAttention.q"),
    ("text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.lora_down.weight", "text_encoder_2",
     "text_model.encoder.layers.0.mlp.fc1"),
])
def test_every_naming_parses_to_its_module(key, component, name, plugin_manager):
    from mindone_lora_plugin.architectures.sd3.files import parse_key

    found = parse_key(key)
    assert (found.component, found.name) == (component, name)
    assert parse_key("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight") is None  # SD's UNet
