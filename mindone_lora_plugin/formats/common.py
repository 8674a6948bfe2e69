"""What the built-in formats share: reading any plain-LoRA safetensors file, save dtypes, and header metadata."""

from __future__ import annotations

import datetime
import re

import numpy as np

from mindone_lora_plugin.basemodel import BaseModelInfo
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.dtypes import SAVE_DTYPES as DTYPES  # noqa: F401  (re-exported)
from mindone_lora_plugin.dtypes import as_dtype as cast  # noqa: F401  (re-exported for the writers)
from mindone_lora_plugin.dtypes import numpy_dtype as resolve_dtype  # noqa: F401  (re-exported for the writers)
from mindone_lora_plugin.state import LoraState

# header entries that describe one particular file and must not be copied into another
FILE_SPECIFIC_KEYS = frozenset({"format", "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash",
                                "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                                "modelspec.hash_sha256"})

MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                  "sd2_v": "stable-diffusion-v2-768-v/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def merged_metadata(state: LoraState, metadata: dict[str, str] | None) -> dict[str, str]:
    """The state's metadata overlaid with ``metadata``, as strings, without entries that describe another file."""
    out = {}
    for src in (state.metadata or {}, metadata or {}):
        for k, v in src.items():
            if k in FILE_SPECIFIC_KEYS:
                continue
            out[str(k)] = v if isinstance(v, str) else str(v)
    return out


def is_v_prediction(meta: dict[str, str]) -> bool:
    return (meta.get("ss_v_parameterization") == "True" or meta.get("modelspec.prediction_type") == "v"
            or meta.get("ss_base_model_version", "").endswith("_v"))


def names_for(state: LoraState, metadata: dict[str, str] | None, output_name: str) -> tuple[str, str]:
    """``(output name, title)`` for a file: an explicit ``output_name`` wins; with the default ``"lora"`` the names the
    LoRA already carries are kept. An explicit ``modelspec.title`` in ``metadata`` wins for the title."""
    old = state.metadata or {}
    if output_name == "lora":
        output_name = (metadata or {}).get("ss_output_name") or old.get("ss_output_name") or output_name
        title = old.get("modelspec.title") or output_name
    else:
        title = output_name
    return output_name, (metadata or {}).get("modelspec.title") or title


def modelspec(arch: str, meta: dict[str, str], title: str, implementation: str, v_pred: bool) -> dict[str, str]:
    """The MUST keys of SAI ModelSpec 1.0.1 for a LoRA, keeping the date/resolution already in ``meta``."""
    if arch == "sdxl":
        default_res = "1024x1024"
    elif arch == "sd2" and v_pred:
        default_res = "768x768"
    else:
        default_res = "512x512"
    res = meta.get("modelspec.resolution") or _resolution_from_ss(meta.get("ss_resolution", "")) or default_res
    arch_key = "sd2_v" if arch == "sd2" and v_pred else arch
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCH[arch_key],
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": res,
        "modelspec.date": meta.get("modelspec.date") or datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }


def _resolution_from_ss(value: str) -> str | None:
    nums = re.findall(r"\d+", value or "")
    if len(nums) == 1:
        return f"{nums[0]}x{nums[0]}"
    if len(nums) == 2:
        return f"{nums[0]}x{nums[1]}"
    return None


def read_plain_lora(path: str, base: BaseModelInfo | None = None):
    """Read any plain-LoRA safetensors file: ``(LoraState, ReadInfo)``. Refuses pickles and non-plain variants."""
    from mindone_lora_plugin import safetensors_io
    from mindone_lora_plugin.formats.names import build_state
    from mindone_lora_plugin.formats.variants import refuse_variants

    header, _ = safetensors_io.read_header(path)
    metadata = dict(header.get("__metadata__") or {})
    keys = [k for k in header if k != "__metadata__"]
    refuse_variants(keys, metadata, where=path)
    tensors, metadata = safetensors_io.load(path)
    from mindone_lora_plugin.algorithms.base import check_finite

    check_finite(tensors, path)
    flux = _flux_read(tensors, metadata, base, path)
    if flux is not None:
        return flux
    return build_state(tensors, metadata, base=base, path=path, where=path)


def _flux_read(tensors: dict, metadata: dict[str, str], base: BaseModelInfo | None, where: str):
    """``(LoraState, ReadInfo)`` when the file or the base model is FLUX.1 (:mod:`..architectures.flux.files`), after
    refusing a FLUX file for an SD base model and the reverse; None for an SD file and base."""
    from mindone_lora_plugin.architectures.flux import files as flux_files
    from mindone_lora_plugin.architectures.flux.keys import detect

    why = detect(tensors.keys(), metadata)
    if not why and (base is None or base.architecture != flux_files.ARCHITECTURE):
        return None
    sd_guess = ""
    if not why:  # a FLUX base model: text-encoder-only LoRAs have no FLUX-only names, but their names still fit
        try:
            flux_files.parse_keys(list(tensors), where)
            why = "its keys fit FLUX.1's modules"
        except LoraError:
            pass
    if not why:
        from mindone_lora_plugin.formats.arch import guess_architecture
        from mindone_lora_plugin.formats.names import parse_key

        parsed = [pk for pk in map(parse_key, tensors) if pk is not None]
        sd_guess = guess_architecture(parsed, tensors, metadata)[0] or "" if parsed else ""
    flux_files.refuse_mismatch(why, base, where, sd_guess)
    return flux_files.build_state(tensors, metadata, base, where)


def writer_architecture(state: LoraState, what: str) -> str:
    """The architecture a writer must know; SDXL when a second text encoder is present."""
    if "text_encoder_2" in state.components:
        if state.architecture not in (None, "sdxl"):
            raise LoraError(f"the LoRA has text_encoder_2 weights but is marked {state.architecture}; only SDXL has "
                            "a second text encoder")
        return "sdxl"
    if state.architecture in ("sd1", "sd2", "sdxl"):
        return state.architecture
    raise LoraError(f"cannot tell whether this LoRA is for SD1.x, SD2.x or SDXL, and {what} depends on it; pass "
                    "--base MODEL_DIR (the base model folder)")
