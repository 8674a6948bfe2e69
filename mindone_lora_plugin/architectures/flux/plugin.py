"""The built-in ``flux`` plugin: the FLUX.1 architecture, its ``flux`` strategy and its training flags."""

from __future__ import annotations

from mindone_lora_plugin.hookspecs import hookimpl


@hookimpl
def mindone_lora_architectures():
    from mindone_lora_plugin.architectures.flux.arch import Flux

    yield Flux()


@hookimpl
def mindone_lora_strategies():
    from mindone_lora_plugin.architectures.flux.strategy import FluxStrategy

    yield FluxStrategy()


@hookimpl
def mindone_lora_add_arguments(parser):
    """FLUX.1 flow-matching flags (--timestep_sampling, --discrete_flow_shift, --guidance_scale, ...)."""
    from mindone_lora_plugin.architectures.flux.arguments import add_arguments

    add_arguments(parser)
