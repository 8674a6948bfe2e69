"""Synthetic base models and LoRA states for the format tests (pure numpy; no model is built).

:func:`unet_modules` lists the Linear/Conv2d weights of a diffusers ``UNet2DConditionModel`` with the given block
layout, with the shapes diffusers gives them; :func:`clip_modules` does the same for a CLIP text encoder.
``tiny_sd1()`` and ``tiny_sdxl()`` mirror ``mindone_lora_plugin.architectures.sd.tiny`` (block_out_channels (32, 64),
layers_per_block 2, one down block without attention and one with).
"""

from __future__ import annotations

import numpy as np

from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.state import LoraModule, LoraState


def _transformer(prefix, ch, cross, layers, linear_proj, out):
    proj = (ch, ch) if linear_proj else (ch, ch, 1, 1)
    out[f"{prefix}.proj_in"] = proj
    out[f"{prefix}.proj_out"] = proj
    for t in range(layers):
        tb = f"{prefix}.transformer_blocks.{t}"
        for a, kv in (("attn1", ch), ("attn2", cross)):
            out[f"{tb}.{a}.to_q"] = (ch, ch)
            out[f"{tb}.{a}.to_k"] = (ch, kv)
            out[f"{tb}.{a}.to_v"] = (ch, kv)
            out[f"{tb}.{a}.to_out.0"] = (ch, ch)
        out[f"{tb}.ff.net.0.proj"] = (ch * 8, ch)
        out[f"{tb}.ff.net.2"] = (ch, ch * 4)


def _resnet(prefix, cin, cout, temb, out):
    out[f"{prefix}.conv1"] = (cout, cin, 3, 3)
    out[f"{prefix}.time_emb_proj"] = (cout, temb)
    out[f"{prefix}.conv2"] = (cout, cout, 3, 3)
    if cin != cout:
        out[f"{prefix}.conv_shortcut"] = (cout, cin, 1, 1)


def unet_modules(channels=(32, 64), down_attn=(False, True), layers_per_block=2, transformer_layers=(1, 1),
                 cross=32, linear_proj=False, add_embedding_in=None) -> dict:
    """Module path → weight shape of a UNet2DConditionModel (up blocks mirror the down blocks)."""
    L = layers_per_block
    temb = channels[0] * 4
    out = {"conv_in": (channels[0], 4, 3, 3), "time_embedding.linear_1": (temb, channels[0]),
           "time_embedding.linear_2": (temb, temb), "conv_out": (4, channels[0], 3, 3)}
    if add_embedding_in:
        out["add_embedding.linear_1"] = (temb, add_embedding_in)
        out["add_embedding.linear_2"] = (temb, temb)
    n = len(channels)
    cin = channels[0]
    skips = [channels[0]]
    for b, ch in enumerate(channels):
        for j in range(L):
            _resnet(f"down_blocks.{b}.resnets.{j}", cin if j == 0 else ch, ch, temb, out)
            if down_attn[b]:
                _transformer(f"down_blocks.{b}.attentions.{j}", ch, cross, transformer_layers[b], linear_proj, out)
            skips.append(ch)
        cin = ch
        if b < n - 1:
            out[f"down_blocks.{b}.downsamplers.0.conv"] = (ch, ch, 3, 3)
            skips.append(ch)
    mid = channels[-1]
    _resnet("mid_block.resnets.0", mid, mid, temb, out)
    _transformer("mid_block.attentions.0", mid, cross, transformer_layers[-1], linear_proj, out)
    _resnet("mid_block.resnets.1", mid, mid, temb, out)
    rev = list(reversed(channels))
    prev = rev[0]
    for b, ch in enumerate(rev):
        attn = list(reversed(down_attn))[b]
        tl = list(reversed(transformer_layers))[b]
        for j in range(L + 1):
            skip = skips.pop()
            _resnet(f"up_blocks.{b}.resnets.{j}", (prev if j == 0 else ch) + skip, ch, temb, out)
            if attn:
                _transformer(f"up_blocks.{b}.attentions.{j}", ch, cross, tl, linear_proj, out)
        prev = ch
        if b < n - 1:
            out[f"up_blocks.{b}.upsamplers.0.conv"] = (ch, ch, 3, 3)
    return out


def clip_modules(hidden=32, layers=5, intermediate=37, projection=None) -> dict:
    """Module path → weight shape of a CLIP text encoder (as BaseModelInfo lists it: no embeddings)."""
    out = {}
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for q in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}.self_attn.{q}"] = (hidden, hidden)
        out[f"{p}.mlp.fc1"] = (intermediate, hidden)
        out[f"{p}.mlp.fc2"] = (hidden, intermediate)
    if projection:
        out["text_projection"] = (projection, hidden)
    return out


