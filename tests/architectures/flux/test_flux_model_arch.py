"""FLUX.1 as an installed architecture: registration, folder detection, presets through the strategy, and one short
``mindone-lora train`` run on the tiny dev model (flow matching, both file layouts)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("mindspore")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> str:
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    from mindone_lora_plugin.architectures.flux.tiny import ensure_tiny_model

    return ensure_tiny_model("dev", str(tmp_path_factory.mktemp("flux") / "tiny-flux-dev"))


def test_flux_architecture_and_strategy_are_installed(plugin_manager):
    arch = plugin_manager.get_architecture("flux")
    assert arch.label == "FLUX.1" and arch.denoiser == "transformer" and arch.default_strategy == "flux"
    assert arch.component_names() == ("transformer", "text_encoder", "text_encoder_2")
    assert arch.text_encoders() == ("text_encoder", "text_encoder_2")
    assert arch.presets() == ("attn", "kohya")
    strategy = plugin_manager.strategies()["flux"]
    assert strategy.default_components == ("transformer",) and strategy.architectures == ("flux",)
    assert arch.kohya_prefix("text_encoder_2") == "lora_te3"


def test_tiny_folder_is_detected_as_flux_and_presets_cover_every_component(tiny_flux):
    from mindone.transformers import CLIPTextModel, T5EncoderModel

    from mindone_lora_plugin.architectures.flux.targets import targets
    from mindone_lora_plugin.base_model_info import BaseModelInfo

    assert BaseModelInfo.from_folder(tiny_flux).architecture == "flux"
    clip = CLIPTextModel.from_pretrained(tiny_flux, subfolder="text_encoder")
    t5 = T5EncoderModel.from_pretrained(tiny_flux, subfolder="text_encoder_2")
    assert len(targets("text_encoder", clip, "attn", 4, 4.0)) == 5 * 4  # 5 layers × q/k/v/out_proj
    assert len(targets("text_encoder", clip, "kohya", 4, 4.0)) == 5 * 6  # + fc1/fc2
    t5_attn = targets("text_encoder_2", t5, "attn", 4, 4.0)
    assert sorted(t5_attn)[:4] == [f"encoder.block.0.layer.0.SelfAttention.{n}" for n in "koqv"]
    t5_all = targets("text_encoder_2", t5, "kohya", 4, 4.0)
    assert len(t5_all) == 2 * (4 + 3)  # q/k/v/o + wi_0/wi_1/wo per block
    assert "encoder.block.1.layer.1.DenseReluDense.wi_1" in t5_all


@pytest.mark.slow
def test_train_on_tiny_flux_writes_both_layouts(tiny_flux, tmp_path):
    """One short GRAPH_MODE run through the CLI: logit-normal noise levels, guidance 3.5, attention LoRA; the kohya
    file names the original model's fused modules and ``inspect`` calls it FLUX.1."""
    from mindone_lora_plugin import safetensors_io
    from mindone_lora_plugin.cli import main
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    data = make_shapes_dataset(str(tmp_path / "data"), size=32, repeats=1)
    out = tmp_path / "out"
    code = main(["train", "--pretrained_model_name_or_path", tiny_flux, "--train_data_dir", data, "--resolution", "32",
                 "--max_train_steps", "3", "--train_batch_size", "2", "--output_dir", str(out), "--lora_rank", "4",
                 "--learning_rate", "1e-3", "--timestep_sampling", "logit_normal", "--guidance_scale", "3.5",
                 "--device_target", "CPU", "--report_to", "none"])
    assert code == 0
    kohya, _ = safetensors_io.load(str(out / "out.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in kohya
    peft, meta = safetensors_io.load(str(out / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("transformer.") for k in peft) and len(peft) == 2 * 14
    steps = [json.loads(line) for line in open(out / "train_log.jsonl") if '"step"' in line]
    losses = [s["loss"] for s in steps if s.get("event") == "step"]
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert main(["inspect", str(out / "out.safetensors")]) == 0
    assert os.path.isfile(out / "hparams.yml")

    # merge into a model folder: its transformer computes what the base model with the LoRA loaded computes
    import mindspore as ms

    from mindone_lora_plugin.demo.training import model_outputs
    from mindone_lora_plugin.models import load_models
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.plugins import get_plugin_manager

    assert main(["merge", "--model", tiny_flux, "--lora", str(out / "out.safetensors"), "--out",
                 str(tmp_path / "merged")]) == 0
    ms.set_context(mode=ms.PYNATIVE_MODE)
    with_lora = load_models(tiny_flux)
    get_plugin_manager().load_weights(with_lora, LoraOptions(strategy="flux", architecture="flux"),
                                      str(out / "out.safetensors"))
    expected, base = model_outputs(with_lora)["transformer"], model_outputs(load_models(tiny_flux))["transformer"]
    merged = model_outputs(load_models(str(tmp_path / "merged")))["transformer"]
    assert np.abs(expected - base).max() > 1e-4  # the LoRA changes the output
    np.testing.assert_allclose(merged, expected, atol=1e-5)


def test_flux_variants_with_other_inputs_are_refused_in_one_line(tiny_flux):
    """A transformer whose input is not 4 × the VAE's latent channels (FLUX.1 Fill/Depth/Canny/Kontext concatenate
    conditioning latents) is refused before training, naming the variant family."""
    import types

    import mindspore as ms

    from mindone_lora_plugin.errors import LoraError
    from mindone_lora_plugin.plugins import get_plugin_manager

    arch = get_plugin_manager().get_architecture("flux")
    fill = types.SimpleNamespace(config=types.SimpleNamespace(in_channels=384, guidance_embeds=True))
    args = types.SimpleNamespace(variant=None, discrete_flow_shift=None)
    with pytest.raises(LoraError, match=r"^this FLUX transformer takes 384 input channels, not 4 × the VAE's 16 "
                                        r"latent channels: FLUX.1 Fill/Depth/Canny/Kontext variants are not supported"):
        arch.load_training_parts(tiny_flux, args, {"transformer": fill}, ms.float32)
    models = {"transformer": types.SimpleNamespace(config=types.SimpleNamespace(in_channels=64, guidance_embeds=True))}
    args.discrete_flow_shift = 2.5
    parts = arch.load_training_parts(tiny_flux, args, models, ms.float32)
    assert parts.flow_shift == 2.5 and parts.guidance is True and parts.prediction_type == "flow_matching"
    assert [type(t).__name__ for t in parts.tokenizers] == ["CLIPTokenizer", "T5TokenizerFast"]
    args.discrete_flow_shift = None
    assert arch.load_training_parts(tiny_flux, args, models, ms.float32).flow_shift == 3.0  # the dev scheduler's
