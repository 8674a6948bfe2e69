"""Which architecture a LoRA file was made for, and refusing a LoRA made for another one than the base model.

Every installed architecture looks at the file
(:meth:`~mindone_lora_plugin.architectures.base.Architecture.detect_lora`: parsed keys, tensor shapes, header metadata)
and the strongest evidence wins (see :func:`mindone_lora_plugin.architectures.detect_lora`; the SD family's own rules
are in :mod:`mindone_lora_plugin.architectures.sd`). Only strong evidence (keys, shapes, metadata) makes a LoRA refused
for a base model of another architecture; weak hints are shown by ``inspect`` and decide names only when nothing else is
known.
"""

from __future__ import annotations

from mindone_lora_plugin.architectures import detect_lora, find_architecture, label
from mindone_lora_plugin.errors import LoraError


def guess_architecture(parsed, tensors, metadata: dict[str, str], sgm_used: bool = False
                       ) -> tuple[str | None, bool, str]:
    """``(architecture or None, strong, reason)`` for a file's parsed keys."""
    found = detect_lora(parsed, tensors, metadata, sgm_used)
    if found is None:
        return None, False, ""
    return found.architecture, found.strong, found.reason


def check_architecture(guess: str | None, strong: bool, why: str, base, where: str) -> None:
    """Refuse a LoRA whose strong architecture evidence contradicts the base model's architecture."""
    if guess is None or not strong or find_architecture(base.architecture) is None or guess == base.architecture:
        return
    src = f" {base.source}" if base.source else ""
    raise LoraError(f"{where} is a LoRA for {label(guess)} ({why}) but the base model{src} is "
                    f"{label(base.architecture)}; use a LoRA made for {label(base.architecture)} or the matching "
                    "base model")
