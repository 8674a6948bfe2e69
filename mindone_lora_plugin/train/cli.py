"""``mindone-lora train`` (also ``python -m mindone_lora_plugin.train``)."""

from __future__ import annotations

import argparse
import logging


def add_parser(subparsers):
    from mindone_lora_plugin.train.flags.training import add_plugin_arguments, add_train_arguments

    p = subparsers.add_parser(
        "train", help="train a LoRA for an SD1.x/2.x, SDXL or FLUX.1 model",
        description="Train a LoRA for a Stable Diffusion 1.x/2.x, SDXL or FLUX.1 model in diffusers folder layout. "
                    "Flags keep the names of mindone's train_text_to_image_lora.py; --demo trains a built-in tiny "
                    "model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(p)
    add_plugin_arguments(p)
    from mindone_lora_plugin.train.flags.config_file import install

    install(p)  # --config_file: the file's values become defaults, the command line overrides them
    return p


def run(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.output_config:
        return _output_config(args)
    if args.demo:
        from mindone_lora_plugin.demo.training import run_demo

        return run_demo(args)
    from mindone_lora_plugin.train.events import record_failure
    from mindone_lora_plugin.train.trainer import Trainer

    try:
        Trainer(args).run()
    except BaseException as e:  # noqa: B902 - recorded for watchers (train_log.jsonl), then re-raised
        record_failure(args.output_dir, e)
        raise
    return 0


def _output_config(args) -> int:
    from mindone_lora_plugin.errors import LoraError
    from mindone_lora_plugin.plugins import get_plugin_manager
    from mindone_lora_plugin.train.features.active import needs
    from mindone_lora_plugin.train.flags.config_file import write_config
    from mindone_lora_plugin.train.flags.rules import validate_train_args

    if not args.config_file:
        raise LoraError("--output_config needs --config_file PATH: the .toml file to write (kohya's convention)")
    validate_train_args(args, needs(get_plugin_manager()))
    print(f"wrote {write_config(args, args.config_file)}", flush=True)
    return 0
