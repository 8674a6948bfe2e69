"""Tiny SD1.x and SDXL pipelines, built from config with fixed seeds (the embedded default and the test fixtures).

They keep every module kind a real model has (ResNet blocks with 3×3 and 1×1 convs, down/upsamplers, transformer
blocks with self/cross attention and GEGLU feed-forward, CLIP text encoders, a VAE), but are small enough to train on
a laptop CPU. They are saved in the diffusers folder layout with ``save_pretrained``, so tiny and real models go
through the same ``from_pretrained`` path. Nothing is downloaded: the CLIP BPE tokenizer's vocabulary and merges are
generated here. Building the same model twice gives byte-identical weight files.

    python -m mindone_lora_plugin.tiny sd1 ./tiny-sd1
"""

from __future__ import annotations

import json
import os
import sys

# Words the generated tokenizer knows as whole tokens (everything else falls back to characters).
WORDS = ("a", "an", "photo", "picture", "of", "the", "and", "on", "in", "with", "background", "shape", "toy",
         "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "circle", "square", "triangle",
         "cross", "dog", "cat", "sks", "small", "big")

SD1_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
SDXL_UNET = dict(SD1_UNET, cross_attention_dim=64, transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=80)  # 6 time ids × 8 + pooled text embedding (32)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
           norm_num_groups=32, sample_size=32, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
           up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4, max_position_embeddings=77,
            layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0, eos_token_id=1,
            pad_token_id=1)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
SEED = 0
RESOLUTION = 32  # pixels; the VAE downsamples by 2, so latents are 16×16


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """Generate a CLIP BPE vocabulary and merge list: every byte, every byte at a word end, and :data:`WORDS`."""
    symbols = list(_bytes_to_unicode().values())
    vocab_list = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for nxt in parts[1:]:
            merge = f"{current} {nxt}"
            current = current + nxt
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(current)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return vocab, merges


def build_tokenizer(folder: str):
    """Write the generated vocab/merges into ``folder`` and load a real ``transformers.CLIPTokenizer`` from them."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab, merges = tokenizer_files()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=0, sort_keys=True)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=CLIP["max_position_embeddings"], pad_token="<|endoftext|>")


def build_pipeline(kind: str = "sd1", workdir: str | None = None):
    """Build a tiny ``StableDiffusionPipeline`` (``kind="sd1"``) or ``StableDiffusionXLPipeline`` (``"sdxl"``)."""
    import tempfile

    import mindspore as ms
    import numpy as np

    from mindone_lora_plugin.runtime import quiet_mindone_imports

    quiet_mindone_imports()
    from mindone.diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                                   StableDiffusionXLPipeline, UNet2DConditionModel)
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


def save_pipeline(build, folder: str) -> str:
    """Save the pipeline ``build(workdir)`` makes at ``folder`` (its text encoders' weights under the transformers
    names mindone and HF load); return ``folder``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pipe = build(tmp)
        pipe.save_pretrained(folder)
    for sub in ("text_encoder", "text_encoder_2"):
        path = os.path.join(folder, sub, "model.safetensors")
        if os.path.isfile(path):
            _to_transformers_names(path)
    return folder


# mindone.transformers saves MindSpore parameter names; Hugging Face checkpoints (what users download) use torch names.
_MS_TO_TORCH_SUFFIXES = ((".embedding_table", ".weight"), (".gamma", ".weight"), (".beta", ".bias"))


def _to_transformers_names(path: str) -> None:
    """Rename a saved CLIP checkpoint's tensors to Hugging Face names, so tiny folders look like real ones (mindone
    and transformers both load those)."""
    from mindone_lora_plugin import safetensors_io

    tensors, metadata = safetensors_io.load(path)
    renamed = {}
    for key, value in tensors.items():
        for old, new in _MS_TO_TORCH_SUFFIXES:
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        renamed[key] = value
    safetensors_io.save(renamed, path, dict(metadata, format="pt"))


def ensure_tiny_model(kind: str, folder: str) -> str:
    """Save the tiny model at ``folder`` unless a complete one is already there."""
    return ensure_folder(folder, "unet", lambda tmp: save_tiny_model(kind, tmp))


def ensure_folder(folder: str, denoiser: str, save) -> str:
    """A tiny model folder, built by ``save(tmp)`` into a temporary folder and renamed into place unless
    ``folder`` already holds a complete one (its ``model_index.json`` and the ``denoiser``'s weights)."""
    import shutil

    if os.path.isfile(os.path.join(folder, "model_index.json")) and os.path.isfile(
            os.path.join(folder, denoiser, "diffusion_pytorch_model.safetensors")):
        return folder
    tmp = folder.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


if __name__ == "__main__":  # pragma: no cover - a convenience for people
    if len(sys.argv) != 3 or sys.argv[1] not in ("sd1", "sdxl"):
        print("usage: python -m mindone_lora_plugin.tiny {sd1,sdxl} OUTPUT_FOLDER", file=sys.stderr)
        raise SystemExit(2)
    print(ensure_tiny_model(sys.argv[1], sys.argv[2]))
