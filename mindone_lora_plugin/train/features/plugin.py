"""The built-in ``features`` plugin: registers the training features of this package."""

from __future__ import annotations

from mindone_lora_plugin.hookspecs import hookimpl


@hookimpl
def mindone_lora_training_features():
    from mindone_lora_plugin.train.features.buckets import Buckets
    from mindone_lora_plugin.train.features.caches import Caches
    from mindone_lora_plugin.train.features.captions import CaptionAugmentation
    from mindone_lora_plugin.train.features.ema import EmaFeature
    from mindone_lora_plugin.train.features.masks import MaskedLoss
    from mindone_lora_plugin.train.features.sample_prompts import SamplePrompts
    from mindone_lora_plugin.train.features.save_cadence import SaveCadence
    from mindone_lora_plugin.train.features.validation_loss import ValidationLossFeature

    yield from (EmaFeature, ValidationLossFeature, Caches, SamplePrompts, SaveCadence, Buckets, CaptionAugmentation,
                MaskedLoss)
