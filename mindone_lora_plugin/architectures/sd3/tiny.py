"""Tiny SD3 / SD3.5 pipelines, built from config in code.

They keep every module kind the real models have — joint (MMDiT) blocks with image and context attention
(``add_*_proj``, ``to_add_out``), AdaLN-Zero modulation, a last block whose context stream is pre-only, the 16-channel
VAE with SD3's scaling and shift factors, two CLIP text encoders with projections (CLIP-L, CLIP-G: pooled output and
penultimate hidden states) and a T5 encoder — at a few MiB. ``kind="3.5"`` adds SD3.5's RMS q/k norms and a dual
attention layer (``attn2``). Tokenizers are generated here (the CLIP BPE one of :mod:`mindone_lora_plugin.demo.tiny`
and the T5 Unigram one of the FLUX tiny model), so nothing is downloaded. Saved in the diffusers folder layout with
``StableDiffusion3Pipeline.save_pretrained``.

    python -m mindone_lora_plugin.architectures.sd3.tiny 3.5 ./tiny-sd3
"""

from __future__ import annotations

import os
import sys

from mindone_lora_plugin.demo import tiny as sd_tiny

LATENT_CHANNELS = 16
CLIP_L = dict(sd_tiny.CLIP, hidden_act="quick_gelu", projection_dim=16)
CLIP_G = dict(sd_tiny.CLIP, hidden_size=32, hidden_act="gelu", projection_dim=16, num_hidden_layers=3)
#: ``joint_attention_dim`` is T5's width (≥ the two CLIPs' widths side by side); ``pooled_projection_dim`` the two
#: CLIP projections side by side
T5 = dict(d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)
TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                   num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                   caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16)
VARIANTS = {"3": dict(), "3.5": dict(qk_norm="rms_norm", dual_attention_layers=(0,))}
#: SD3's VAE: 16 latent channels, scaling 1.5305 / shift 0.0609, no quant convs (two blocks: downsamples by 2)
VAE = dict(sd_tiny.VAE, latent_channels=LATENT_CHANNELS, scaling_factor=1.5305, shift_factor=0.0609,
           use_quant_conv=False, use_post_quant_conv=False)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
KINDS = tuple(VARIANTS)
SEED = 0
RESOLUTION = 32  # pixels: 16×16 latents, 8×8 = 64 image tokens


def build_pipeline(kind: str = "3.5", workdir: str | None = None):
    """Build a tiny ``StableDiffusion3Pipeline``: ``kind="3"`` (SD3 Medium layout) or ``"3.5"``."""
    import tempfile

    import mindspore as ms
    import numpy as np

    from mindone_lora_plugin.runtime import cpu
    from mindone_lora_plugin.runtime.process import quiet_mindone_imports

    quiet_mindone_imports()
    cpu.activate()  # on CPU: SD3's position table needs the backend's Arange
    from mindone import diffusers
    from mindone.transformers import CLIPTextModelWithProjection, T5EncoderModel
    from transformers import CLIPTextConfig, T5Config

    from mindone_lora_plugin.architectures.flux.tiny import t5_tokenizer

    if kind not in KINDS:
        raise ValueError(f"unknown tiny SD3 kind {kind!r}: choose one of {', '.join(KINDS)}")
    workdir = workdir or tempfile.mkdtemp(prefix="tiny-sd3-tokenizer-")
    tokenizer = sd_tiny.build_tokenizer(os.path.join(workdir, "tokenizer"))
    tokenizer_2 = sd_tiny.build_tokenizer(os.path.join(workdir, "tokenizer_2"))
    tokenizer_3 = t5_tokenizer()

    def seeded(offset, factory):
        ms.set_seed(SEED + offset)
        np.random.seed(SEED + offset)
        return factory()

    transformer = seeded(0, lambda: diffusers.SD3Transformer2DModel(**TRANSFORMER, **VARIANTS[kind]))
    vae = seeded(1, lambda: diffusers.AutoencoderKL(**VAE))
    te1 = seeded(2, lambda: CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer), **CLIP_L)))
    te2 = seeded(3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer_2), **CLIP_G)))
    te3 = seeded(4, lambda: T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), **T5)))
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
        text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2, tokenizer_2=tokenizer_2,
        text_encoder_3=te3, tokenizer_3=tokenizer_3)


def save_tiny_model(kind: str, folder: str) -> str:
    """Build the tiny ``kind`` SD3 pipeline and save it at ``folder`` in diffusers layout; return ``folder``."""
    from mindone_lora_plugin import safetensors_io

    sd_tiny.save_pipeline(lambda tmp: build_pipeline(kind, tmp), folder)
    path = os.path.join(folder, "text_encoder_3", "model.safetensors")
    tensors, metadata = safetensors_io.load(path)  # T5: store the tied token table under both names
    if "encoder.embed_tokens.weight" not in tensors:
        tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
        safetensors_io.save(tensors, path, metadata)
    return folder


def ensure_tiny_model(kind: str, folder: str) -> str:
    """Save the tiny SD3 model at ``folder`` unless a complete one is already there."""
    return sd_tiny.ensure_folder(folder, "transformer", lambda tmp: save_tiny_model(kind, tmp))


def probe_outputs(models) -> dict:
    """Fixed-input outputs of an SD3 model's transformer and text encoders (numpy): what the demo compares between
    the trained models and fresh ones with a saved file loaded."""
    import mindspore as ms
    import numpy as np

    from mindone_lora_plugin.architectures.sd3.loss import SD3TextConditioner

    transformer = models["transformer"]
    cfg = transformer.config
    ids = ms.Tensor(np.arange(8, dtype=np.int32)[None] + 3)
    embeds, pooled = SD3TextConditioner(models["text_encoder"], models["text_encoder_2"], models.get("text_encoder_3"),
                                        int(cfg.joint_attention_dim), 8)(ids, ids, ids)
    x = np.random.default_rng(123).standard_normal((1, cfg.in_channels, 16, 16)).astype(np.float32)
    out = transformer(ms.Tensor(x), embeds, pooled, ms.Tensor([500.0], ms.float32), return_dict=False)[0]
    return {"transformer": out.asnumpy(), "text": embeds.asnumpy(), "pooled": pooled.asnumpy()}


if __name__ == "__main__":  # pragma: no cover - a convenience for people
    if len(sys.argv) != 3 or sys.argv[1] not in KINDS:
        print("usage: python -m mindone_lora_plugin.architectures.sd3.tiny {3,3.5} OUTPUT_FOLDER", file=sys.stderr)
        raise SystemExit(2)
    print(ensure_tiny_model(sys.argv[1], sys.argv[2]))
