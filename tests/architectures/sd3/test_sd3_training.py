"""SD3 training on CPU: one shared ``mindone-lora train --demo sd3`` run (tiny SD3.5, every Linear of the joint
blocks, GRAPH_MODE) writes the diffusers and kohya layouts, which the demo loads back into fresh models with equal
outputs; the text conditioning equals ``StableDiffusion3Pipeline.encode_prompt``; the loss cell equals the numpy
formula of diffusers' train_dreambooth_lora_sd3.py on the real tiny transformer."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mindone_lora_plugin.architectures.sd3.tiny import ensure_tiny_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mindone_lora_plugin.cli import main

    root = tmp_path_factory.mktemp("sd3-demo")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = main(["train", "--demo", "sd3", "--max_train_steps", "4", "--checkpointing_steps", "0",
                     "--weighting_scheme", "mode", "--output_name", "sd3-demo"])
    finally:
        os.chdir(cwd)
    out = root / "demo-output" / "lora-sd3"
    return code, out, str(root / "demo-output" / "tiny-sd3")


@pytest.fixture
def pynative():
    import mindspore as ms

    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_demo_trains_and_writes_both_layouts_that_load_back(run):
    from mindone_lora_plugin import safetensors_io

    code, out, _ = run
    assert code == 0  # the demo returns 1 when a written file does not load back to the trained outputs
    diffusers, meta = safetensors_io.load(str(out / "pytorch_lora_weights.safetensors"))
    kohya, kmeta = safetensors_io.load(str(out / "sd3-demo.safetensors"))
    assert len(diffusers) == 2 * 29 and all(k.startswith("transformer.transformer_blocks.") for k in diffusers)
    assert all(k.startswith("lora_unet_joint_blocks_") for k in kohya)
    assert any(np.abs(v).max() > 0 for k, v in diffusers.items() if k.endswith("lora_B.weight"))  # it trained
    args = json.loads(kmeta["mindone_lora.training_args"])
    assert args["weighting_scheme"] == "mode" and args["lora_targets"] == "all-linear"
    assert kmeta["ss_base_model_version"] == "sd3" and meta["modelspec.architecture"].startswith("stable-diffusion-3.5")
    assert (out / "validation" / "final.png").is_file()


def test_text_conditioning_is_the_pipelines_encode_prompt(tmp_path, pynative):
    import mindspore as ms
    from mindone.diffusers import StableDiffusion3Pipeline

    from mindone_lora_plugin.architectures.sd3.loss import SD3TextConditioner

    pipe = StableDiffusion3Pipeline.from_pretrained(ensure_tiny_model("3.5", str(tmp_path / "tiny")))
    prompt = ["a red circle on a blue background"]
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                              max_sequence_length=pipe.tokenizer_3.model_max_length)

    def ids(tok):
        return ms.Tensor(tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                             return_tensors="np").input_ids.astype(np.int32))

    cond = SD3TextConditioner(pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3,
                              pipe.transformer.config.joint_attention_dim, 77)
    got_embeds, got_pooled = cond(ids(pipe.tokenizer), ids(pipe.tokenizer_2), ids(pipe.tokenizer_3))
    np.testing.assert_allclose(got_embeds.asnumpy(), embeds.asnumpy(), atol=1e-5)
    np.testing.assert_allclose(got_pooled.asnumpy(), pooled.asnumpy(), atol=1e-5)


def test_loss_cell_is_the_flow_matching_formula(tmp_path, pynative):
    import mindspore as ms

    from mindone_lora_plugin.architectures.sd3.loss import SD3FlowMatchLoss
    from mindone_lora_plugin.models import load_models

    models = load_models(ensure_tiny_model("3", str(tmp_path / "tiny3")))
    transformer = models["transformer"]
    rng = np.random.default_rng(0)
    latents, noise = (rng.standard_normal((2, 16, 16, 16)).astype(np.float32) for _ in range(2))
    sigmas, weights = np.array([0.3, 0.8], np.float32), np.array([0.09, 0.64], np.float32)
    embeds = rng.standard_normal((2, 5, 64)).astype(np.float32)
    pooled = rng.standard_normal((2, 32)).astype(np.float32)
    t = ms.Tensor
    got = float(SD3FlowMatchLoss(transformer)(t(latents), t(noise), t(sigmas), t(weights), t(embeds),
                                              t(pooled)).asnumpy())
    s = sigmas[:, None, None, None]
    noisy = (1 - s) * latents + s * noise
    pred = transformer(t(noisy), t(embeds), t(pooled), t(sigmas * 1000), return_dict=False)[0].asnumpy()
    # diffusers with precondition_outputs: (noisy - σ·pred - x0)² = σ²·(pred - (ε - x0))², σ² in the weights here
    want = np.mean(weights * ((pred - (noise - latents)) ** 2).reshape(2, -1).mean(axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    precond = ((noisy - s * pred - latents) ** 2).reshape(2, -1).mean(axis=1).mean()
    np.testing.assert_allclose(got, precond, rtol=1e-4)
