"""The built-in Stable Diffusion architectures: ``sd1`` (SD1.x), ``sd2`` (SD2.x) and ``sdxl`` (SDXL).

All three are a UNet (``UNet2DConditionModel``) conditioned on CLIP text encoders, trained with the DDPM noise
schedule (epsilon or v-prediction). What differs: SD2.x's 1024-wide cross-attention, SDXL's second text encoder
(``CLIPTextModelWithProjection``, its pooled output and the ``time_ids`` added conditioning) and kohya's SGM module
names for the SDXL UNet. The key grammar of SD modules is :mod:`.keys` (diffusers/CLIP names) and :mod:`.sgm`
(SGM names); this module says when each applies.

Detection is one judgement over the family (:func:`family_evidence`), so the three never disagree about a file:
weights for a second text encoder → SDXL; the cross-attention width (2048 / 1024 / 768) or a 1024-wide text encoder;
then header metadata; then weak hints (SGM names or deep transformer blocks → SDXL; 1×1-conv ``proj_in`` or a 768-wide
text encoder → SD1.x).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mindone_lora_plugin.architectures.base import (
    HINT,
    METADATA,
    SHAPES,
    STRUCTURE,
    Architecture,
    Component,
    Evidence,
    FolderInfo,
    KeyPrefixes,
    TargetRule,
)
from mindone_lora_plugin.architectures.sd import sgm
from mindone_lora_plugin.architectures.sd.training import SDTraining
from mindone_lora_plugin.errors import LoraError

SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"

UNET = Component("unet", "mindone.diffusers:UNet2DConditionModel", "lora_unet", class_names=("UNet2DConditionModel",))
TEXT_ENCODER = Component("text_encoder", "mindone.transformers:CLIPTextModel", "lora_te", kind="text_encoder",
                         optional=True, dtype_kw="dtype", class_names=("CLIPTextModel",))
# SDXL: kohya numbers its two text encoders
TEXT_ENCODER_1 = Component("text_encoder", "mindone.transformers:CLIPTextModel", "lora_te1", kind="text_encoder",
                           optional=True, dtype_kw="dtype", class_names=("CLIPTextModel",))
TEXT_ENCODER_2 = Component("text_encoder_2", "mindone.transformers:CLIPTextModelWithProjection", "lora_te2",
                           kind="text_encoder", optional=True, dtype_kw="dtype",
                           class_names=("CLIPTextModelWithProjection",))

# what the target presets adapt (kohya's target classes: networks/lora.py)
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_TRANSFORMER_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
UNET_RULES = {"attn": TargetRule(names=UNET_ATTN), "kohya": TargetRule(containers=UNET_TRANSFORMER_CLASSES),
              "kohya-conv": TargetRule(containers=UNET_TRANSFORMER_CLASSES + UNET_CONV_CLASSES)}
TE_RULES = {"attn": TargetRule(names=TE_ATTN), "kohya": TargetRule(containers=TE_CLASSES),
            "kohya-conv": TargetRule(containers=TE_CLASSES)}

_CROSS = {2048: "sdxl", 1024: "sd2", 768: "sd1"}
_RE_CROSS = re.compile(r"attn2[._]to_[kv]$")
_RE_TE_IN = re.compile(r"(?:q_proj|k_proj|v_proj|fc1)$|to_[qkv]_lora$|to_[qkv]$")
_RE_DEEP = re.compile(r"transformer_blocks[._]([1-9]\d*)(?:[._]|$)")
_RE_PROJ_IN = re.compile(r"(?:^|[._])proj_in$")
_RE_UP_ATTN = re.compile(r"up_blocks\.(\d+)\.attentions\.")
SD_COMPONENTS = frozenset(("unet", "text_encoder", "text_encoder_2"))
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.", "add_embedding.",
               "input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
_TE_ROOTS = ("text_model.", "text_projection")
# one table for the whole family (SD1.x, SD2.x and SDXL files are told apart by family_evidence, not by prefixes):
# kohya's prefixes (SDXL numbers its text encoders; SimpleTuner's lycoris_ UNet prefix), PEFT's (base_model.model.:
# the path decides), ComfyUI's diffusion_model. (SGM names)
KEY_PREFIXES = KeyPrefixes(
    flat=(("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
          ("lora_te_", "text_encoder"), ("lycoris_", "unet")),
    dotted=(("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"), ("unet.", "unet"),
            ("base_model.model.", None), ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet")),
    roots=tuple((r, "unet") for r in _UNET_ROOTS) + tuple((r, "text_encoder") for r in _TE_ROOTS),
    fallback="unet", text_encoders=("text_encoder", "text_encoder_2"))
_CLIP_ROOTS = ("text_model.", "text_model_", "text_projection")  # a CLIP encoder's modules (dotted or kohya)


def _get(config, key: str):
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


class StableDiffusion(SDTraining, Architecture):
    """What SD1.x, SD2.x and SDXL share (a subclass sets the names, components and metadata)."""

    denoiser = "unet"
    default_strategy = "unet"
    uses_time_ids = False  # SDXL's added conditioning (original size, crop, target size) and pooled text embeds
    vae_half_precision = True  # SDXL's VAE overflows in fp16: it stays fp32

    # ------------------------------------------------------------------ detection

    def family(self, folder: FolderInfo) -> str | None:
        """Which SD architecture a folder (or live models' configs) is, or None when it is no SD model."""
        configs = folder.configs
        if "unet" not in configs and not (set(configs) <= SD_COMPONENTS):
            return None
        unet, te = configs.get("unet"), configs.get("text_encoder")
        if ("text_encoder_2" in configs or "XL" in folder.class_name
                or _get(unet, "addition_embed_type") == "text_time"):
            return "sdxl"
        if _get(unet, "cross_attention_dim") == 1024 or _get(te, "hidden_size") == 1024:
            return "sd2"
        return "sd1"

    def detect_folder(self, folder: FolderInfo) -> int:
        return 1 if self.family(folder) == self.name else 0

    def detect_lora(self, parsed, tensors, metadata, sgm_used=False):
        found = family_evidence(parsed, tensors, metadata, sgm_used)
        return found if found is not None and found.architecture == self.name else None

    def detect_single_file(self, keys, header, metadata, path):
        from mindone_lora_plugin.architectures.sd.single_file import family

        return 1 if family(keys, header, path) == self.name else 0

    def write_single_file_folder(self, path, header, out, vae=None, config=None):
        from mindone_lora_plugin.architectures.sd.single_file import write_folder

        write_folder(self, path, header, out, vae, config)

    def single_file_sources(self, path, header, folder):
        from mindone_lora_plugin.architectures.sd.single_file import adapted_maps

        sources: dict[str, list] = {}
        for comp, mapping in adapted_maps(self, [k for k in header if k != "__metadata__"], folder).items():
            for name, (key, how) in mapping.items():
                sources.setdefault(key, []).append((comp, name, how))
        return sources

    # ------------------------------------------------------------------ targets and names

    def target_rules(self, component: str) -> dict[str, TargetRule]:
        if not self.has_component(component):
            return {}
        return dict(UNET_RULES if component == "unet" else TE_RULES)

    def kohya_prefix(self, component: str) -> str:
        if component == "text_encoder_2" and not self.has_component(component):
            raise LoraError(f"a {self.name} model has one text encoder; the LoRA's text_encoder_2 weights cannot be "
                            "written for it")
        return super().kohya_prefix(component)

    def base_config(self, denoiser_config):
        lpb = denoiser_config.get("layers_per_block")
        return {"layers_per_block": lpb} if lpb is not None else {}

    def resolve_name(self, component, name, flat, base_config=None):
        from mindone_lora_plugin.architectures.sd.keys import flat_to_dotted, is_known_path

        path = flat_to_dotted(name) if flat else name
        if path is None:
            return None
        if component == "unet" and sgm.is_sgm_path(path):
            try:
                path = sgm.sgm_to_diffusers(path, (base_config or {}).get("layers_per_block"))
            except ValueError:
                return None
        return path if is_known_path(component, path) else None

    def key_prefixes(self):
        return KEY_PREFIXES

    def name_layout(self, parsed):
        """SGM names (kohya SDXL files, ComfyUI ``diffusion_model.`` keys) and the layers per block they imply."""
        from mindone_lora_plugin.architectures.sd.keys import sgm_names

        paths = sgm_names(parsed)
        lpb = sgm.infer_layers_per_block(paths)
        return bool(paths), ({"layers_per_block": lpb} if lpb is not None else {})

    def base_aliases(self, component, paths, base_config=None):
        """The SGM spellings of the UNet's modules (kohya SDXL files, ComfyUI ``diffusion_model.`` keys)."""
        if component != "unet":
            return {}
        lpb = (base_config or {}).get("layers_per_block")
        paths = list(paths)
        attn_blocks = {int(m[1]) for p in paths for m in [_RE_UP_ATTN.match(p)] if m}
        out: dict[str, str] = {}
        for path in paths:
            try:
                s = sgm.diffusers_to_sgm(path, lpb, lambda b: b in attn_blocks)
            except ValueError:
                continue
            spellings = [s]
            if s.startswith("output_blocks.") and s.endswith(".conv"):  # an upsampler: inner index 1 or 2
                head, inner, _ = s.rsplit(".", 2)
                spellings.append(f"{head}.{'1' if inner == '2' else '2'}.conv")
            for spelling in spellings:
                out.setdefault(spelling, path)
        return out

    # ------------------------------------------------------------------ metadata

    def kohya_metadata(self, meta, v_prediction):
        out = super().kohya_metadata(meta, v_prediction)
        out["ss_v2"] = str(self.name == "sd2")
        return out


class SD1(StableDiffusion):
    name = "sd1"
    label = "SD1.x"
    description = "Stable Diffusion 1.x: UNet + CLIP ViT-L text encoder (768-wide cross-attention)"
    components = (UNET, TEXT_ENCODER)
    default_resolution = 512
    kohya_base_model_version = "sd_v1"
    kohya_version_family = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    modelspec_prefix = "stable-diffusion-v1"


class SD2(StableDiffusion):
    name = "sd2"
    label = "SD2.x"
    description = "Stable Diffusion 2.x: UNet + OpenCLIP ViT-H text encoder (1024-wide), epsilon or v-prediction"
    components = (UNET, TEXT_ENCODER)
    default_resolution = 768
    kohya_base_model_version = "sd_v2"
    kohya_version_family = "sd_v2"
    modelspec_architecture = "stable-diffusion-v2-512/lora"
    modelspec_prefix = "stable-diffusion-v2"

    def modelspec_name(self, v_prediction):
        return "stable-diffusion-v2-768-v/lora" if v_prediction else self.modelspec_architecture

    def modelspec_resolution(self, v_prediction):
        return "768x768" if v_prediction else "512x512"

    def detect_metadata(self, metadata):
        return super().detect_metadata(metadata) or ("ss_v2=True" if metadata.get("ss_v2") == "True" else "")


class SDXL(StableDiffusion):
    name = "sdxl"
    label = "SDXL"
    description = "SDXL: UNet + two CLIP text encoders (pooled and time_ids conditioning); kohya uses SGM names"
    components = (UNET, TEXT_ENCODER_1, TEXT_ENCODER_2)
    default_strategy = "sdxl"
    default_resolution = 1024
    kohya_base_model_version = "sdxl_base_v1-0"
    kohya_version_family = "sdxl_"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    modelspec_prefix = "stable-diffusion-xl"
    kohya_implementation = SGM_IMPLEMENTATION
    uses_time_ids = True
    vae_half_precision = False
    pipeline_class = "StableDiffusionXLPipeline"

    def kohya_name(self, component, path, base_config=None):
        """The UNet in kohya's SGM names (``lora_unet_input_blocks_4_1_proj_in``), the text encoders as diffusers."""
        if component == "unet":
            try:
                path = sgm.diffusers_to_sgm(path, (base_config or {}).get("layers_per_block"))
            except ValueError as e:
                raise LoraError(f"cannot name unet.{path} in kohya's SDXL (SGM) layout: {e}") from None
        return super().kohya_name(component, path, base_config)


FAMILY = (SDXL(), SD2(), SD1())  # the order metadata is looked at in


def family_evidence(parsed, tensors, metadata: dict[str, str], sgm_used: bool = False) -> Evidence | None:
    """The SD family's one judgement on a LoRA file (see the module docstring), or None when nothing points to SD."""
    comps = {pk.component for pk in parsed}
    if comps - SD_COMPONENTS:
        return None  # another family's components
    if any(pk.component == "text_encoder_2" and pk.name.startswith(_CLIP_ROOTS) for pk in parsed):
        return Evidence("sdxl", STRUCTURE, "it has weights for a second text encoder")
    cross, te_width = set(), set()
    deep = proj_conv = False
    for pk in parsed:
        if pk.role != "down":
            continue
        shape = getattr(tensors[pk.key], "shape", None)
        if shape is None and isinstance(tensors[pk.key], Mapping):  # a safetensors header entry
            shape = tensors[pk.key].get("shape", ())
        shape = tuple(shape or ())
        if len(shape) < 2:
            continue
        if pk.component == "unet":
            if _RE_CROSS.search(pk.name):
                cross.add(int(shape[1]))
            if _RE_DEEP.search(pk.name):
                deep = True
            if _RE_PROJ_IN.search(pk.name) and len(shape) == 4:
                proj_conv = True
        elif _RE_TE_IN.search(pk.name):
            te_width.add(int(shape[1]))
    known = {_CROSS[c] for c in cross if c in _CROSS}
    if len(known) == 1:
        return Evidence(known.pop(), SHAPES, f"its cross-attention is {max(cross)} wide")
    if 1024 in te_width and len(te_width) == 1:
        return Evidence("sd2", SHAPES, "its text encoder is 1024 wide")
    for check in (_kohya_version, _modelspec, _hint, _v2):
        for arch in FAMILY:
            why = check(arch, metadata)
            if why:
                return Evidence(arch.name, METADATA, why)
    if sgm_used:
        return Evidence("sdxl", HINT, "its UNet names are SGM names (input_blocks/middle_block/output_blocks)")
    if deep:
        return Evidence("sdxl", HINT, "its UNet blocks have more than one transformer layer")
    if proj_conv:
        return Evidence("sd1", HINT, "its proj_in/proj_out are 1x1 convolutions")
    if te_width == {768}:
        return Evidence("sd1", HINT, "its text encoder is 768 wide")
    return None


# header checks, in the order they decide (each: the reason, or "")
def _kohya_version(arch, metadata):
    version = (metadata.get("ss_base_model_version") or "").strip()
    return f"ss_base_model_version={version}" if version.startswith(arch.kohya_version_family) else ""


def _modelspec(arch, metadata):
    spec = (metadata.get("modelspec.architecture") or "").strip()
    return f"modelspec.architecture={spec}" if spec.startswith(arch.modelspec_prefix) else ""


def _hint(arch, metadata):
    hint = (metadata.get("mindone_lora.architecture") or "").strip()
    return f"mindone_lora.architecture={hint}" if hint == arch.name else ""


def _v2(arch, metadata):
    return "ss_v2=True" if arch.name == "sd2" and metadata.get("ss_v2") == "True" else ""
