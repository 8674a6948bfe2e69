"""Shared by the interop tests of this folder (torch, diffusers, peft, LyCORIS beside mindone): the model outputs
compared on both sides, the torch pipelines, the reference merges. torch and the Hugging Face packages are imported
only inside these helpers, so the folder's other tests run without them."""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import numpy as np
import pytest

TOL = 1e-4
MOVES = 100 * TOL  # how far each output must move when the LoRA is loaded
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
IDS = [[0, 5, 9, 12, 20, 33, 47, 1]]  # bos … eos (the pooled/projected output reads the eos position)
TIME_IDS = [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
STD = 0.15  # of the random LoRA weights: outputs move by O(0.1–1), not by orders of magnitude


@pytest.fixture(scope="module")
def torch_runtime():
    """MindSpore PyNative on the CPU backend, torch seeded, Hugging Face's progress bars and logs quiet (a module's
    tests, with ``pytest.mark.usefixtures``)."""
    import torch
    from diffusers.utils import logging as hf_logging

    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    torch.manual_seed(0)
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(verbosity)
    hf_logging.enable_progress_bar()


def unet_inputs(cfg) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(123)
    size = cfg["sample_size"]
    out = {"sample": rng.standard_normal((1, cfg["in_channels"], size, size)).astype(np.float32),
           "encoder_hidden_states": rng.standard_normal((1, 8, cfg["cross_attention_dim"])).astype(np.float32)}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        out["text_embeds"] = rng.standard_normal((1, pooled)).astype(np.float32)
        out["time_ids"] = np.asarray(TIME_IDS, np.float32)
    return out


def mindone_outputs(models) -> dict[str, np.ndarray]:
    import mindspore as ms

    out = {}
    ids = ms.Tensor(np.asarray(IDS, np.int32))
    for comp in TEXT_ENCODERS:
        if comp in models:
            res = models[comp](ids, output_hidden_states=True, return_dict=False)  # mindone's CLIP returns tuples
            out[f"{comp}.first"] = res[0].asnumpy()
            out[f"{comp}.hidden_states"] = np.stack([h.asnumpy() for h in res[-1]])
    unet = models["unet"]
    x = unet_inputs(dict(unet.config))
    kw = {}
    if "text_embeds" in x:
        kw["added_cond_kwargs"] = {"text_embeds": ms.Tensor(x["text_embeds"]), "time_ids": ms.Tensor(x["time_ids"])}
    out["unet"] = unet(ms.Tensor(x["sample"]), ms.Tensor([500], ms.int32),
                       encoder_hidden_states=ms.Tensor(x["encoder_hidden_states"]), return_dict=False,
                       **kw)[0].asnumpy()
    return out


def torch_components(pipe) -> dict:
    return {c: getattr(pipe, c) for c in ("unet",) + TEXT_ENCODERS if getattr(pipe, c, None) is not None}


def torch_outputs(pipe) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        return _torch_outputs(torch, pipe)


def _torch_outputs(torch, pipe) -> dict[str, np.ndarray]:
    out = {}
    comps = torch_components(pipe)
    ids = torch.tensor(IDS, dtype=torch.long)
    for comp in TEXT_ENCODERS:
        if comp in comps:
            res = comps[comp](ids, output_hidden_states=True, return_dict=True)
            first = res.text_embeds if comp == "text_encoder_2" else res.last_hidden_state
            out[f"{comp}.first"] = first.numpy()
            out[f"{comp}.hidden_states"] = np.stack([h.numpy() for h in res.hidden_states])
    unet = comps["unet"]
    x = {k: torch.from_numpy(v) for k, v in unet_inputs(dict(unet.config)).items()}
    kw = {}
    if "text_embeds" in x:
        kw["added_cond_kwargs"] = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    out["unet"] = unet(x["sample"], torch.tensor([500]), encoder_hidden_states=x["encoder_hidden_states"],
                       return_dict=False, **kw)[0].numpy()
    return out


def torch_pipeline(arch: str, folder: str):
    import diffusers

    if arch == "sdxl":
        return diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                            requires_safety_checker=False)


def assert_outputs_match(got: dict, want: dict, base: dict, what: str) -> dict[str, float]:
    assert set(got) == set(want), (sorted(got), sorted(want))
    diffs = {}
    for key in sorted(want):
        assert got[key].shape == want[key].shape, (what, key, got[key].shape, want[key].shape)
        diffs[key] = float(np.abs(got[key] - want[key]).max())
        moved = float(np.abs(want[key] - base[key]).max())
        assert moved > MOVES, f"{what}: the LoRA does not change {key} (moved {moved:.2e}); the check is void"
    bad = {k: d for k, d in diffs.items() if not d <= TOL}
    assert not bad, f"{what}: outputs differ by more than {TOL}: {bad}"
    print(f"{what}: max abs differences {', '.join(f'{k} {d:.1e}' for k, d in diffs.items())}")
    return diffs


def file_modules(path: str) -> int:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return len({re.sub(r"\.(lora_[AB]|lora_down|lora_up|hada_w[12]_[ab]|alpha|dora_scale|lora_magnitude_vector)"
                           r"(\.weight)?$", "", k) for k in f.keys()})


def weights_of(pipe) -> dict[tuple[str, str], np.ndarray]:
    """``(component, tensor name) → weight`` of every Linear and Conv2d as the torch models compute with it: peft's
    fused base weights under their plain names; for a Linear LyCORIS wraps, its forward on the identity."""
    import torch

    with torch.no_grad():
        return _weights_of(torch, pipe)


def _weights_of(torch, pipe) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for comp, model in torch_components(pipe).items():
        for name, m in model.named_modules():
            if "lora_" in name or not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            name = name.replace(".base_layer", "")
            if isinstance(m, torch.nn.Linear) and hasattr(m, "_lycoris"):
                y = m(torch.eye(m.in_features, dtype=m.weight.dtype))
                w = (y - (m.bias if m.bias is not None else 0)).T
            else:
                w = m.weight
            out[(comp, name + ".weight")] = w.double().numpy()
    return out


def peft_reference(arch: str, folder: str, path: str, scale: float):
    """diffusers' own merge of a diffusers LoRA file: ``load_lora_weights`` + ``fuse_lora(lora_scale=scale)``."""
    from peft.tuners.lora import LoraLayer

    pipe = torch_pipeline(arch, folder)
    pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name="x")
    loaded = sum(isinstance(m, LoraLayer) and "x" in m.lora_A for c in torch_components(pipe).values()
                 for m in c.modules())
    assert loaded == file_modules(path), f"diffusers loaded {loaded} of the file's {file_modules(path)} modules"
    pipe.fuse_lora(components=list(torch_components(pipe)), lora_scale=scale, adapter_names=["x"])
    return weights_of(pipe)


@pytest.fixture(scope="session")
def interop():
    """The helpers above and their constants, as attributes."""
    return SimpleNamespace(TOL=TOL, STD=STD, TEXT_ENCODERS=TEXT_ENCODERS, mindone_outputs=mindone_outputs,
                           torch_components=torch_components, torch_outputs=torch_outputs,
                           torch_pipeline=torch_pipeline, assert_outputs_match=assert_outputs_match,
                           file_modules=file_modules, weights_of=weights_of, peft_reference=peft_reference)