def tiny_sd1() -> BaseModelInfo:
    return BaseModelInfo("sd1", {"layers_per_block": 2}, {"unet": unet_modules(cross=32, linear_proj=False),
                                    "text_encoder": clip_modules()}, source="<tiny-sd1>")


def tiny_sdxl() -> BaseModelInfo:
    return BaseModelInfo("sdxl", {"layers_per_block": 2},
                         {"unet": unet_modules(cross=64, linear_proj=True, transformer_layers=(1, 2),
                                               add_embedding_in=80),
                          "text_encoder": clip_modules(),
                          "text_encoder_2": clip_modules(projection=32)}, source="<tiny-sdxl>")


def real_sdxl_unet() -> dict:
    """The real SDXL base UNet layout (3 down blocks, transformer layers (1, 2, 10)); shapes as in SDXL."""
    return unet_modules(channels=(320, 640, 1280), down_attn=(False, True, True), transformer_layers=(1, 2, 10),
                        cross=2048, linear_proj=True, add_embedding_in=2816)


def real_sd1_unet() -> dict:
    return unet_modules(channels=(320, 640, 1280, 1280), down_attn=(True, True, True, False),
                        transformer_layers=(1, 1, 1, 1), cross=768, linear_proj=False)


def kohya_targets(modules: dict, conv: bool = False) -> list[str]:
    """kohya's default UNet/TE targets (transformer children, CLIP attention/MLP), plus the resnet/sampler set."""
    out = []
    for p in modules:
        if ".attentions." in p or ".self_attn." in p or ".mlp." in p:
            out.append(p)
        elif conv and (".resnets." in p or "samplers." in p):
            out.append(p)
    return out


def random_state(base: BaseModelInfo, rng=None, conv=True, vary=True, dtype=np.float32, ranks=(2, 4, 8),
                 alphas=(1.0, 4.0, 0.5, 8.0, 3.0), components=None) -> LoraState:
    """A LoraState over ``base``'s kohya targets with per-module ranks/alphas (uniform when ``vary`` is False)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    st = LoraState(architecture=base.architecture, base_config=base.base_config)
    for comp, mods in base.modules.items():
        if components is not None and comp not in components:
            continue
        for path in kohya_targets(mods, conv=conv):
            shape = mods[path]
            r = int(rng.choice(ranks)) if vary else ranks[0]
            a = float(rng.choice(alphas)) if vary else alphas[0]
            if len(shape) == 4:
                down = rng.standard_normal((r, shape[1], shape[2], shape[3]))
                up = rng.standard_normal((shape[0], r, 1, 1))
            else:
                down = rng.standard_normal((r, shape[1]))
                up = rng.standard_normal((shape[0], r))
            st.add(comp, path, LoraModule(down.astype(dtype), up.astype(dtype), a))
    return st


def assert_states_equal(a: LoraState, b: LoraState, exact=True, atol=0.0):
    ka = [(c, p) for c, p, _ in a.modules()]
    kb = [(c, p) for c, p, _ in b.modules()]
    assert ka == kb, (set(ka) ^ set(kb))
    for c, p, m in a.modules():
        n = b.components[c][p]
        assert m.rank == n.rank, (c, p)
        assert float(m.alpha) == float(n.alpha), (c, p, m.alpha, n.alpha)
        assert m.down.shape == n.down.shape and m.up.shape == n.up.shape, (c, p)
        if exact:
            assert m.down.dtype == n.down.dtype, (c, p, m.down.dtype, n.down.dtype)
            assert np.array_equal(m.down, n.down) and np.array_equal(m.up, n.up), (c, p)
        else:
            np.testing.assert_allclose(m.down.astype(np.float32), n.down.astype(np.float32), atol=atol)
            np.testing.assert_allclose(m.up.astype(np.float32), n.up.astype(np.float32), atol=atol)


def fake_model_folder(base: BaseModelInfo, folder) -> str:
    """A diffusers-layout folder whose configs and weight headers describe ``base`` (zero weights, fp16)."""
    import json
    import os

    from safetensors.numpy import save_file

    folder = str(folder)
    xl = "text_encoder_2" in base.modules
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}
    if xl:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    for comp, mods in base.modules.items():
        sub = os.path.join(folder, comp)
        os.makedirs(sub, exist_ok=True)
        if comp == "unet":
            cross = mods["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"][1]
            config = {"layers_per_block": base.base_config.get("layers_per_block"), "cross_attention_dim": cross}
            name = "diffusion_pytorch_model.safetensors"
        else:
            config = {"hidden_size": mods["text_model.encoder.layers.0.self_attn.q_proj"][1]}
            name = "model.safetensors"
        with open(os.path.join(sub, "config.json"), "w") as f:
            json.dump(config, f)
        save_file({f"{p}.weight": np.zeros(s, np.float16) for p, s in mods.items()}, os.path.join(sub, name))
    return folder
