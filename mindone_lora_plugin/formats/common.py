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
    """The MUST keys of SAI ModelSpec 1.0.1 for a LoRA for the architecture ``arch`` (its
    :meth:`~mindone_lora_plugin.architectures.base.Architecture.modelspec_name` and default resolution), keeping the
    date/resolution already in ``meta``."""
    from mindone_lora_plugin.architectures import get_architecture

    family = get_architecture(arch)
    res = (meta.get("modelspec.resolution") or _resolution_from_ss(meta.get("ss_resolution", ""))
           or family.modelspec_resolution(v_pred))
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": family.modelspec_name(v_pred),
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


def writer_architecture(state: LoraState, what: str, required: bool = True) -> str | None:
    """The architecture a writer must know: the state's, else the only installed one that has all its components
    (SDXL for a LoRA with a second text encoder). When it cannot be told: an error, or None unless ``required``."""
    from mindone_lora_plugin.architectures import find_architecture, installed_architectures

    comps = set(state.components)
    fits = {n: a for n, a in installed_architectures().items() if comps <= set(a.component_names())}
    arch = find_architecture(state.architecture)
    if arch is not None:
        missing = sorted(comps - set(arch.component_names()))
        if missing:
            owners = " / ".join(a.label for a in fits.values()) or "no installed architecture"
            raise LoraError(f"the LoRA has {missing[0]} weights but is marked {state.architecture}; only {owners} has "
                            f"a {missing[0]}")
        return arch.name
    if len(fits) == 1:
        return next(iter(fits))
    if not required:
        return None
    labels = [a.label for a in (fits or installed_architectures()).values()]
    choices = ", ".join(labels[:-1]) + (" or " if len(labels) > 1 else "") + labels[-1] if labels else "any model"
    raise LoraError(f"cannot tell whether this LoRA is for {choices}, and {what} depends on it; pass "
                    "--base MODEL_DIR (the base model folder)")
