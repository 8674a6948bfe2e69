"""The ``unet`` strategy: LoRA on the UNet of SD1.x/2.x/SDXL (plus the SD1.x/2.x text encoder on request)."""

from mindone_lora_plugin.strategies.base import LoraStrategy


class UnetStrategy(LoraStrategy):
    name = "unet"
    description = "LoRA on the UNet (SD1.x/2.x/SDXL); --train_text_encoder adds the SD1.x/2.x text encoder"
    components = ("unet", "text_encoder")
    default_components = ("unet",)

    def adaptable_components(self, models):
        # where the architecture has its own default strategy (sdxl on SDXL), the text encoders are that one's business
        return ("unet",) if self.preferred_strategy(models) else self.components

