"""SD3 / SD3.5 LoRA key grammar: the module paths an SD3 LoRA adapts and the file namings of them read here.

Components (diffusers / transformers names, mindone 0.5.0 the same): ``transformer`` (``SD3Transformer2DModel``:
``transformer_blocks.{i}.attn.to_q/to_k/to_v/to_out.0``, ``attn.add_q_proj/add_k_proj/add_v_proj/to_add_out``,
SD3.5's dual-attention ``attn2.to_q/to_k/to_v/to_out.0``, ``ff.net.0.proj``, ``ff.net.2``, ``ff_context.net.0.proj``,
``ff_context.net.2``, ``norm1.linear``, ``norm1_context.linear``; outside the blocks ``context_embedder``,
``time_text_embed.{timestep,text}_embedder.linear_{1,2}``, ``norm_out.linear``, ``proj_out``), ``text_encoder``
(CLIP-L) and ``text_encoder_2`` (CLIP-G): ``text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``mlp.fc1/2``;
``text_encoder_3`` (T5-XXL): ``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}``, ``layer.1.DenseReluDense.*``.

The original (Stability AI "MMDiT") model, whose names kohya sd-scripts (``networks/lora_sd3.py``: ``lora_unet_``,
``lora_te1_``/``lora_te2_``/``lora_te3_``) and ComfyUI use, fuses q/k/v: ``joint_blocks.{i}.x_block.attn.qkv`` is
``to_q``+``to_k``+``to_v`` stacked on the output axis, ``context_block.attn.qkv`` the three ``add_*_proj``. Its
``final_layer.adaLN_modulation.1`` and the last block's (context pre-only) ``context_block.adaLN_modulation.1`` hold
the two output halves swapped relative to diffusers' (shift, scale vs scale, shift). :data:`MMDIT_TO_DIFFUSERS` is the
table. Nothing here imports MindSpore or torch.
"""

from __future__ import annotations

import functools
import re

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
KOHYA_PREFIXES = {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2",
                  "text_encoder_3": "lora_te3"}
KOHYA_BASE_MODEL_VERSION = "sd3"
MODELSPEC_FAMILY = "stable-diffusion-3"

_BLOCK = "transformer_blocks.{i}."
#: MMDiT name (``_``-joined, ``{i}`` = block index) → the diffusers transformer paths it holds, in output-row order
MMDIT_TO_DIFFUSERS: dict[str, tuple[str, ...]] = {
    "joint_blocks_{i}_x_block_attn_qkv": tuple(_BLOCK + f"attn.to_{c}" for c in "qkv"),
    "joint_blocks_{i}_x_block_attn_proj": (_BLOCK + "attn.to_out.0",),
    "joint_blocks_{i}_x_block_attn2_qkv": tuple(_BLOCK + f"attn2.to_{c}" for c in "qkv"),
    "joint_blocks_{i}_x_block_attn2_proj": (_BLOCK + "attn2.to_out.0",),
    "joint_blocks_{i}_x_block_mlp_fc1": (_BLOCK + "ff.net.0.proj",),
    "joint_blocks_{i}_x_block_mlp_fc2": (_BLOCK + "ff.net.2",),
    "joint_blocks_{i}_x_block_adaLN_modulation_1": (_BLOCK + "norm1.linear",),
    "joint_blocks_{i}_context_block_attn_qkv": tuple(_BLOCK + f"attn.add_{c}_proj" for c in "qkv"),
    "joint_blocks_{i}_context_block_attn_proj": (_BLOCK + "attn.to_add_out",),
    "joint_blocks_{i}_context_block_mlp_fc1": (_BLOCK + "ff_context.net.0.proj",),
    "joint_blocks_{i}_context_block_mlp_fc2": (_BLOCK + "ff_context.net.2",),
    "joint_blocks_{i}_context_block_adaLN_modulation_1": (_BLOCK + "norm1_context.linear",),
    "context_embedder": ("context_embedder",),
    "t_embedder_mlp_0": ("time_text_embed.timestep_embedder.linear_1",),
    "t_embedder_mlp_2": ("time_text_embed.timestep_embedder.linear_2",),
    "y_embedder_mlp_0": ("time_text_embed.text_embedder.linear_1",),
    "y_embedder_mlp_2": ("time_text_embed.text_embedder.linear_2",),
    "final_layer_linear": ("proj_out",),
    "final_layer_adaLN_modulation_1": ("norm_out.linear",),
}
#: a module whose output halves are swapped (always), and one swapped when it is the pre-only last block's (its
#: ``norm1_context.linear`` has 2 × width outputs, not 6 ×)
SWAPPED = "final_layer_adaLN_modulation_1"
SWAPPED_WHEN_PRE_ONLY = re.compile(r"joint_blocks_\d+_context_block_adaLN_modulation_1")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)"))


_MMDIT_RES = tuple((t, _pattern(t)) for t in MMDIT_TO_DIFFUSERS)
_DIFF_TO_MMDIT = {p: (m, n) for m, paths in MMDIT_TO_DIFFUSERS.items() for n, p in enumerate(paths)}
_DIFF_RES = tuple((p, _pattern(p)) for p in _DIFF_TO_MMDIT)


def mmdit_parts(name: str) -> tuple[str, ...] | None:
    """The diffusers paths an MMDiT module name (``joint_blocks_0_x_block_attn_qkv``; dots allowed) holds, or None."""
    name = name.replace(".", "_")
    for template, regex in _MMDIT_RES:
        m = regex.fullmatch(name)
        if m:
            paths = MMDIT_TO_DIFFUSERS[template]
            return tuple(p.replace("{i}", m[1]) for p in paths) if m.groups() else paths
    return None


