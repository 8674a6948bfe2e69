"""FLUX.1 LoRA key grammar: the module paths a FLUX LoRA adapts, and every file naming of them read here.

Components and their module paths (diffusers / transformers names; mindone 0.5.0 uses the same):

* ``transformer`` (``FluxTransformer2DModel``): ``transformer_blocks.{i}.`` (double-stream) ``attn.to_q/to_k/to_v/
  to_out.0``, ``attn.add_q_proj/add_k_proj/add_v_proj/to_add_out``, ``ff.net.0.proj``, ``ff.net.2``,
  ``ff_context.net.0.proj``, ``ff_context.net.2``, ``norm1.linear``, ``norm1_context.linear``;
  ``single_transformer_blocks.{i}.`` ``attn.to_q/to_k/to_v``, ``proj_mlp``, ``proj_out``, ``norm.linear``; outside the
  blocks ``x_embedder``, ``context_embedder``, ``time_text_embed.{timestep,guidance,text}_embedder.linear_{1,2}``,
  ``norm_out.linear``, ``proj_out``;
* ``text_encoder`` (CLIP-L): ``text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2``;
* ``text_encoder_2`` (T5-XXL): ``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}``,
  ``encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}``.

The original (Black Forest Labs) model, whose names kohya sd-scripts (``networks/lora_flux.py``), ComfyUI and Forge
use, *fuses* some of these Linears: ``double_blocks.{i}.img_attn.qkv`` is ``to_q``+``to_k``+``to_v`` stacked on the
output axis, ``txt_attn.qkv`` the three ``add_*_proj``, and ``single_blocks.{i}.linear1`` is ``to_q``+``to_k``+
``to_v``+``proj_mlp``. ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with its two output halves swapped
(BFL: shift, scale; diffusers: scale, shift). :data:`BFL_TO_DIFFUSERS` below is the whole table; each row was checked
against ``FluxTransformer2DModel``'s modules and diffusers' ``_convert_kohya_flux_lora_to_diffusers``.

File namings read (:func:`parse_key`), all with ``.lora_down.weight``/``.lora_up.weight``, ``.lora_A.weight``/
``.lora_B.weight`` (or another installed algorithm's tensor names) and an optional ``.alpha``:

* ``bfl`` — kohya sd-scripts: ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_3_linear1``,
  ``lora_unet_img_in`` ..., CLIP ``lora_te1_`` (also ``lora_te_``), T5 ``lora_te3_`` (also ``lora_te2_``);
  ComfyUI: ``diffusion_model.double_blocks.0.img_attn.qkv`` (also ``model.diffusion_model.``, ``base_model.model.``
  and bare ``double_blocks.…``), CLIP ``text_encoders.clip_l.transformer.…``, T5 ``text_encoders.t5xxl.transformer.…``;
* ``diffusers`` — diffusers/PEFT and ai-toolkit: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``
  (``text_encoder.``, ``text_encoder_2.``; also ``base_model.model.`` and bare paths, and ``lora_down``/``lora_up``
  under ``transformer.`` as some ai-toolkit files have); flattened: ``lora_transformer_transformer_blocks_0_attn_to_q``
  (OneTrainer, diffusers' "mixture" files) and ``lora_unet_`` followed by a flattened diffusers path;
* ``xlabs`` — XLabs-AI: ``double_blocks.0.processor.qkv_lora1.down.weight`` (``qkv_lora1`` image qkv, ``qkv_lora2``
  text qkv, ``proj_lora1``/``proj_lora2`` the projections), ``single_blocks.0.processor.qkv_lora`` (the q/k/v part
  of ``linear1``) and ``proj_lora`` (``linear2``); no alphas (scale 1).

Nothing here imports MindSpore or torch.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te3"}

# ----------------------------------------------------------------------------- the BFL ⇄ diffusers table

# BFL name (``_``-joined, ``{i}`` = block index) → the diffusers paths it holds, in output-row order
BFL_TO_DIFFUSERS: dict[str, tuple[str, ...]] = {
    "double_blocks_{i}_img_attn_qkv": ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                       "transformer_blocks.{i}.attn.to_v"),
    "double_blocks_{i}_img_attn_proj": ("transformer_blocks.{i}.attn.to_out.0",),
    "double_blocks_{i}_img_mlp_0": ("transformer_blocks.{i}.ff.net.0.proj",),
    "double_blocks_{i}_img_mlp_2": ("transformer_blocks.{i}.ff.net.2",),
    "double_blocks_{i}_img_mod_lin": ("transformer_blocks.{i}.norm1.linear",),
    "double_blocks_{i}_txt_attn_qkv": ("transformer_blocks.{i}.attn.add_q_proj",
                                       "transformer_blocks.{i}.attn.add_k_proj",
                                       "transformer_blocks.{i}.attn.add_v_proj"),
    "double_blocks_{i}_txt_attn_proj": ("transformer_blocks.{i}.attn.to_add_out",),
    "double_blocks_{i}_txt_mlp_0": ("transformer_blocks.{i}.ff_context.net.0.proj",),
    "double_blocks_{i}_txt_mlp_2": ("transformer_blocks.{i}.ff_context.net.2",),
    "double_blocks_{i}_txt_mod_lin": ("transformer_blocks.{i}.norm1_context.linear",),
    "single_blocks_{i}_linear1": ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                                  "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp"),
    "single_blocks_{i}_linear2": ("single_transformer_blocks.{i}.proj_out",),
    "single_blocks_{i}_modulation_lin": ("single_transformer_blocks.{i}.norm.linear",),
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in_in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in_out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in_in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in_out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in_in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in_out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer_linear": ("proj_out",),
    "final_layer_adaLN_modulation_1": ("norm_out.linear",),
}
# BFL modules whose output halves are swapped relative to the diffusers module (shift/scale order)
SWAPPED_HALVES = frozenset({"final_layer_adaLN_modulation_1"})
# XLabs' single-block ``qkv_lora`` adapts only the q/k/v rows of ``linear1``
XLABS_SINGLE_QKV = "single_blocks_{i}_linear1_qkv"
_XLABS_GROUPS = {XLABS_SINGLE_QKV: BFL_TO_DIFFUSERS["single_blocks_{i}_linear1"][:3]}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)"))


_BFL_RES = tuple((t, _pattern(t)) for t in {**BFL_TO_DIFFUSERS, **_XLABS_GROUPS})
_DIFF_TO_BFL: dict[str, tuple[str, int]] = {}
for _bfl, _paths in BFL_TO_DIFFUSERS.items():
    for _n, _p in enumerate(_paths):
        _DIFF_TO_BFL[_p] = (_bfl, _n)
_DIFF_RES = tuple((p, _pattern(p)) for p in _DIFF_TO_BFL)


def bfl_parts(name: str) -> tuple[str, ...] | None:
    """The diffusers paths a BFL module name (``double_blocks_0_img_attn_qkv``; dots allowed) holds, or None."""
    name = name.replace(".", "_")
    for template, regex in _BFL_RES:
        m = regex.fullmatch(name)
        if m:
            paths = {**BFL_TO_DIFFUSERS, **_XLABS_GROUPS}[template]
            return tuple(p.replace("{i}", m[1]) for p in paths) if m.groups() else paths
    return None


def bfl_name(path: str) -> tuple[str, int, tuple[str, ...]] | None:
    """``(BFL name, index of path among its parts, all parts)`` of a diffusers transformer path, or None."""
    for template, regex in _DIFF_RES:
        m = regex.fullmatch(path)
        if m:
            bfl, index = _DIFF_TO_BFL[template]
            name = bfl.replace("{i}", m[1]) if m.groups() else bfl
            return name, index, bfl_parts(name)
    return None


def is_swapped(bfl: str) -> bool:
    return bfl in SWAPPED_HALVES


# ----------------------------------------------------------------------------- diffusers paths per component

TRANSFORMER_PATH_RE = re.compile(
    r"transformer_blocks\.\d+\.(?:attn\.(?:to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|"
    r"ff(?:_context)?\.net\.(?:0\.proj|2)|norm1(?:_context)?\.linear)|"
    r"single_transformer_blocks\.\d+\.(?:attn\.to_[qkv]|proj_mlp|proj_out|norm\.linear)|"
    r"x_embedder|context_embedder|proj_out|norm_out\.linear|"
    r"time_text_embed\.(?:timestep|guidance|text)_embedder\.linear_[12]")
CLIP_PATH_RE = re.compile(r"text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:[qkv]|out)_proj|mlp\.fc[12])")
T5_PATH_RE = re.compile(r"encoder\.block\.\d+\.layer\."
                        r"(?:0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(?:wi_0|wi_1|wi|wo))")
PATH_RES = {"transformer": TRANSFORMER_PATH_RE, "text_encoder": CLIP_PATH_RE, "text_encoder_2": T5_PATH_RE}

_VOCAB = {
    "transformer": frozenset("""transformer_blocks single_transformer_blocks attn to_q to_k to_v to_out add_q_proj
        add_k_proj add_v_proj to_add_out ff ff_context net proj norm1 norm1_context linear norm proj_mlp proj_out
        x_embedder context_embedder norm_out time_text_embed timestep_embedder guidance_embedder text_embedder
        linear_1 linear_2""".split()),
    "text_encoder": frozenset("text_model encoder layers self_attn q_proj k_proj v_proj out_proj mlp fc1 fc2".split()),
    "text_encoder_2": frozenset("encoder block layer SelfAttention q k v o DenseReluDense wi_0 wi_1 wi wo".split()),
}


@functools.lru_cache(maxsize=8192)
def unflatten(component: str, name: str) -> str | None:
    """A ``_``-joined module path of ``component`` back in dots (``transformer_blocks_0_attn_to_out_0`` →
    ``transformer_blocks.0.attn.to_out.0``), or None when it is not one of the component's LoRA targets."""
    from mindone_lora_plugin.formats.names import unflatten as greedy

    path = greedy(name, _VOCAB[component])
    return path if path is not None and PATH_RES[component].fullmatch(path) else None


