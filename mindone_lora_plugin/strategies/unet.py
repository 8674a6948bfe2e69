"""The ``unet`` strategy: LoRA on the UNet of SD1.x/2.x/SDXL (plus the SD1.x/2.x text encoder on request)."""

from mindone_lora_plugin.hookspecs import hookimpl
from mindone_lora_plugin.strategies.base import LoraStrategy


class UnetStrategy(LoraStrategy):
    name = "unet"
    description = "LoRA on the UNet (SD1.x/2.x/SDXL); --train_text_encoder adds the SD1.x/2.x text encoder"
    components = ("unet", "text_encoder")
    default_components = ("unet",)

    def adaptable_components(self, models):
        # SDXL's two text encoders are the sdxl strategy's business
        return ("unet",) if models.architecture == "sdxl" else self.components


@hookimpl
def mindone_lora_strategies():
    yield UnetStrategy()
