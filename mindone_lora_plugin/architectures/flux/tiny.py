"""Tiny FLUX.1 pipelines (dev layout with a guidance embedding, schnell layout without), built from config in code.

They keep every module kind the real FLUX.1 has — double-stream blocks (image and text attention with ``add_*_proj``,
RMS q/k norms, rotary position embeddings over 3 axes), single-stream blocks (``proj_mlp``/``proj_out``), AdaLN
modulation, a 16-channel VAE with FLUX's scaling and shift factors and no quant convs, a CLIP text encoder (pooled
output) and a T5 encoder — at a few MiB. Tokenizers are generated here: the CLIP BPE one of :mod:`mindone_lora_plugin.
tiny`, and a T5-style Unigram (sentencepiece "▁" word boundaries) one. Saved in the diffusers folder layout with
``FluxPipeline.save_pretrained``, so they load like a downloaded FLUX.1 folder.

    python -m mindone_lora_plugin.architectures.flux.tiny dev ./tiny-flux-dev
"""

from __future__ import annotations

import os
import sys

from mindone_lora_plugin.demo import tiny as sd_tiny

LATENT_CHANNELS = 16
#: ``in_channels`` is 16 latent channels × a 2×2 patch; the rotary axes (4+6+6) add up to the head dim (16)
TRANSFORMER = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=2,
                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=(4, 6, 6))
#: FLUX.1's VAE: 16 latent channels, scaling 0.3611 / shift 0.1159, no quant convs (two blocks: downsamples by 2)
VAE = dict(sd_tiny.VAE, latent_channels=LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False)
T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)
#: FLUX.1's scheduler config (dev: resolution-dependent shift; schnell: a fixed shift of 1)
SCHEDULER = {"dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                         max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
             "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)}
T5_MAX_LENGTH = 32  # the tokenizer's model_max_length (FLUX.1 uses 512 for dev, 256 for schnell)
KINDS = ("dev", "schnell")
SEED = 0
RESOLUTION = 32  # pixels: 16×16 latents, 8×8 = 64 packed image tokens


def t5_tokenizer(folder: str | None = None):
    """A ``T5TokenizerFast`` on a generated Unigram vocabulary (``<pad>``, ``</s>``, ``<unk>``, the WORDS with and
    without the "▁" word-start mark, every printable ASCII character); saved into ``folder`` when given."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in sd_tiny.WORDS] + [(w, -1.5) for w in sd_tiny.WORDS]
    pieces += [(chr(c), -5.0) for c in range(33, 127) if chr(c) not in dict(pieces)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.Replace("  ", " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                          extra_ids=0, model_max_length=T5_MAX_LENGTH)
    if folder:
        tok.save_pretrained(folder)
    return tok


def build_pipeline(kind: str = "dev", workdir: str | None = None):
    """Build a tiny ``FluxPipeline``: ``kind="dev"`` (guidance embedding) or ``"schnell"`` (none)."""
    import tempfile

    import mindspore as ms
    import numpy as np

    from mindone_lora_plugin.runtime.process import quiet_mindone_imports

    quiet_mindone_imports()
    from mindone.diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from mindone.transformers import CLIPTextModel, T5EncoderModel
    from transformers import CLIPTextConfig, T5Config

    if kind not in KINDS:
        raise ValueError(f"unknown tiny FLUX kind {kind!r}: choose dev or schnell")
    workdir = workdir or tempfile.mkdtemp(prefix="tiny-flux-tokenizer-")
    tokenizer = sd_tiny.build_tokenizer(os.path.join(workdir, "tokenizer"))
    tokenizer_2 = t5_tokenizer()

    def seeded(offset, factory):
        ms.set_seed(SEED + offset)
        np.random.seed(SEED + offset)
        return factory()

    transformer = seeded(0, lambda: FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=kind == "dev"))
    vae = seeded(1, lambda: AutoencoderKL(**VAE))
    text_encoder = seeded(2, lambda: CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **sd_tiny.CLIP)))
    text_encoder_2 = seeded(3, lambda: T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **T5)))
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER[kind])
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def save_tiny_model(kind: str, folder: str) -> str:
    """Build the tiny ``kind`` FLUX pipeline and save it at ``folder`` in diffusers layout; return ``folder``."""
    sd_tiny.save_pipeline(lambda tmp: build_pipeline(kind, tmp), folder)
    _untie_t5_embeddings(os.path.join(folder, "text_encoder_2", "model.safetensors"))
    return folder


def _untie_t5_embeddings(path: str) -> None:
    """Store T5's token table under ``encoder.embed_tokens.weight`` too (``save_pretrained`` keeps only the tied
    ``shared.weight``, and mindone's T5EncoderModel loader would then initialise ``embed_tokens`` at random)."""
    from mindone_lora_plugin import safetensors_io

    tensors, metadata = safetensors_io.load(path)
    if "encoder.embed_tokens.weight" not in tensors:
        tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
        safetensors_io.save(tensors, path, metadata)


def ensure_tiny_model(kind: str, folder: str) -> str:
    """Save the tiny FLUX model at ``folder`` unless a complete one is already there."""
    from mindone_lora_plugin.demo.tiny import ensure_folder

    return ensure_folder(folder, "transformer", lambda tmp: save_tiny_model(kind, tmp))


if __name__ == "__main__":  # pragma: no cover - a convenience for people
    if len(sys.argv) != 3 or sys.argv[1] not in KINDS:
        print("usage: python -m mindone_lora_plugin.architectures.flux.tiny {dev,schnell} OUTPUT_FOLDER",
              file=sys.stderr)
        raise SystemExit(2)
    print(ensure_tiny_model(sys.argv[1], sys.argv[2]))
