"""Flags for kohya-style datasets and config files (kohya's names). Buckets, caches, caption augmentation and the
masked loss are training features with their own flags (:mod:`mindone_lora_plugin.train.features`)."""

from __future__ import annotations

import argparse


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "kohya-style datasets",
        "--train_data_dir may also be a folder of <repeats>_<name>/ sub-folders (e.g. 10_sks dog/) of images with "
        "caption files; an image without one is captioned by the folder name.")
    g.add_argument("--caption_extension", type=str, default=".txt",
                   help="caption file beside each image in kohya folders (kohya's own default is .caption)")
    g.add_argument("--reg_data_dir", type=str, default=None,
                   help="regularisation images in <repeats>_<name>/ folders, used as often as the training images "
                        "per epoch, loss weighted by --prior_loss_weight")

    g = parser.add_argument_group(
        "config files (kohya)",
        "A TOML file of flag names (kohya's key names accepted too; [sections] are flattened as kohya does). "
        "Flags on the command line override the file.")
    g.add_argument("--config_file", type=str, default=None, help="read flags from this .toml file")
    g.add_argument("--output_config", action="store_true",
                   help="write the effective flags to --config_file (which must not exist yet) and exit")
