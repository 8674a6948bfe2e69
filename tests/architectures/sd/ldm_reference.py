"""A test-only reference writer: a diffusers-layout SD folder → one single-file checkpoint in the original LDM layout.

It follows the tables of Hugging Face diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``
(generalised to any number of blocks and ``layers_per_block``, so the tiny models fit) and writes with
``safetensors.numpy``; the tests check it against diffusers' own LDM → diffusers converters (torch), so the files the
package reads are made by the reference mapping, never by the package.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file, save_file

UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def config(folder: str, comp: str) -> dict:
    with open(os.path.join(folder, comp, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def weights(folder: str, comp: str) -> dict:
    name = "model.safetensors" if comp.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
    return load_file(os.path.join(folder, comp, name))


def _rename(key: str, prefixes) -> str:
    for hf, ldm in prefixes:
        if key.startswith(hf):
            return ldm + key[len(hf):]
    return key


def ldm_unet(sd: dict, cfg: dict) -> dict:
    L, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    down_attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    pre = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
           ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
           ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
           ("mid_block.attentions.0.", "middle_block.1.")]
    pre += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    for i in range(n):
        for j in range(L):
            pre.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.0."))
            if down_attn[i]:
                pre.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.1."))
        for j in range(L + 1):
            pre.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(L + 1) * i + j}.0."))
            if up_attn[i]:
                pre.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(L + 1) * i + j}.1."))
        if i < n - 1:
            pre.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(L + 1) * (i + 1)}.0.op."))
            pre.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(L + 1) * i + L}.{2 if up_attn[i] else 1}."))
    out = {}
    for k, v in sd.items():
        new = k
        if "resnets" in k:
            for hf, ldm in _RESNET:
                new = new.replace(hf, ldm)
        out[UNET + _rename(new, pre)] = v
    return out


def ldm_vae(sd: dict, cfg: dict) -> dict:
    L, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    pre = []
    for side in ("encoder", "decoder"):
        pre += [(f"{side}.conv_norm_out.", f"{side}.norm_out."),
                (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.")]
        pre += [(f"{side}.mid_block.resnets.{j}.", f"{side}.mid.block_{j + 1}.") for j in range(2)]
    for i in range(n):
        pre += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(L)]
        pre += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.") for j in range(L + 1)]
        if i < n - 1:
            pre += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                    (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    out = {}
    for k, v in sd.items():
        new = _rename(k, pre).replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            for hf, ldm in _VAE_ATTN:
                new = new.replace("attn_1." + hf, "attn_1." + ldm)
            if new.endswith(".weight") and v.ndim == 2:
                v = v.reshape(*v.shape, 1, 1)
        out[VAE + new] = v
    return out


def write_ldm_sd1(folder: str, path: str, dtype=None) -> str:
    """The single-file SD1.x checkpoint of the diffusers folder ``folder`` (``dtype``: cast every tensor)."""
    sd = ldm_unet(weights(folder, "unet"), config(folder, "unet"))
    sd.update(ldm_vae(weights(folder, "vae"), config(folder, "vae")))
    sd.update({CLIP + k: v for k, v in weights(folder, "text_encoder").items()})
    if dtype is not None:
        sd = {k: v.astype(dtype) for k, v in sd.items()}
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
    return path


OPENCLIP_XL, CLIP_XL = "conditioner.embedders.1.model.", "conditioner.embedders.0.transformer."
_OPENCLIP = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("self_attn.out_proj.", "attn.out_proj."),
             ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))


def open_clip(sd: dict, prefix: str) -> dict:
    """A transformers CLIP text model (with projection) in OpenCLIP's names: q/k/v fused into ``in_proj``, the
    projection transposed."""
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"]}
    for p in ("weight", "bias"):
        out[f"{prefix}ln_final.{p}"] = sd[f"text_model.final_layer_norm.{p}"]
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = np.ascontiguousarray(sd["text_projection.weight"].T)
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = np.concatenate([sd[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"])
        for k, v in sd.items():
            if k.startswith(src) and "_proj." not in k.replace("out_proj.", ""):
                out[dst + _rename(k[len(src):], _OPENCLIP)] = v
    return out


def write_ldm_sdxl(folder: str, path: str) -> str:
    """The single-file SDXL checkpoint of the diffusers folder ``folder``."""
    sd = ldm_unet(weights(folder, "unet"), config(folder, "unet"))
    sd.update(ldm_vae(weights(folder, "vae"), config(folder, "vae")))
    sd.update({CLIP_XL + k: v for k, v in weights(folder, "text_encoder").items()})
    sd.update(open_clip(weights(folder, "text_encoder_2"), OPENCLIP_XL))
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
    return path
