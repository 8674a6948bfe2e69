"""Which Stable Diffusion architecture a LoRA file was made for: ``sd1``, ``sd2``, ``sdxl`` or unknown (None).

Evidence, strongest first:

1. weights for a second text encoder (``lora_te2_``, ``text_encoder_2.``) → SDXL;
2. the cross-attention width (input width of ``attn2.to_k``/``to_v``): 2048 → SDXL, 1024 → SD2.x, 768 → SD1.x;
   a 1024-wide text encoder → SD2.x;
3. header metadata: ``ss_base_model_version`` (``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``), ``ss_v2``,
   ``modelspec.architecture`` (and ``mindone_lora.architecture``, which some plugins write);
4. weaker hints from the module names: SGM block names or more than one transformer layer per block → SDXL; a
   1×1-conv ``proj_in`` (SD1.x projections are convs) → SD1.x; a 768-wide text encoder → SD1.x.

Only the strong evidence (1–3) makes a LoRA refused for a base model of another architecture; the weak hints are
shown by ``inspect`` and decide names only when nothing else is known.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mindone_lora_plugin.errors import LoraError

LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
_CROSS = {2048: "sdxl", 1024: "sd2", 768: "sd1"}
_RE_CROSS = re.compile(r"attn2[._]to_[kv]$")
_RE_TE_IN = re.compile(r"(?:q_proj|k_proj|v_proj|fc1)$|to_[qkv]_lora$|to_[qkv]$")
_RE_DEEP = re.compile(r"transformer_blocks[._]([1-9]\d*)(?:[._]|$)")
_RE_PROJ_IN = re.compile(r"(?:^|[._])proj_in$")


def label(arch: str | None) -> str:
    return LABELS.get(arch or "", "an unknown architecture")


def from_metadata(metadata: dict[str, str]) -> tuple[str | None, str]:
    version = (metadata.get("ss_base_model_version") or "").strip()
    if version.startswith("sdxl"):
        return "sdxl", f"ss_base_model_version={version}"
    if version.startswith("sd_v2"):
        return "sd2", f"ss_base_model_version={version}"
    if version.startswith("sd_v1"):
        return "sd1", f"ss_base_model_version={version}"
    spec = (metadata.get("modelspec.architecture") or "").strip()
    if spec.startswith("stable-diffusion-xl"):
        return "sdxl", f"modelspec.architecture={spec}"
    if spec.startswith("stable-diffusion-v2"):
        return "sd2", f"modelspec.architecture={spec}"
    if spec.startswith("stable-diffusion-v1"):
        return "sd1", f"modelspec.architecture={spec}"
    hint = (metadata.get("mindone_lora.architecture") or "").strip()
    if hint in LABELS:
        return hint, f"mindone_lora.architecture={hint}"
    if metadata.get("ss_v2") == "True":
        return "sd2", "ss_v2=True"
    return None, ""


def from_configs(unet_config, text_encoder_config=None, *, has_text_encoder_2: bool = False,
                 class_name: str = "") -> str:
    """The architecture of a base model from its component configs (dicts or config objects; None when absent).

    A second text encoder, an SDXL pipeline class or the UNet's ``text_time`` added embedding → SDXL; a 1024-wide
    cross-attention or text encoder → SD2.x; otherwise SD1.x. Used for model folders and for live models alike.
    """
    if has_text_encoder_2 or "XL" in str(class_name or "") or _get(unet_config, "addition_embed_type") == "text_time":
        return "sdxl"
    if _get(unet_config, "cross_attention_dim") == 1024 or _get(text_encoder_config, "hidden_size") == 1024:
        return "sd2"
    return "sd1"


def _get(config, key: str):
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def guess_architecture(parsed, tensors, metadata: dict[str, str], sgm_used: bool = False
                       ) -> tuple[str | None, bool, str]:
    """``(architecture or None, strong, reason)`` for a file's parsed keys (see the module docstring)."""
    comps = {pk.component for pk in parsed}
    if "text_encoder_2" in comps:
        return "sdxl", True, "it has weights for a second text encoder"
    cross, te_width = set(), set()
    deep = proj_conv = False
    for pk in parsed:
        if pk.role != "down":
            continue
        shape = getattr(tensors[pk.key], "shape", ())
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
        arch = known.pop()
        return arch, True, f"its cross-attention is {max(cross)} wide"
    if 1024 in te_width and len(te_width) == 1:
        return "sd2", True, "its text encoder is 1024 wide"
    arch, why = from_metadata(metadata)
    if arch:
        return arch, True, why
    if sgm_used:
        return "sdxl", False, "its UNet names are SGM names (input_blocks/middle_block/output_blocks)"
    if deep:
        return "sdxl", False, "its UNet blocks have more than one transformer layer"
    if proj_conv:
        return "sd1", False, "its proj_in/proj_out are 1x1 convolutions"
    if te_width == {768}:
        return "sd1", False, "its text encoder is 768 wide"
    return None, False, ""


def check_architecture(guess: str | None, strong: bool, why: str, base, where: str) -> None:
    """Refuse a LoRA whose strong architecture evidence contradicts the base model's architecture."""
    if guess is None or not strong or base.architecture not in LABELS or guess == base.architecture:
        return
    src = f" {base.source}" if base.source else ""
    raise LoraError(f"{where} is a LoRA for {label(guess)} ({why}) but the base model{src} is "
                    f"{label(base.architecture)}; use a LoRA made for {label(base.architecture)} or the matching "
                    "base model")