def is_target_path(component: str, path: str) -> bool:
    """True for a module path of ``component`` that FLUX LoRAs adapt (diffusers naming)."""
    regex = PATH_RES.get(component)
    return regex is not None and regex.fullmatch(path) is not None


def kohya_module_name(component: str, path: str) -> str:
    """The kohya (sd-scripts) name of the file module holding ``component.path`` (fused modules share one)."""
    if component == "transformer":
        found = bfl_name(path)
        if found is None:
            raise ValueError(f"transformer.{path} has no name in the original FLUX model")
        return f"{KOHYA_PREFIXES[component]}_{found[0]}"
    return f"{KOHYA_PREFIXES[component]}_{path.replace('.', '_')}"


# ----------------------------------------------------------------------------- parsing file keys

DOWN, UP, ALPHA = "down", "up", "alpha"
# DoRA's magnitude as peft's modules name it (``….lora_magnitude_vector.weight``), read as the SD reader does;
# diffusers' files say ``….lora_magnitude_vector``, the algorithm's own suffix (among the installed ones)
_PLAIN_SUFFIXES = ((".lora_magnitude_vector.weight", "lora:magnitude"),
                   (".lora_down.weight", DOWN), (".lora_up.weight", UP), (".lora_A.weight", DOWN),
                   (".lora_B.weight", UP), (".lora_linear_layer.down.weight", DOWN),
                   (".lora_linear_layer.up.weight", UP), (".lora.down.weight", DOWN), (".lora.up.weight", UP),
                   (".down.weight", DOWN), (".up.weight", UP), (".alpha", ALPHA))
