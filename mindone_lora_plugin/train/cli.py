"""``mindone-lora train`` (also ``python -m mindone_lora_plugin.train``)."""

from __future__ import annotations

import argparse
import logging
import sys


def add_parser(subparsers):
    from mindone_lora_plugin.train.arguments import add_plugin_arguments, add_train_arguments

    p = subparsers.add_parser(
        "train", help="train a LoRA for an SD1.x/2.x or SDXL model",
        description="Train a LoRA for a Stable Diffusion 1.x/2.x or SDXL model in diffusers folder layout. Flags keep "
                    "the names of mindone's train_text_to_image_lora.py; --demo trains the built-in tiny model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(p)
    add_plugin_arguments(p)
    return p


def run(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.demo:
        from mindone_lora_plugin.train.demo import run_demo

        return run_demo(args)
    from mindone_lora_plugin.train.trainer import Trainer

    from mindone_lora_plugin.train.events import record_failure

    try:
        Trainer(args).run()
    except BaseException as e:  # noqa: B902 - recorded for watchers (train_log.jsonl), then re-raised
        record_failure(args.output_dir, e)
        raise
    return 0


def main(argv=None) -> int:
    from mindone_lora_plugin.cli import main as cli_main

    return cli_main(["train"] + list(sys.argv[1:] if argv is None else argv))
