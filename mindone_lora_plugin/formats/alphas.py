"""A LoRA module's alpha when the file does not hold it as a tensor: PEFT configs (a diffusers file's
``lora_adapter_metadata`` header entry, ``adapter_config.json`` beside the file) and alpha tensors as numbers."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from mindone_lora_plugin.errors import LoraError


@dataclass
class AdapterConfig:
    """The part of a PEFT ``LoraConfig`` that decides each module's alpha."""

    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "AdapterConfig":
        try:
            return cls(r=int(d["r"]) if d.get("r") is not None else None,
                       lora_alpha=float(d["lora_alpha"]) if d.get("lora_alpha") is not None else None,
                       rank_pattern=dict(d.get("rank_pattern") or {}),
                       alpha_pattern={k: float(v) for k, v in (d.get("alpha_pattern") or {}).items()},
                       use_rslora=bool(d.get("use_rslora", False)))
        except (TypeError, ValueError, AttributeError):
            raise LoraError(f"{where} holds a malformed LoRA config (r/lora_alpha/alpha_pattern); the file is "
                            "corrupted or was written by an incompatible tool") from None

    def alpha_for(self, path: str, rank: int) -> float:
        """The alpha in this package's convention (scale = alpha / rank) that PEFT would apply to ``path``."""
        alpha = self.lora_alpha if self.lora_alpha is not None else float(self.r if self.r is not None else rank)
        key = pattern_key(self.alpha_pattern, path)
        if key is not None:
            alpha = float(self.alpha_pattern[key])
        if self.use_rslora:
            return alpha * math.sqrt(rank)
        return alpha


def pattern_key(patterns: dict, path: str):
    """The key of ``patterns`` PEFT matches for module ``path`` (``re.match(rf"(.*\\.)?({key})$")``, first wins)."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return key
        except re.error:
            if key == path or path.endswith("." + key):
                return key
    return None


def adapter_metadata(metadata: dict[str, str] | None, where: str) -> dict | None:
    """The JSON object in a diffusers ``lora_adapter_metadata`` header entry (None when absent)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError
    except ValueError:
        raise LoraError(f"{where} has a garbage 'lora_adapter_metadata' header entry (not a JSON object); the file "
                        "is corrupted") from None
    return data


def configs_from_metadata(metadata: dict[str, str], where: str) -> dict[str, AdapterConfig] | None:
    """Per-component configs from a diffusers ``lora_adapter_metadata`` header entry (None when absent)."""
    data = adapter_metadata(metadata, where)
    if data is None:
        return None
    per: dict[str, dict] = {}
    for k, v in data.items():
        for comp in _longest_first_components():
            if k.startswith(comp + "."):
                per.setdefault(comp, {})[k[len(comp) + 1:]] = v
                break
    return {comp: AdapterConfig.from_dict(d, f"{where} (lora_adapter_metadata, {comp})") for comp, d in per.items()}


def _longest_first_components() -> list[str]:
    from mindone_lora_plugin.architectures import known_components

    return sorted(known_components(), key=lambda c: (-len(c), c))


def adapter_config_next_to(path: str) -> AdapterConfig | None:
    """PEFT's ``adapter_config.json`` beside ``path`` (written by ``PeftModel.save_pretrained``), if any."""
    cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError
    except (OSError, ValueError):
        raise LoraError(f"cannot read {cfg}: not a JSON object; fix or remove it") from None
    return AdapterConfig.from_dict(data, cfg)


def alpha_value(x, key: str, where: str) -> float:
    """An alpha tensor (int or float; 0-dim or ``[1]``) as a float."""
    arr = np.asarray(x)
    if arr.size != 1:
        raise LoraError(f"{where}: alpha '{key}' has shape {list(arr.shape)}; an alpha is a single number, the file "
                        "is corrupted")
    value = float(arr.reshape(-1)[0].astype(np.float64)) if arr.dtype.kind in "fiub" else float(arr.reshape(-1)[0])
    if not math.isfinite(value):
        raise LoraError(f"{where}: alpha '{key}' is {value}; the file is corrupted")
    return value
