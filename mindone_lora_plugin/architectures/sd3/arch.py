"""The SD3 architecture object (``sd3``): SD3 Medium, SD3.5 Medium and SD3.5 Large (diffusers layout), LoRA on the
MMDiT transformer and optionally on the two CLIP text encoders, flow-matching training as diffusers'
train_dreambooth_lora_sd3.py does it, ``StableDiffusion3Pipeline`` for validation images and ``generate``.

Key names and file layouts: :mod:`.keys`/:mod:`.files`; presets :mod:`.targets`; the loss :mod:`.loss` with the noise
levels and weights of :mod:`.timesteps`; generation :mod:`.pipeline`. Training options read from the run's arguments
(defaults in :data:`.training.TRAINING_DEFAULTS`): ``weighting_scheme``, ``logit_mean``/``logit_std``, ``mode_scale``,
``precondition_outputs``, ``discrete_flow_shift`` (None: the scheduler's ``shift``).
"""

from __future__ import annotations

from mindone_lora_plugin.architectures.base import (
    METADATA,
    STRUCTURE,
    Architecture,
    Component,
    Evidence,
    FolderInfo,
    KeyPrefixes,
    TargetRule,
)
from mindone_lora_plugin.architectures.sd3 import files, keys, targets
from mindone_lora_plugin.architectures.sd3.training import SD3Training
from mindone_lora_plugin.errors import LoraError

TRANSFORMER = Component("transformer", "mindone.diffusers:SD3Transformer2DModel", "lora_unet",
                        class_names=("SD3Transformer2DModel",))
# no class_names for the encoders: a live CLIPTextModelWithProjection is SDXL's as much as SD3's
CLIP_L = Component("text_encoder", "mindone.transformers:CLIPTextModelWithProjection", "lora_te1",
                   kind="text_encoder", dtype_kw="dtype")
CLIP_G = Component("text_encoder_2", "mindone.transformers:CLIPTextModelWithProjection", "lora_te2",
                   kind="text_encoder", dtype_kw="dtype")
T5 = Component("text_encoder_3", "mindone.transformers:T5EncoderModel", "lora_te3", kind="text_encoder",
               optional=True, dtype_kw="dtype")

#: modelspec.architecture per variant (SAI ModelSpec's SD3 names)
MODELSPEC = {"3-medium": "stable-diffusion-3-medium/lora", "3.5-medium": "stable-diffusion-3.5-medium/lora",
             "3.5-large": "stable-diffusion-3.5-large/lora"}


def variant(config: dict | None) -> str:
    """``3-medium``, ``3.5-medium`` or ``3.5-large`` from a transformer config: SD3.5 has RMS q/k norms, its Medium
    dual-attention layers; Large is 38 layers deep."""
    config = config or {}
    if not config.get("qk_norm") and not config.get("dual_attention_layers"):
        return "3-medium"
    return "3.5-medium" if config.get("dual_attention_layers") else "3.5-large"


