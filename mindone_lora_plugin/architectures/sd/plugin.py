"""The built-in ``sd`` plugin: the SD1.x, SD2.x and SDXL architectures and their strategies."""

from __future__ import annotations

from mindone_lora_plugin.hookspecs import hookimpl


@hookimpl
def mindone_lora_architectures():
    from mindone_lora_plugin.architectures.sd.arch import SD1, SD2, SDXL

    yield from (SD1(), SD2(), SDXL())


@hookimpl
def mindone_lora_strategies():
    """``unet``, ``text_encoder`` (SD1.x/2.x) and ``sdxl``."""
    from mindone_lora_plugin.architectures.sd.strategies import SdxlStrategy, TextEncoderStrategy, UnetStrategy

    yield from (UnetStrategy(), TextEncoderStrategy(), SdxlStrategy())
