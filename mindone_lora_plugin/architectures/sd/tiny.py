"""Tiny SD1.x and SDXL pipelines, built from config with fixed seeds (the embedded default and the test fixtures).

They keep every module kind a real model has (ResNet blocks with 3×3 and 1×1 convs, down/upsamplers, transformer
blocks with self/cross attention and GEGLU feed-forward, CLIP text encoders, a VAE), but are small enough to train on
a laptop CPU. They are saved in the diffusers folder layout with ``save_pretrained``, so tiny and real models go
through the same ``from_pretrained`` path (the shared parts: :mod:`mindone_lora_plugin.demo.tiny`).

    python -m mindone_lora_plugin.architectures.sd.tiny sd1 ./tiny-sd1
"""

from __future__ import annotations

import os
import sys

from mindone_lora_plugin.demo.tiny import CLIP, SEED, VAE, build_tokenizer, ensure_folder, save_pipeline

SD1_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
SDXL_UNET = dict(SD1_UNET, cross_attention_dim=64, transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=80)  # 6 time ids × 8 + pooled text embedding (32)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
RESOLUTION = 32  # pixels; the VAE downsamples by 2, so latents are 16×16


def build_pipeline(kind: str = "sd1", workdir: str | None = None):
    """Build a tiny ``StableDiffusionPipeline`` (``kind="sd1"``) or ``StableDiffusionXLPipeline`` (``"sdxl"``)."""
    import tempfile

    import mindspore as ms
    import numpy as np

    from mindone_lora_plugin.runtime.process import quiet_mindone_imports

    quiet_mindone_imports()
    from mindone.diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from mindone.transformers import CLIPTextModel, CLIPTextModelWithProjection
    from transformers import CLIPTextConfig

    if kind not in ("sd1", "sdxl"):
        raise ValueError(f"unknown tiny model kind {kind!r}: choose sd1 or sdxl")
    workdir = workdir or tempfile.mkdtemp(prefix="tiny-tokenizer-")
    tokenizer = build_tokenizer(os.path.join(workdir, "tokenizer"))
    te_config = CLIPTextConfig(vocab_size=len(tokenizer), **CLIP)

    def seeded(offset, factory):
        ms.set_seed(SEED + offset)
        np.random.seed(SEED + offset)
        return factory()

    vae = seeded(1, lambda: AutoencoderKL(**VAE))
    scheduler = DDIMScheduler(**SCHEDULER)
    if kind == "sd1":
        unet = seeded(0, lambda: UNet2DConditionModel(**SD1_UNET))
        text_encoder = seeded(2, lambda: CLIPTextModel(te_config))
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    unet = seeded(0, lambda: UNet2DConditionModel(**SDXL_UNET))
    text_encoder = seeded(2, lambda: CLIPTextModel(te_config))
    text_encoder_2 = seeded(3, lambda: CLIPTextModelWithProjection(te_config))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)


def save_tiny_model(kind: str, folder: str) -> str:
    """Build the tiny ``kind`` pipeline and save it at ``folder`` in diffusers layout; return ``folder``."""
    return save_pipeline(lambda tmp: build_pipeline(kind, tmp), folder)


def ensure_tiny_model(kind: str, folder: str) -> str:
    """Save the tiny model at ``folder`` unless a complete one is already there."""
    return ensure_folder(folder, "unet", lambda tmp: save_tiny_model(kind, tmp))


if __name__ == "__main__":  # pragma: no cover - a convenience for people
    if len(sys.argv) != 3 or sys.argv[1] not in ("sd1", "sdxl"):
        print("usage: python -m mindone_lora_plugin.architectures.sd.tiny {sd1,sdxl} OUTPUT_FOLDER", file=sys.stderr)
        raise SystemExit(2)
    print(ensure_tiny_model(sys.argv[1], sys.argv[2]))
