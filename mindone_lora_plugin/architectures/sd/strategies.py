"""SD's strategies: ``unet`` (the UNet of SD1.x/2.x/SDXL, plus the SD1.x/2.x text encoder on request),
``text_encoder`` (the CLIP text encoder of SD1.x/2.x only, kohya's text-encoder-only mode) and ``sdxl`` (the SDXL
UNet plus ``text_encoder`` and ``text_encoder_2``, each component switchable)."""

from mindone_lora_plugin.strategies.base import LoraStrategy


class UnetStrategy(LoraStrategy):
    name = "unet"
    description = "LoRA on the UNet (SD1.x/2.x/SDXL); --train_text_encoder adds the SD1.x/2.x text encoder"
    components = ("unet", "text_encoder")
    default_components = ("unet",)

    def adaptable_components(self, models):
        # where the architecture has its own default strategy (sdxl on SDXL), the text encoders are that one's business
        return ("unet",) if self.preferred_strategy(models) else self.components


class TextEncoderStrategy(LoraStrategy):
    name = "text_encoder"
    description = "LoRA on the CLIP text encoder of SD1.x/2.x only (q/k/v/out_proj; + fc1/fc2 with kohya)"
    components = ("text_encoder",)
    default_components = ("text_encoder",)
    architectures = ("sd1", "sd2")


class SdxlStrategy(LoraStrategy):
    name = "sdxl"
    description = "SDXL: LoRA on the UNet; --train_text_encoder adds both text encoders (each switchable)"
    components = ("unet", "text_encoder", "text_encoder_2")
    default_components = ("unet",)
    architectures = ("sdxl",)