class SD3(SD3Training, Architecture):
    name = "sd3"
    label = "SD3"
    description = "SD3 Medium, SD3.5 Medium/Large: MMDiT transformer + CLIP-L, CLIP-G and T5 encoders, flow matching"
    components = (TRANSFORMER, CLIP_L, CLIP_G, T5)
    denoiser = "transformer"
    default_strategy = "sd3"
    default_resolution = 1024
    unused_flags = ("prediction_type", "snr_gamma", "debiased_estimation_loss", "timestep_sampling", "sigmoid_scale",
                    "guidance_scale")  # flow matching: no SNR, no epsilon; FLUX.1's sampling and guidance flags
    kohya_base_model_version = keys.KOHYA_BASE_MODEL_VERSION
    kohya_version_family = keys.KOHYA_BASE_MODEL_VERSION
    modelspec_architecture = MODELSPEC["3-medium"]
    modelspec_prefix = keys.MODELSPEC_FAMILY
    kohya_implementation = "https://github.com/Stability-AI/sd3-ref"
    kohya_network_module = "networks.lora_sd3"
    unfused_targets_hint = "to_out.0,to_add_out,ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"

    # ------------------------------------------------------------------ detection, targets, names

    def detect_folder(self, folder: FolderInfo) -> int:
        transformer = folder.configs.get("transformer") or {}
        if (folder.class_name.startswith("StableDiffusion3")
                or transformer.get("_class_name") == "SD3Transformer2DModel"):
            return 3
        return 0

    def detect_lora(self, parsed, tensors, metadata, sgm_used=False):
        names = [getattr(pk, "key", pk) for pk in parsed]
        why = keys.detect_keys(names)
        if why:  # above FLUX's evidence: joint_blocks/attn2/a third text encoder are SD3's alone
            return Evidence(self.name, STRUCTURE + 2, why)
        why = keys.detect_metadata(metadata or {})
        return Evidence(self.name, STRUCTURE + 2 if why else METADATA, why) if why else None

    def detect_metadata(self, metadata) -> str:
        return keys.detect_metadata(metadata or {})

    def target_rules(self, component: str) -> dict[str, TargetRule]:
        return dict(targets.RULES.get(component, {}))

    def base_config(self, denoiser_config: dict) -> dict:
        return {"variant": variant(denoiser_config)}

    def kohya_name(self, component: str, path: str, base_config=None) -> str:
        try:
            return keys.kohya_module_name(component, path)
        except (ValueError, KeyError):
            raise LoraError(f"{component}.{path} has no kohya name in SD3's layout") from None

    def resolve_name(self, component: str, name: str, flat: bool, base_config=None) -> str | None:
        if component not in keys.PATH_RES:
            return None
        if component == "transformer" and keys.mmdit_parts(name) is not None:
            parts = keys.mmdit_parts(name)
            return parts[0] if len(parts) == 1 and not keys.SWAPPED_WHEN_PRE_ONLY.fullmatch(name) \
                and name != keys.SWAPPED else None
        return keys.diffusers_path(component, name)

    def key_prefixes(self) -> KeyPrefixes:
        """None for the core's parser: SD3 files are read whole by :meth:`read_file` (:mod:`.files` parses every SD3
        naming), so SD3 casts no vote on what a shared prefix (``lora_unet_``) means in another family's file."""
        return KeyPrefixes(text_encoders=self.text_encoders())

    def fused_file_module(self, component: str, path: str, formats) -> tuple[str, tuple[str, ...]] | None:
        """``(kohya module name, the paths it fuses)`` of q/k/v when one of ``formats`` is the kohya layout (the
        MMDiT ``qkv``), else None: LoHa/LoKr there are refused before training, as for FLUX.1."""
        if component != "transformer" or "kohya" not in formats:
            return None
        found = keys.mmdit_name(path)
        if found is None or len(found[2]) < 2:
            return None
        return f"{keys.KOHYA_PREFIXES['transformer']}_{found[0]}", tuple(f"{component}.{p}" for p in found[2])

    # ------------------------------------------------------------------ files

    def read_file(self, tensors, metadata, base, where):
        return files.read_file(tensors, metadata, base, where)

    def kohya_modules(self, state):
        return files.kohya_modules(state)

    def count_file_keys(self, names, kohya):
        return files.count_file_keys(names, kohya)

    def modelspec_for(self, state) -> str:
        found = (getattr(state, "base_config", None) or {}).get("variant") if state is not None else None
        return MODELSPEC.get(found or "", self.modelspec_architecture)

    def modelspec(self, state, meta, title, implementation, v_prediction):
        spec = super().modelspec(state, meta, title, implementation, v_prediction)
        spec["modelspec.architecture"] = self.modelspec_for(state)
        return spec

    def kohya_metadata(self, meta, v_prediction):
        return {"ss_base_model_version": keys.KOHYA_BASE_MODEL_VERSION, "ss_v2": "False"}
