"""The built-in ``sd3`` plugin: the SD3/SD3.5 architecture, its ``sd3`` strategy and its training flags."""

from __future__ import annotations

from mindone_lora_plugin.hookspecs import hookimpl


@hookimpl
def mindone_lora_architectures():
    from mindone_lora_plugin.architectures.sd3.arch import SD3

    yield SD3()


@hookimpl
def mindone_lora_strategies():
    from mindone_lora_plugin.architectures.sd3.strategy import SD3Strategy

    yield SD3Strategy()


@hookimpl(trylast=True)
def mindone_lora_add_arguments(parser):
    """SD3 flow-matching flags (--weighting_scheme, --logit_mean, --logit_std, --mode_scale ...); called after the
    other families' (trylast), so the flags FLUX.1 shares keep its definition."""
    from mindone_lora_plugin.architectures.sd3.arguments import add_arguments

    add_arguments(parser)
