"""Flags for buckets, caches, kohya-style datasets, captions, masked loss and config files (kohya's names)."""

from __future__ import annotations

import argparse


def add_data_feature_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "aspect-ratio buckets (kohya)",
        "Each batch holds one bucket's shape; in graph mode each shape in use compiles once (the log lists them). "
        "Defaults scale kohya's 256/1024/64 at 512 px to --resolution.")
    g.add_argument("--enable_bucket", action="store_true",
                   help="train each image near its own aspect ratio instead of a square crop")
    g.add_argument("--min_bucket_reso", type=int, default=None,
                   help="shortest bucket side in pixels (default: half --resolution, a multiple of the steps)")
    g.add_argument("--max_bucket_reso", type=int, default=None,
                   help="longest bucket side in pixels (default: twice --resolution)")
    g.add_argument("--bucket_reso_steps", type=int, default=None,
                   help="bucket sides are multiples of this, itself a multiple of 8 (default 64; 8 below 256 px)")
    g.add_argument("--bucket_no_upscale", action="store_true",
                   help="only buckets an image fits without enlarging; smaller images are skipped and counted")

    g = parser.add_argument_group(
        "caches (kohya)",
        "What changes every epoch cannot be cached and is refused: random crops (pass --center_crop) with a latent "
        "cache; --train_text_encoder, --shuffle_caption or --caption_dropout_rate with a text-encoder cache.")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode every image (and its mirror image with --random_flip) once, before training")
    g.add_argument("--cache_latents_to_disk", action="store_true",
                   help="also keep the latents as safetensors in <data folder>/.latent_cache, keyed by image content, "
                        "size, flip and VAE; implies --cache_latents")
    g.add_argument("--cache_text_encoder_outputs", action="store_true",
                   help="encode every caption once with the frozen text encoder(s)")

    g = parser.add_argument_group(
        "kohya-style datasets and captions",
        "--train_data_dir may also be a folder of <repeats>_<name>/ sub-folders (e.g. 10_sks dog/) of images with "
        "caption files; an image without one is captioned by the folder name.")
    g.add_argument("--caption_extension", type=str, default=".txt",
                   help="caption file beside each image in kohya folders (kohya's own default is .caption)")
    g.add_argument("--reg_data_dir", type=str, default=None,
                   help="regularisation images in <repeats>_<name>/ folders, used as often as the training images "
                        "per epoch, loss weighted by --prior_loss_weight")
    g.add_argument("--shuffle_caption", action="store_true",
                   help="shuffle the comma-separated tags of each caption (after --keep_tokens), per epoch")
    g.add_argument("--keep_tokens", type=int, default=0,
                   help="number of leading comma-separated tags --shuffle_caption leaves in place")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0,
                   help="probability (0 to 1) of training a sample with an empty caption")

    g.add_argument("--masked_loss", action="store_true",
                   help="weight the loss per pixel by a mask: the image's alpha channel, or its namesake in "
                        "--conditioning_data_dir (red channel; white trains, black is ignored)")
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="mask images named like the training images (with --masked_loss)")

    g = parser.add_argument_group(
        "config files (kohya)",
        "A TOML file of flag names (kohya's key names accepted too; [sections] are flattened as kohya does). "
        "Flags on the command line override the file.")
    g.add_argument("--config_file", type=str, default=None, help="read flags from this .toml file")
    g.add_argument("--output_config", action="store_true",
                   help="write the effective flags to --config_file (which must not exist yet) and exit")