_FLAT = (("lora_unet_", "transformer"), ("lora_transformer_", "transformer"), ("lora_te1_", "text_encoder"),
         ("lora_te_", "text_encoder"), ("lora_te3_", "text_encoder_2"), ("lora_te2_", "text_encoder_2"))
_DOTTED = (("text_encoders.clip_l.transformer.", "text_encoder"),
           ("text_encoders.t5xxl.transformer.", "text_encoder_2"),
           ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"), ("transformer.", "transformer"),
           ("model.diffusion_model.", "transformer"), ("diffusion_model.", "transformer"),
           ("base_model.model.", None), ("", None))
_BFL_ROOTS = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
              "final_layer")
_XLABS_RE = re.compile(r"(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12]?)")
_XLABS_DOUBLE = {("qkv", "1"): "img_attn_qkv", ("qkv", "2"): "txt_attn_qkv", ("proj", "1"): "img_attn_proj",
                 ("proj", "2"): "txt_attn_proj"}
_XLABS_SINGLE = {"qkv": "linear1_qkv", "proj": "linear2"}


@dataclass(frozen=True)
class FluxKey:
    """One tensor key: its component, the module name (a BFL name with ``_``, or a dotted diffusers path), the
    naming (``bfl``, ``diffusers`` or ``xlabs``) and the tensor's role (``down``/``up``/``alpha``/``algo:role``)."""

    key: str
    component: str
    name: str
    naming: str
    role: str

    @property
    def module(self) -> tuple[str, str, str]:
        return self.component, self.naming, self.name


