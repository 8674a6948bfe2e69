"""Adapter algorithms (plain LoRA built in; LoHa/LoKr from ``mindone-lora-lycoris``): see :mod:`.base`."""

from __future__ import annotations


def get_algorithm(name: str):
    """The installed algorithm called ``name`` (through the process-wide plugin manager)."""
    from mindone_lora_plugin.plugins import get_plugin_manager

    return get_plugin_manager().get_algorithm(name)


def installed_algorithms() -> dict:
    """Name → algorithm object for every installed algorithm."""
    from mindone_lora_plugin.plugins import get_plugin_manager

    return get_plugin_manager().algorithms()
