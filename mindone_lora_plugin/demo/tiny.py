"""What every family's tiny models share (SD's: :mod:`.architectures.sd.tiny`, FLUX.1's:
:mod:`.architectures.flux.tiny`): the generated CLIP BPE tokenizer (nothing is downloaded), the tiny VAE and CLIP
configs, the fixed seed, and saving a pipeline into a model folder in the diffusers layout (text encoders under the
transformers names), atomically. Building the same model twice gives byte-identical weight files.
"""

from __future__ import annotations

import json
import os

# Words the generated tokenizer knows as whole tokens (everything else falls back to characters).
WORDS = ("a", "an", "photo", "picture", "of", "the", "and", "on", "in", "with", "background", "shape", "toy",
         "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "circle", "square", "triangle",
         "cross", "dog", "cat", "sks", "small", "big")

VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
           norm_num_groups=32, sample_size=32, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
           up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
            max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0,
            eos_token_id=1, pad_token_id=1)
SEED = 0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
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


def save_pipeline(build, folder: str) -> str:
    """Save the pipeline ``build(workdir)`` makes at ``folder`` (its text encoders' weights under the transformers
    names mindone and HF load); return ``folder``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pipe = build(tmp)
        pipe.save_pretrained(folder)
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3"):
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


