"""The ``sdxl`` strategy: SDXL UNet plus ``text_encoder`` and ``text_encoder_2``, each component switchable."""

from mindone_lora_plugin.strategies.base import LoraStrategy


class SdxlStrategy(LoraStrategy):
    name = "sdxl"
    description = "SDXL: LoRA on the UNet; --train_text_encoder adds both text encoders (each switchable)"
    components = ("unet", "text_encoder", "text_encoder_2")
    default_components = ("unet",)
    architectures = ("sdxl",)

