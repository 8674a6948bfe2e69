"""LoRA specs (``FILE[:WEIGHT]``) and loading weighted LoRAs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.compose._constants import _PATH_LIKE_SUFFIXES
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.state import LoraState


@dataclass
class WeightedLora:
    """A LoRA and the weight it is used with. ``path``/``format`` say where it was read from (``None`` if built)."""

    state: LoraState
    weight: float = 1.0
    path: str | None = None
    format: str | None = None

    @property
    def name(self) -> str:
        """A short display name: the file name without extension (the folder name for a diffusers folder)."""
        if not self.path:
            return "lora"
        stem = os.path.splitext(os.path.basename(os.path.normpath(self.path)))[0]
        if stem == "pytorch_lora_weights":
            stem = os.path.basename(os.path.dirname(os.path.abspath(self.path))) or stem
        return stem

    def describe(self) -> dict:
        return {"file": self.path, "name": self.name, "weight": self.weight, "format": self.format,
                "modules": len(self.state)}


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``"FILE"`` → ``(FILE, 1.0)``; ``"FILE:WEIGHT"`` → ``(FILE, WEIGHT)``.

    Only the last colon can separate a weight, so paths with colons work: a spec that names an existing file or
    folder is taken whole. Otherwise what follows the last colon must be a finite number (it may be negative); when it
    is not, the error names it — unless it looks like part of a path, in which case the file does not exist.
    """
    spec = str(spec)
    if not spec.strip():
        raise LoraError("empty --lora value: give FILE or FILE:WEIGHT, e.g. style.safetensors:0.7")
    if os.path.exists(spec) or ":" not in spec:
        return spec, 1.0
    path, raw = spec.rsplit(":", 1)
    try:
        weight = float(raw)
    except ValueError:
        if "/" in raw or os.sep in raw or raw.lower().endswith(_PATH_LIKE_SUFFIXES):
            raise LoraError(f"LoRA {spec} does not exist") from None
        raise LoraError(f"LoRA spec '{spec}': weight '{raw}' is not a number; write FILE:WEIGHT with a number such "
                        f"as 0.7 or -0.5") from None
    if not math.isfinite(weight):
        raise LoraError(f"LoRA spec '{spec}': weight '{raw}' is not a finite number")
    if not path:
        raise LoraError(f"LoRA spec '{spec}' has no file before the weight: write FILE:WEIGHT")
    return path, weight


def load_loras(specs, base: BaseModelInfo | str | None = None, formats=None) -> list[WeightedLora]:
    """Read every LoRA of ``specs`` (``"FILE[:WEIGHT]"`` strings, ``(path, weight)`` pairs or :class:`WeightedLora`).

    Any format the plugin manager knows is read (this package's, kohya/A1111/civitai, diffusers/PEFT). With ``base``
    (a :class:`BaseModelInfo` or a model folder) every module and shape is checked against the base model, and a LoRA
    for another architecture is refused.
    """
    from mindone_lora_plugin.formats.reader import open_lora

    if isinstance(base, str):
        base = BaseModelInfo.from_folder(base)
    known = _formats(formats)
    out = []
    for spec in specs:
        if isinstance(spec, WeightedLora):
            out.append(spec)
            continue
        path, weight = parse_lora_spec(spec) if isinstance(spec, str) else (str(spec[0]), float(spec[1]))
        lf = open_lora(path, base=base, formats=known)
        if base is not None:
            base.check_shapes(lf.state)
        if not len(lf.state):
            raise LoraError(f"{path} holds no LoRA modules")
        out.append(WeightedLora(lf.state, weight, path, lf.format.name))
    return out


def _formats(formats=None) -> dict:
    from mindone_lora_plugin.commands.convert import available_formats

    return available_formats(formats)


def _pairs(loras) -> list[tuple[LoraState, float]]:
    """``loras`` as ``[(state, weight)]``: accepts WeightedLora, (state, weight) pairs and bare LoraStates."""
    if isinstance(loras, (LoraState, WeightedLora)):
        loras = [loras]
    out = []
    for item in loras:
        if isinstance(item, WeightedLora):
            out.append((item.state, float(item.weight)))
        elif isinstance(item, LoraState):
            out.append((item, 1.0))
        else:
            state, weight = item
            out.append((state, float(weight)))
    return out


def _arch_of(pairs) -> str | None:
    from mindone_lora_plugin.formats.common import writer_architecture

    archs = {s.architecture or writer_architecture(s, "", required=False) for s, _ in pairs} - {None}
    if len(archs) > 1:
        raise LoraError(f"the LoRAs are for different architectures ({', '.join(sorted(archs))}); use LoRAs made for "
                        f"the same base model")
    return archs.pop() if archs else None
