"""Published configs of the real base models (values copied from their ``config.json`` files; nothing is downloaded)
and a generator of the module shapes the ``kohya`` target preset adapts, derived from those configs.

* SD1.5: ``runwayml/stable-diffusion-v1-5`` ``unet/config.json`` and ``text_encoder/config.json`` (CLIP ViT-L/14).
* SDXL: ``stabilityai/stable-diffusion-xl-base-1.0`` ``unet/config.json``, ``text_encoder/config.json`` (CLIP
  ViT-L/14) and ``text_encoder_2/config.json`` (OpenCLIP ViT-bigG/14).
* FLUX.1-dev: ``black-forest-labs/FLUX.1-dev`` ``transformer/config.json`` (11.9B parameters).

The ``kohya`` preset (kohya-ss ``networks/lora.py``): every Linear / 1×1 Conv2d inside a ``Transformer2DModel`` of the
UNet, and every Linear of the CLIP attention and MLP blocks. Expected counts (docs/formats.md and the shared reference
§1.2): SD1.x 192 UNet + 72 TE; SDXL 722 UNet + 72 TE1 + 192 TE2.
"""

from __future__ import annotations

SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

CLIP_L = {  # SD1.5 text_encoder, SDXL text_encoder
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
}

SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}

OPENCLIP_BIGG = {  # SDXL text_encoder_2
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "projection_dim": 1280,
}

FLUX1_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

EXPECTED_COUNTS = {"sd1": {"unet": 192, "text_encoder": 72},
                   "sdxl": {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}}


def _per_block(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_kohya_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Module path → base weight shape for every module of the ``kohya`` preset in a UNet2DConditionModel."""
    channels = list(cfg["block_out_channels"])
    n = len(channels)
    lpb = cfg["layers_per_block"]
    layers = _per_block(cfg.get("transformer_layers_per_block", 1), n)
    cross = cfg["cross_attention_dim"]
    linear_proj = cfg.get("use_linear_projection", False)
    out: dict[str, tuple[int, ...]] = {}

    def transformer(prefix: str, ch: int, depth: int) -> None:
        # Transformer2DModel: inner dim = heads × head dim = ch for SD1.5 and SDXL; GEGLU feed-forward, mult 4
        proj = (ch, ch) if linear_proj else (ch, ch, 1, 1)
        out[f"{prefix}.proj_in"] = proj
        for j in range(depth):
            b = f"{prefix}.transformer_blocks.{j}"
            for attn, kv_in in (("attn1", ch), ("attn2", cross)):
                out[f"{b}.{attn}.to_q"] = (ch, ch)
                out[f"{b}.{attn}.to_k"] = (ch, kv_in)
                out[f"{b}.{attn}.to_v"] = (ch, kv_in)
                out[f"{b}.{attn}.to_out.0"] = (ch, ch)
            out[f"{b}.ff.net.0.proj"] = (ch * 8, ch)
            out[f"{b}.ff.net.2"] = (ch, ch * 4)
        out[f"{prefix}.proj_out"] = proj

    for i, kind in enumerate(cfg["down_block_types"]):
        if kind.startswith("CrossAttn"):
            for k in range(lpb):
                transformer(f"down_blocks.{i}.attentions.{k}", channels[i], layers[i])
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        transformer("mid_block.attentions.0", channels[-1], layers[-1])
    rev_ch, rev_layers = channels[::-1], layers[::-1]
    for i, kind in enumerate(cfg["up_block_types"]):
        if kind.startswith("CrossAttn"):
            for k in range(lpb + 1):
                transformer(f"up_blocks.{i}.attentions.{k}", rev_ch[i], rev_layers[i])
    return out


def clip_kohya_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Module path → weight shape for the CLIP attention and MLP Linears (the ``kohya`` preset of a text encoder)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    out: dict[str, tuple[int, ...]] = {}
    for i in range(cfg["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}.self_attn.{proj}"] = (h, h)
        out[f"{p}.mlp.fc1"] = (inter, h)
        out[f"{p}.mlp.fc2"] = (h, inter)
    return out


def kohya_preset_shapes(arch: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """Component → module path → base weight shape, checked against the published module counts."""
    if arch == "sdxl":
        shapes = {"unet": unet_kohya_shapes(SDXL_UNET), "text_encoder": clip_kohya_shapes(CLIP_L),
                  "text_encoder_2": clip_kohya_shapes(OPENCLIP_BIGG)}
    elif arch == "sd1":
        shapes = {"unet": unet_kohya_shapes(SD15_UNET), "text_encoder": clip_kohya_shapes(CLIP_L)}
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    counts = {c: len(m) for c, m in shapes.items()}
    if counts != EXPECTED_COUNTS[arch]:
        raise AssertionError(f"{arch} kohya preset: generated {counts}, expected {EXPECTED_COUNTS[arch]}")
    return shapes


def flux_preset_shapes(cfg: dict, preset: str) -> dict[str, tuple[int, int]]:
    """Module path → base Linear weight shape ``(out, in)`` for the FLUX transformer presets (``attn``: attention
    projections; ``kohya``: every Linear of the double and single blocks), derived from a transformer config.

    Double block: AdaLN ``norm1``/``norm1_context`` (6·D), image and text q/k/v and outputs, GELU feed-forwards of
    both streams (4·D). Single block: AdaLN ``norm`` (3·D), q/k/v (no output projection), ``proj_mlp`` (4·D) and
    ``proj_out`` (D + 4·D → D). FLUX.1-dev: 266 (``attn``) and 494 (``kohya``) modules.
    """
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    out: dict[str, tuple[int, int]] = {}
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            out[f"{b}.attn.{name}"] = (d, d)
        if preset == "kohya":
            out[f"{b}.norm1.linear"] = out[f"{b}.norm1_context.linear"] = (6 * d, d)
            for ff in ("ff", "ff_context"):
                out[f"{b}.{ff}.net.0.proj"] = (4 * d, d)
                out[f"{b}.{ff}.net.2"] = (d, 4 * d)
    for i in range(cfg["num_single_layers"]):
        b = f"single_transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v"):
            out[f"{b}.attn.{name}"] = (d, d)
        if preset == "kohya":
            out[f"{b}.norm.linear"] = (3 * d, d)
            out[f"{b}.proj_mlp"] = (4 * d, d)
            out[f"{b}.proj_out"] = (d, 5 * d)
    if preset not in ("attn", "kohya"):
        raise ValueError(f"unknown FLUX preset {preset!r}")
    return out


def synth_state(arch: str = "sdxl", rank: int = 32, alpha: float = 16.0, dtype: str = "float16", seed: int = 0):
    """A :class:`LoraState` with the real model's kohya-preset modules and shapes, random weights in ``dtype``."""
    import numpy as np

    from mindone_lora_plugin.state import LoraModule, LoraState

    rng = np.random.default_rng(seed)
    state = LoraState(architecture=arch, unet_layers_per_block=2)
    for comp, modules in kohya_preset_shapes(arch).items():
        for path, shape in modules.items():
            out_ch, in_ch = shape[0], shape[1]
            tail = tuple(shape[2:])
            down = (rng.standard_normal((rank, in_ch) + tail, dtype=np.float32) * 0.02).astype(dtype)
            up = (rng.standard_normal((out_ch, rank) + ((1, 1) if tail else ()), dtype=np.float32) * 0.02
                  ).astype(dtype)
            state.add(comp, path, LoraModule(down, up, float(alpha)))
    return state
