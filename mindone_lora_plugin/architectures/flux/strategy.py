"""The ``flux`` strategy: LoRA on the FLUX.1 transformer; ``--train_text_encoder`` adds the CLIP and T5 encoders
(each switchable with ``--lora_components``)."""

from mindone_lora_plugin.strategies.base import LoraStrategy


class FluxStrategy(LoraStrategy):
    name = "flux"
    description = "FLUX.1: LoRA on the transformer; --train_text_encoder adds the CLIP and T5 text encoders"
    components = ("transformer", "text_encoder", "text_encoder_2")
    default_components = ("transformer",)
    architectures = ("flux",)
