"""The ``sd3`` strategy: LoRA on the SD3 transformer; ``--train_text_encoder`` adds the two CLIP text encoders (as
diffusers' train_dreambooth_lora_sd3.py does; each switchable with ``--lora_components``)."""

from mindone_lora_plugin.strategies.base import LoraStrategy


class SD3Strategy(LoraStrategy):
    name = "sd3"
    description = "SD3/SD3.5: LoRA on the transformer; --train_text_encoder adds the CLIP-L and CLIP-G encoders"
    components = ("transformer", "text_encoder", "text_encoder_2")
    default_components = ("transformer",)
    architectures = ("sd3",)
