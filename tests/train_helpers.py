"""Shared by the training tests: parse and run `mindone-lora train`, and load written files back."""

from __future__ import annotations

import numpy as np


def parse(argv):
    from mindone_lora_plugin.cli import COMMANDS, build_parser

    return build_parser({"train": COMMANDS["train"]}).parse_args(["train"] + list(argv))


def train(argv):
    from mindone_lora_plugin.train.trainer import Trainer

    return Trainer(parse(argv)).run()


def load_back(model: str, files, strategy: str, trained_models):
    """Load each file into fresh models; return ``[(state, {output: max abs difference vs the trained models})]``."""
    import mindspore as ms

    from mindone_lora_plugin.demo.training import model_outputs
    from mindone_lora_plugin.models import load_models
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.plugins import get_plugin_manager

    pm = get_plugin_manager()
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        ref = model_outputs(trained_models)
        found = []
        for path in files:
            fresh = load_models(model)
            state = pm.load_weights(fresh, LoraOptions(strategy=strategy), path)
            got = model_outputs(fresh)
            found.append((state, {k: float(np.abs(got[k] - ref[k]).max()) for k in ref}))
        return found
    finally:
        ms.set_context(mode=mode)


def base_outputs_differ(model: str, trained_models) -> float:
    """Max abs difference between the base model's UNet output and the trained one's (the LoRA is not a no-op)."""
    import mindspore as ms

    from mindone_lora_plugin.demo.training import model_outputs
    from mindone_lora_plugin.models import load_models

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        return float(np.abs(model_outputs(load_models(model))["unet"] - model_outputs(trained_models)["unet"]).max())
    finally:
        ms.set_context(mode=mode)
