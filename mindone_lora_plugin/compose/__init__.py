"""Use trained LoRAs: several weighted LoRAs applied at once, fused into a model, or combined into one LoRA file.

This is the Python API behind ``mindone-lora generate`` and ``mindone-lora merge`` (see ``docs/using-loras.md``)::

    from mindone_lora_plugin import compose

    loras = compose.load_loras(["style.safetensors:0.8", "subject.safetensors"], base="./sd15")
    pipe = compose.load_pipeline("./sd15", loras)                  # one PEFT adapter per LoRA, weighted
    images = compose.generate_images(pipe, "a photo of sks dog", num_images=4, steps=30, seed=1)

    compose.merge_into_folder("./sd15", loras, "./sd15-merged")    # a full diffusers folder, LoRAs fused in
    one = compose.concat_loras(loras)                              # one LoRA with the same effect (ranks concatenated)

A LoRA's weight multiplies its effect: with weight ``w`` a module's weight becomes ``W + w * scale * up @ down``
(``scale = alpha / rank``). Weights may be negative or zero. Everything that computes weights here is numpy in float64
and exact up to the final cast; only :func:`apply_loras`, :func:`merge_into_models`, :func:`load_pipeline` and
:func:`generate_images` touch MindSpore (imported when called).
"""

from mindone_lora_plugin.compose._constants import ADAPTER_PREFIX, MERGE_RECORD
from mindone_lora_plugin.compose.files import pick_format, write_concatenated, write_lora
from mindone_lora_plugin.compose.folders import FolderWeights, merge_into_folder, output_is_taken
from mindone_lora_plugin.compose.generation import (
                                                    GeneratedImage,
                                                    generate_images,
                                                    image_metadata,
                                                    load_pipeline,
                                                    pipeline_models,
                                                    save_png,
)
from mindone_lora_plugin.compose.live import active_deltas, apply_loras, merge_into_models, set_lora_weights
from mindone_lora_plugin.compose.maths import combined_deltas, concat_loras, module_delta, svd_reduce
from mindone_lora_plugin.compose.specs import WeightedLora, load_loras, parse_lora_spec

__all__ = [
    'ADAPTER_PREFIX', 'MERGE_RECORD', 'WeightedLora', 'load_loras', 'parse_lora_spec', 'combined_deltas',
    'concat_loras', 'module_delta', 'active_deltas', 'apply_loras', 'merge_into_models', 'set_lora_weights',
    'merge_into_folder', 'output_is_taken', 'FolderWeights', 'svd_reduce', 'pick_format', 'write_concatenated',
    'write_lora', 'GeneratedImage',
    'generate_images', 'image_metadata', 'load_pipeline', 'pipeline_models', 'save_png'
]
