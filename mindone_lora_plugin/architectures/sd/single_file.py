"""SD1.x, SD2.x and SDXL single-file checkpoints (the original LDM/SGM layout A1111 and ComfyUI load): which family a
file is, from its keys, and the diffusers-layout folder it equals.

Keys: the UNet under ``model.diffusion_model.`` (SGM module names, mapped by :mod:`.sgm`), the VAE under
``first_stage_model.`` (``encoder.down.i.block.j`` ...), the text encoders under ``cond_stage_model.transformer.``
(SD1.x: transformers' CLIP names), ``cond_stage_model.model.`` (SD2.x: OpenCLIP) or ``conditioner.embedders.0.`` /
``.1.`` (SDXL: CLIP + OpenCLIP ViT-bigG). OpenCLIP's fused ``in_proj`` is split into q/k/v; its ``text_projection``
is transposed; VAE attention 1×1 convs become Linear weights. Every tensor is read from a memory map and written at
once, in its own dtype.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np

from mindone_lora_plugin.architectures.sd import sgm
from mindone_lora_plugin.errors import LoraError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_SD1 = "cond_stage_model.transformer."
OPENCLIP_SD2 = "cond_stage_model.model."
CLIP_XL = "conditioner.embedders.0.transformer."
OPENCLIP_XL = "conditioner.embedders.1.model."
REFINER = "conditioner.embedders.0.model."
_CROSS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
            "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def family(keys, header: dict, path: str) -> str | None:
    """``sd1``/``sd2``/``sdxl`` for an LDM checkpoint, None when the keys are no SD checkpoint's; an inpainting,
    instruct-pix2pix or SDXL refiner checkpoint is one :class:`LoraError` line."""
    keys = list(keys)
    if not any(k.startswith(UNET) for k in keys):
        return None
    conv_in = header.get(UNET + "input_blocks.0.0.weight", {}).get("shape", [0, 4])
    if conv_in[1] != 4:
        raise LoraError(f"{path} is an inpainting or instruct-pix2pix checkpoint (its UNet takes {conv_in[1]} input "
                        "channels, not 4): LoRA training needs the base text-to-image model; pass that instead")
    if any(k.startswith(REFINER) for k in keys):
        raise LoraError(f"{path} is an SDXL refiner checkpoint: LoRAs are trained on the SDXL base model; pass the "
                        "base checkpoint instead")
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith(OPENCLIP_SD2) for k in keys):
        return "sd2"
    if any(k.startswith(CLIP_SD1) for k in keys):
        return "sd1"
    for k in keys:
        if k.endswith("attn2.to_k.weight"):
            return _CROSS.get(int(header[k]["shape"][1]))
    return None


# ---------------------------------------------------------------------------------------------- key maps
# each map: diffusers name → (source key, transform); transform: None, "linear" (1×1 conv → Linear), "t"
# (transpose) or ("split", i, n) (the i-th of n equal parts along the first axis)

def unet_map(keys, layers_per_block: int) -> dict:
    out = {}
    for k in keys:
        if not k.startswith(UNET):
            continue
        module, _, param = k[len(UNET):].rpartition(".")
        try:
            out[f"{sgm.sgm_to_diffusers(module, layers_per_block)}.{param}"] = (k, None)
        except ValueError as e:
            raise LoraError(f"unexpected UNet key {k} in the checkpoint ({e}): not an SD checkpoint of the "
                            "family it looks like") from None
    return out


_VAE_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0", "norm": "group_norm"}
_VAE_RES = {"nin_shortcut": "conv_shortcut"}


def _vae_name(name: str, n_up: int) -> str:
    name = name.replace("norm_out.", "conv_norm_out.")
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_(\d)\.(\w+)\.(\w+)", name)
    if m:
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_VAE_RES.get(m[3], m[3])}.{m[4]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(\w+)", name)
    if m:
        return f"{m[1]}.mid_block.attentions.0.{_VAE_ATTN[m[2]]}.{m[3]}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)", name)
    if m:
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_VAE_RES.get(m[3], m[3])}.{m[4]}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(\w+)", name)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)", name)
    if m:
        return f"decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets.{m[2]}.{_VAE_RES.get(m[3], m[3])}.{m[4]}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(\w+)", name)
    if m:
        return f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    return name  # conv_in, conv_out, quant_conv, post_quant_conv


def vae_map(keys, prefix: str, n_up: int) -> dict:
    out = {}
    for k in keys:
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        if not name.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            continue
        new = _vae_name(name, n_up)
        out[new] = (k, "linear" if ".mid_block.attentions.0.to_" in new and new.endswith(".weight") else None)
    return out


def clip_map(keys, prefix: str) -> dict:
    return {k[len(prefix):]: (k, None) for k in keys if k.startswith(prefix + "text_model.")
            and not k.endswith("position_ids")}


_OPENCLIP = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def openclip_map(keys, prefix: str, layers: int, projection: bool) -> dict:
    out = {}
    tm = "text_model."
    for k in keys:
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        if name == "token_embedding.weight":
            out[tm + "embeddings.token_embedding.weight"] = (k, None)
        elif name == "positional_embedding":
            out[tm + "embeddings.position_embedding.weight"] = (k, None)
        elif name.startswith("ln_final."):
            out[tm + "final_layer_norm." + name.split(".")[-1]] = (k, None)
        elif name == "text_projection" and projection:
            out["text_projection.weight"] = (k, "t")
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(\w+)", name)
        if not m or int(m[1]) >= layers:
            continue
        layer = f"{tm}encoder.layers.{m[1]}."
        if m[2] == "attn" and m[3] in ("in_proj_weight", "in_proj_bias"):
            param = "weight" if m[3].endswith("weight") else "bias"
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{layer}self_attn.{proj}.{param}"] = (k, ("split", i, 3))
        elif m[2] in _OPENCLIP:
            out[f"{layer}{_OPENCLIP[m[2]]}.{m[3]}"] = (k, None)
    return out


# ---------------------------------------------------------------------------------------------- writing

def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_folder(arch, path: str, header: dict, out: str, vae: str | None, config: str | None) -> None:
    """Write the diffusers-layout folder of the SD checkpoint ``path`` (of ``arch``'s family) into ``out``."""
    if not config:
        raise LoraError(f"{path} is a {arch.label} single-file checkpoint: its tokenizers are not in the file, so give "
                        "the diffusers-layout folder of its base model (configs and tokenizers; weights unused) with "
                        "--model_config FOLDER")
    if not os.path.isfile(os.path.join(config, "model_index.json")):
        raise LoraError(f"--model_config {config} is not a diffusers-layout model folder (no model_index.json)")
    _copy_configs(config, out)
    keys = [k for k in header if k != "__metadata__"]
    _check_config(path, header, keys, out, config)
    maps = adapted_maps(arch, keys, out)
    n_up = len(_read_json(os.path.join(out, "vae", "config.json"))["block_out_channels"])
    if vae:
        _write_vae_file(vae, out, n_up)
    else:
        maps["vae"] = vae_map(keys, VAE, n_up)
    for comp, mapping in maps.items():
        if not mapping:
            raise LoraError(f"{path} has no {comp} weights: pass a full {arch.label} checkpoint (UNet, VAE and text "
                            "encoders in one file)")
        write_component(path, header, mapping, os.path.join(out, comp, _WEIGHTS[comp]))


def adapted_maps(arch, keys, folder: str) -> dict[str, dict]:
    """The key maps (diffusers name → (source key, transform)) of the UNet and text encoders of an ``arch``
    checkpoint with ``keys``, given the configs in the diffusers-layout ``folder``."""
    unet_cfg = _read_json(os.path.join(folder, "unet", "config.json"))
    maps = {"unet": unet_map(keys, int(unet_cfg.get("layers_per_block", 2)))}
    out = folder
    te_layers = {c: _read_json(os.path.join(out, c, "config.json"))["num_hidden_layers"]
                 for c in arch.text_encoders() if os.path.isfile(os.path.join(out, c, "config.json"))}
    if arch.name == "sdxl":
        maps["text_encoder"] = clip_map(keys, CLIP_XL)
        maps["text_encoder_2"] = openclip_map(keys, OPENCLIP_XL, te_layers.get("text_encoder_2", 0), True)
    elif arch.name == "sd2":
        maps["text_encoder"] = openclip_map(keys, OPENCLIP_SD2, te_layers.get("text_encoder", 0), False)
    else:
        maps["text_encoder"] = clip_map(keys, CLIP_SD1)
    return maps


def _check_config(path: str, header: dict, keys, out: str, config: str) -> None:
    """The UNet config of ``--model_config`` against the file's UNet widths: one line when they do not fit."""
    try:
        unet = _read_json(os.path.join(out, "unet", "config.json"))
    except (OSError, ValueError):
        raise LoraError(f"--model_config {config} has no readable unet/config.json: give the diffusers-layout folder "
                        "of the checkpoint's base model") from None
    cross = next((header[k]["shape"][1] for k in keys if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    width = header.get(UNET + "input_blocks.0.0.weight", {}).get("shape", [None])[0]
    for what, in_file, in_config in (("cross-attention width", cross, unet.get("cross_attention_dim")),
                                     ("first block width", width, (unet.get("block_out_channels") or [None])[0])):
        if in_file is not None and in_config is not None and int(in_file) != int(in_config):
            raise LoraError(f"--model_config {config} does not fit {path}: its UNet's {what} is {in_config}, the "
                            f"file's {in_file}; give the diffusers-layout folder of the checkpoint's base model")


def _copy_configs(config: str, out: str) -> None:
    for root, dirs, files in os.walk(config):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(root, config)
        os.makedirs(os.path.join(out, rel), exist_ok=True)
        for name in files:
            if name.endswith((".json", ".txt", ".model")) and not name.endswith(".index.json"):
                shutil.copyfile(os.path.join(root, name), os.path.join(out, rel, name))


def _write_vae_file(vae: str, out: str, n_up: int) -> None:
    from mindone_lora_plugin.safetensors_io import read_header

    header, _ = read_header(vae)
    keys = [k for k in header if k != "__metadata__"]
    if any(".down_blocks." in k for k in keys):  # already in the diffusers layout
        mapping = {k: (k, None) for k in keys}
    else:
        mapping = vae_map(keys, VAE if any(k.startswith(VAE) for k in keys) else "", n_up)
    if not mapping:
        raise LoraError(f"--vae {vae} holds no VAE weights (no encoder./decoder. keys)")
    write_component(vae, header, mapping, os.path.join(out, "vae", _WEIGHTS["vae"]))


def write_component(path: str, header: dict, mapping: dict, dst: str) -> None:
    """Write ``mapping``'s tensors (see the key maps) from the safetensors file ``path`` into ``dst``, one at a time
    from a memory map."""
    from mindone_lora_plugin.dtypes import from_code
    from mindone_lora_plugin.safetensors_io import StreamWriter, as_bytes, read_header

    _, offset = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")

    def tensor(name):
        key, how = mapping[name]
        info = header[key]
        begin, end = info["data_offsets"]
        arr = data[offset + begin: offset + end].view(from_code(info["dtype"])).reshape(info["shape"])
        if how == "linear":
            return arr.reshape(arr.shape[:2])
        if how == "t":
            return arr.T
        if how is not None:
            part = arr.shape[0] // how[2]
            return arr[how[1] * part:(how[1] + 1) * part]
        return arr

    entries = []
    for name in sorted(mapping):
        shape = tuple(int(s) for s in np.shape(tensor(name)))
        code = header[mapping[name][0]]["dtype"]
        entries.append((name, code, shape, int(np.prod(shape, dtype=np.int64)) * from_code(code).itemsize))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with StreamWriter(dst, entries, {"format": "pt"}) as w:
        for name, *_ in entries:
            w.write(as_bytes(tensor(name)))