def _split_suffix(key: str, extra) -> tuple[str, str] | None:
    for suffix, role in tuple(extra) + _PLAIN_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def _transformer_name(stem: str) -> tuple[str, str] | None:
    """``(naming, name)`` of a transformer module spelled with dots or ``_`` (BFL or diffusers), or None."""
    m = _XLABS_RE.fullmatch(stem)
    if m:
        kind, idx, what, n = m.groups()
        tail = _XLABS_DOUBLE.get((what, n)) if kind == "double" else (_XLABS_SINGLE[what] if not n else None)
        return ("xlabs", f"{kind}_blocks_{idx}_{tail}") if tail else None
    flat = stem.replace(".", "_")
    if stem.startswith(_BFL_ROOTS) and bfl_parts(flat) is not None:
        return "bfl", flat
    if TRANSFORMER_PATH_RE.fullmatch(stem):
        return "diffusers", stem
    if "." not in stem:
        path = unflatten("transformer", stem)
        if path is not None:
            return "diffusers", path
    return None


def _encoder_name(component: str, stem: str) -> str | None:
    if PATH_RES[component].fullmatch(stem):
        return stem
    return unflatten(component, stem) if "." not in stem else None


def parse_key(key: str, extra_suffixes=()) -> FluxKey | None:
    """Parse one tensor key of a FLUX LoRA file (any naming in the module docstring); None when it is none of them.

    ``extra_suffixes`` are ``(suffix, "algo:role")`` pairs of installed algorithms other than plain LoRA."""
    split = _split_suffix(key, extra_suffixes)
    if split is None:
        return None
    stem, role = split
    for prefix, comp in _FLAT:
        if stem.startswith(prefix) and "." not in stem:
            rest = stem[len(prefix):]
            if comp == "transformer":
                found = _transformer_name(rest)
                return FluxKey(key, comp, found[1], found[0], role) if found else None
            name = _encoder_name(comp, rest)
            return FluxKey(key, comp, name, "diffusers", role) if name else None
    for prefix, comp in _DOTTED:
        if not stem.startswith(prefix):
            continue
        rest = stem[len(prefix):]
        comps = (comp,) if comp else COMPONENTS
        for c in comps:
            if c == "transformer":
                found = _transformer_name(rest)
                if found:
                    return FluxKey(key, c, found[1], found[0], role)
            else:
                name = _encoder_name(c, rest) if "." in rest else None
                if name:
                    return FluxKey(key, c, name, "diffusers", role)
        if comp is not None:
            return None
    return None


# ----------------------------------------------------------------------------- detection

_STRUCTURE_RE = re.compile(r"(?:^|[._])(?:double_blocks|single_blocks|single_transformer_blocks)[._]\d+|"
                           r"(?:^|[._])transformer_blocks[._]\d+[._](?:attn[._](?:add_[qkv]_proj|to_add_out)|"
                           r"norm1_context|ff_context)|^lora_te3_|^text_encoders\.t5xxl\.|"
                           r"^transformer\.|^lora_transformer_|"
                           r"(?:^|[._])(?:x_embedder|context_embedder|time_text_embed)[._]")
MODELSPEC_FAMILY = "flux-1"
KOHYA_BASE_MODEL_VERSION = "flux1"


def detect_metadata(metadata: dict[str, str]) -> str:
    """The reason when the header names FLUX.1 (``ss_base_model_version=flux1``, ``modelspec.architecture=flux-1-…``),
    else ``""``."""
    metadata = metadata or {}
    version = (metadata.get("ss_base_model_version") or "").strip()
    if version.startswith(KOHYA_BASE_MODEL_VERSION):
        return f"ss_base_model_version={version}"
    spec = (metadata.get("modelspec.architecture") or "").strip()
    if spec.startswith(MODELSPEC_FAMILY):
        return f"modelspec.architecture={spec}"
    if (metadata.get("mindone_lora.architecture") or "").strip() == "flux":
        return "mindone_lora.architecture=flux"
    return ""


def detect_keys(keys) -> str:
    """The reason when the tensor keys name modules only FLUX has (``double_blocks``, ``single_transformer_blocks``,
    a T5 encoder ...), else ``""``."""
    for k in keys:
        m = _STRUCTURE_RE.search(k)
        if m:
            return f"its keys name FLUX modules (e.g. '{k}')"
    return ""


def detect(keys, metadata: dict[str, str] | None) -> str:
    """Why a LoRA file is a FLUX.1 LoRA (its keys first, then its header), or ``""`` when nothing says so."""
    return detect_keys(keys) or detect_metadata(metadata or {})


def variant_from_metadata(metadata: dict[str, str] | None) -> str:
    """``schnell`` or ``dev`` (the default) from a header's ``modelspec.architecture``."""
    spec = ((metadata or {}).get("modelspec.architecture") or "").strip()
    return "schnell" if spec.startswith("flux-1-schnell") else "dev"