def mmdit_name(path: str) -> tuple[str, int, tuple[str, ...]] | None:
    """``(MMDiT name, index of path among its parts, all parts)`` of a diffusers transformer path, or None."""
    for template, regex in _DIFF_RES:
        m = regex.fullmatch(path)
        if m:
            mmdit, index = _DIFF_TO_MMDIT[template]
            name = mmdit.replace("{i}", m[1]) if m.groups() else mmdit
            return name, index, mmdit_parts(name)
    return None


def is_swapped(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the MMDiT module ``name`` (of a LoRA with base weight ``shape``: out, in) holds its halves swapped."""
    return name == SWAPPED or bool(SWAPPED_WHEN_PRE_ONLY.fullmatch(name) and shape[0] == 2 * shape[1])


# ----------------------------------------------------------------------------- diffusers paths per component

TRANSFORMER_PATH_RE = re.compile(
    r"transformer_blocks\.\d+\.(?:attn2?\.(?:to_[qkv]|to_out\.0)|attn\.(?:add_[qkv]_proj|to_add_out)|"
    r"ff(?:_context)?\.net\.(?:0\.proj|2)|norm1(?:_context)?\.linear)|"
    r"context_embedder|proj_out|norm_out\.linear|time_text_embed\.(?:timestep|text)_embedder\.linear_[12]")
CLIP_PATH_RE = re.compile(r"text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:[qkv]|out)_proj|mlp\.fc[12])")
T5_PATH_RE = re.compile(r"encoder\.block\.\d+\.layer\."
                        r"(?:0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(?:wi_0|wi_1|wi|wo))")
PATH_RES = {"transformer": TRANSFORMER_PATH_RE, "text_encoder": CLIP_PATH_RE, "text_encoder_2": CLIP_PATH_RE,
            "text_encoder_3": T5_PATH_RE}
_CLIP_VOCAB = frozenset("text_model encoder layers self_attn q_proj k_proj v_proj out_proj mlp fc1 fc2".split())
_T5_VOCAB = frozenset("encoder block layer SelfAttention q k v o DenseReluDense wi_0 wi_1 wi wo".split())
_TRANSFORMER_VOCAB = frozenset("""transformer_blocks attn attn2 to_q to_k to_v to_out add_q_proj add_k_proj add_v_proj
    to_add_out ff ff_context net proj norm1 norm1_context linear proj_out context_embedder norm_out time_text_embed
    timestep_embedder text_embedder linear_1 linear_2""".split())
_VOCAB = {"transformer": _TRANSFORMER_VOCAB, "text_encoder": _CLIP_VOCAB, "text_encoder_2": _CLIP_VOCAB,
          "text_encoder_3": _T5_VOCAB}


@functools.lru_cache(maxsize=4096)
def diffusers_path(component: str, name: str) -> str | None:
    """A component's diffusers module path from a dotted or ``_``-joined name, or None when it is no target."""
    from mindone_lora_plugin.formats.names import unflatten

    path = name if "." in name else unflatten(name, _VOCAB[component])
    return path if path is not None and PATH_RES[component].fullmatch(path) else None


def kohya_module_name(component: str, path: str) -> str:
    """The kohya (sd-scripts) name of the file module holding ``component.path`` (q/k/v share their fused one)."""
    if component == "transformer":
        found = mmdit_name(path)
        if found is None:
            raise ValueError(f"transformer.{path} has no name in the original SD3 model")
        return f"{KOHYA_PREFIXES[component]}_{found[0]}"
    return f"{KOHYA_PREFIXES[component]}_{path.replace('.', '_')}"


# ----------------------------------------------------------------------------- detection

#: key spellings only SD3 has: MMDiT names, SD3.5's second attention at the transformer's top (SD's UNet has
#: ``…attentions.0.transformer_blocks.0.attn2`` deeper down), a third text encoder (not CLIP-G's names: SDXL's
#: second encoder is a CLIP-G too)
_ONLY_SD3 = re.compile(r"(?:^|[._])joint_blocks[._]\d+[._](?:x|context)_block[._]|"
                       r"^(?:transformer\.|lora_transformer_|base_model\.model\.)?transformer_blocks[._]\d+[._]attn2[._]|"
                       r"^text_encoder_3\.")


def detect_metadata(metadata: dict[str, str]) -> str:
    """The reason when the header names SD3 (``ss_base_model_version=sd3…``, ``modelspec.architecture=stable-
    diffusion-3…``, ``mindone_lora.architecture=sd3``), else ``""``."""
    metadata = metadata or {}
    version = (metadata.get("ss_base_model_version") or "").strip()
    if version.startswith(KOHYA_BASE_MODEL_VERSION):
        return f"ss_base_model_version={version}"
    spec = (metadata.get("modelspec.architecture") or "").strip()
    if spec.startswith(MODELSPEC_FAMILY):
        return f"modelspec.architecture={spec}"
    if (metadata.get("mindone_lora.architecture") or "").strip() == "sd3":
        return "mindone_lora.architecture=sd3"
    return ""


def detect_keys(keys) -> str:
    """The reason when a key names a module only SD3 has (``joint_blocks``, ``attn2``, a third text encoder ...),
    else ``""``."""
    for k in keys:
        if _ONLY_SD3.search(k):
            return f"its keys name SD3 modules (e.g. '{k}')"
    return ""


def detect(keys, metadata: dict[str, str] | None) -> str:
    """Why a LoRA file is an SD3 LoRA (its header first, then its keys), or ``""``."""
    return detect_metadata(metadata or {}) or detect_keys(keys)
