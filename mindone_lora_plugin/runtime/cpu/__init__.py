"""The CPU backend: mindone on MindSpore's CPU target.

Its replacements are in :mod:`~mindone_lora_plugin.runtime.cpu.kernels`, ``rng``, ``attention`` and ``transformer``,
installed by :mod:`~mindone_lora_plugin.runtime.cpu.install`: mindone 0.5.0's UNet, VAE and CLIP
text encoders use ``mindspore.mint`` primitives that have no kernel on MindSpore's CPU target, and the backend
replaces them with CPU-capable equivalents. Ascend and GPU run mindone as shipped. Which MindSpore versions it runs
on is :data:`mindone_lora_plugin.runtime.process.SUPPORTED`; within them, the backend asks the running MindSpore what it
needs by feature (:data:`mindone_lora_plugin.runtime.cpu.install.FEATURES`).

Importing this package does not import MindSpore; :func:`activate` does, and only when it has something to install.
"""

from __future__ import annotations

import os
import threading

__all__ = ["activate", "is_active", "ENV_SWITCH"]

#: ``MINDONE_LORA_CPU_BACKEND=0`` (or ``false``/``no``/``off``) keeps the CPU backend off.
ENV_SWITCH = "MINDONE_LORA_CPU_BACKEND"

_lock = threading.Lock()
_active = False


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "false", "no", "off")


def activate(device_target: str | None = None) -> bool:
    """Install the CPU backend when the device target is CPU; return whether it is active.

    ``device_target`` defaults to MindSpore's current ``device_target``. On any other target (Ascend, GPU) nothing is
    installed and ``False`` is returned; so it is with ``MINDONE_LORA_CPU_BACKEND=0``. Nothing in MindSpore's context
    is changed. Installing is idempotent and takes milliseconds: call it before building models (mindone modules
    imported later are patched as they are imported).
    """
    global _active
    if _switched_off():
        return False
    if device_target is None:
        import mindspore as ms

        device_target = ms.get_context("device_target")
    if str(device_target).strip().upper() != "CPU":
        return False
    with _lock:
        if not _active:
            from mindone_lora_plugin.runtime.cpu import install

            install.install()
            _active = True
    return True


def is_active() -> bool:
    """Whether the CPU backend has been installed in this process."""
    return _active
