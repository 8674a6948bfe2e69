"""The ``text_encoder`` strategy: LoRA on the CLIP text encoder of SD1.x/2.x only (kohya's text-encoder-only mode)."""

from mindone_lora_plugin.strategies.base import LoraStrategy


class TextEncoderStrategy(LoraStrategy):
    name = "text_encoder"
    description = "LoRA on the CLIP text encoder of SD1.x/2.x only (q/k/v/out_proj; + fc1/fc2 with kohya)"
    components = ("text_encoder",)
    default_components = ("text_encoder",)
    architectures = ("sd1", "sd2")

