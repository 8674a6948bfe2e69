"""Flags of the training features kohya's users expect: loss and noise options, LoRA+, EMA, validation loss,
optimizers, sample prompts and save cadence (kohya-ss/sd-scripts names). Checked before any model loads; recorded in
``hparams.yml`` (every flag) and as ``ss_*`` metadata in the saved files (:func:`metadata`).
"""

from __future__ import annotations

import argparse
import os

from mindone_lora_plugin.errors import LoraError

DEFAULT_EMA_DECAY = 0.999


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("loss and noise (kohya names)")
    g.add_argument("--multires_noise_iterations", type=int, default=None,
                   help="pyramid (multi-resolution) noise with this many levels; kohya suggests 6-10")
    g.add_argument("--multires_noise_discount", type=float, default=0.3,
                   help="weight of each coarser level of multi-resolution noise (kohya: 0.1-0.3)")
    g.add_argument("--debiased_estimation_loss", action="store_true",
                   help="weight the loss by 1/sqrt(SNR) (debiased estimation); combines with --min_snr_gamma")

    g = parser.add_argument_group("LoRA+ (up matrices learn faster)")
    g.add_argument("--loraplus_lr_ratio", type=float, default=None,
                   help="learning rate of the up (B) matrices = ratio x lr (the paper suggests 16)")
    g.add_argument("--loraplus_unet_lr_ratio", type=float, default=None, help="LoRA+ ratio for the UNet only")
    g.add_argument("--loraplus_text_encoder_lr_ratio", type=float, default=None,
                   help="LoRA+ ratio for the text encoder(s) only")

    g = parser.add_argument_group("EMA of the LoRA weights")
    g.add_argument("--use_ema", action="store_true",
                   help="keep a moving average of the LoRA weights; saved beside the raw ones as <name>-ema and "
                        "used for validation and sample images")
    g.add_argument("--ema_decay", type=float, default=None,
                   help=f"EMA decay (default {DEFAULT_EMA_DECAY}); warmed up as min(decay, (1+n)/(10+n))")

    g = parser.add_argument_group("validation loss (fixed timesteps, noise and seed)")
    g.add_argument("--validation_split", type=float, default=0.0,
                   help="hold this fraction of the training images out for the validation loss")
    g.add_argument("--validation_data_dir", type=str, default=None,
                   help="an imagefolder (metadata.jsonl) of validation images, instead of --validation_split")
    g.add_argument("--validate_every_n_steps", type=int, default=None,
                   help="compute the validation loss every N steps (it is always computed at the end)")
    g.add_argument("--validation_seed", type=int, default=None,
                   help="seed of the validation noise and timesteps (default: --seed)")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer_type", type=str, default="AdamW",
                   help="AdamW (mindspore.nn.AdamWeightDecay, uses --adam_*), Lion, Adafactor or Prodigy "
                        "(use --learning_rate 1)")
    g.add_argument("--optimizer_args", type=str, nargs="*", default=[], metavar="KEY=VALUE",
                   help="optimizer arguments, e.g. weight_decay=0.01 betas=0.9,0.99; a wrong key lists the valid ones")

    g = parser.add_argument_group("sample images during training")
    g.add_argument("--sample_prompts", type=str, default=None,
                   help="a text file, one prompt a line, options as kohya: --n negative --w width --h height "
                        "--d seed --l CFG scale --s steps")
    g.add_argument("--sample_every_n_steps", type=int, default=None, help="draw the sample prompts every N steps")
    g.add_argument("--sample_every_n_epochs", type=int, default=None, help="draw the sample prompts every N epochs")

    g = parser.add_argument_group("save cadence (LoRA files, besides --checkpointing_steps checkpoints)")
    g.add_argument("--save_every_n_steps", type=int, default=None,
                   help="also write the LoRA files every N steps as <name>-step00000N")
    g.add_argument("--save_every_n_epochs", type=int, default=None,
                   help="also write the LoRA files every N epochs as <name>-00000N")
    g.add_argument("--save_last_n_steps", type=int, default=None,
                   help="keep only the step files of the last N steps (older ones are removed)")
    g.add_argument("--save_last_n_epochs", type=int, default=None,
                   help="keep only the last N epoch files (older ones are removed)")


def check(args) -> None:
    """Every value of these flags, checked before any model loads; a bad one is one line naming the flag."""
    from mindone_lora_plugin.train.optimizers import parse_optimizer_args

    def positive_int(flag):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise LoraError(f"--{flag} must be at least 1, got {value}")

    for flag in ("multires_noise_iterations", "validate_every_n_steps", "sample_every_n_steps",
                 "sample_every_n_epochs", "save_every_n_steps", "save_every_n_epochs", "save_last_n_steps",
                 "save_last_n_epochs"):
        positive_int(flag)
    for flag in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "snr_gamma"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            name = "--min_snr_gamma/--snr_gamma" if flag == "snr_gamma" else f"--{flag}"
            raise LoraError(f"{name} must be positive, got {value}")
    checks = [
        (not 0.0 < args.multires_noise_discount <= 1.0,
         f"--multires_noise_discount must be in (0, 1], got {args.multires_noise_discount}"),
        (args.ema_decay is not None and not args.use_ema, "--ema_decay needs --use_ema"),
        (args.ema_decay is not None and not 0.0 < args.ema_decay < 1.0,
         f"--ema_decay must be between 0 and 1 (e.g. 0.999), got {args.ema_decay}"),
        (not 0.0 <= args.validation_split < 1.0,
         f"--validation_split is a fraction in [0, 1) of the training images, got {args.validation_split}"),
        (args.validation_split > 0 and bool(args.validation_data_dir),
         "--validation_split and --validation_data_dir both choose validation images; pick one"),
        (bool(args.validation_data_dir) and not os.path.isdir(args.validation_data_dir or ""),
         f"--validation_data_dir {args.validation_data_dir} does not exist; pass an imagefolder with metadata.jsonl"),
        ((args.validate_every_n_steps is not None or args.validation_seed is not None)
         and not (args.validation_split > 0 or args.validation_data_dir),
         "--validate_every_n_steps/--validation_seed need validation images: --validation_split or "
         "--validation_data_dir"),
        ((args.sample_every_n_steps or args.sample_every_n_epochs) and not args.sample_prompts,
         "--sample_every_n_steps/--sample_every_n_epochs need --sample_prompts FILE"),
        (bool(args.sample_prompts) and not (args.sample_every_n_steps or args.sample_every_n_epochs),
         "--sample_prompts needs --sample_every_n_steps or --sample_every_n_epochs (when to draw them)"),
        (args.save_last_n_steps is not None and not args.save_every_n_steps,
         "--save_last_n_steps needs --save_every_n_steps"),
        (args.save_last_n_epochs is not None and not args.save_every_n_epochs,
         "--save_last_n_epochs needs --save_every_n_epochs"),
    ]
    for bad, message in checks:
        if bad:
            raise LoraError(message)
    parse_optimizer_args(args.optimizer_type, args.optimizer_args)
    if args.sample_prompts:
        from mindone_lora_plugin.train.sample_prompts import read_prompts

        read_prompts(args.sample_prompts)


def metadata(args) -> dict[str, str]:
    """The ``ss_*`` keys of these features (kohya's names where kohya has the feature)."""
    from mindone_lora_plugin.train.optimizers import describe

    out = {"ss_optimizer": describe(args.optimizer_type, args.optimizer_args),
           "ss_multires_noise_iterations": str(args.multires_noise_iterations),
           "ss_multires_noise_discount": str(args.multires_noise_discount),
           "ss_debiased_estimation": str(bool(args.debiased_estimation_loss)),
           "ss_loraplus_lr_ratio": str(args.loraplus_lr_ratio),
           "ss_loraplus_unet_lr_ratio": str(args.loraplus_unet_lr_ratio),
           "ss_loraplus_text_encoder_lr_ratio": str(args.loraplus_text_encoder_lr_ratio),
           "ss_use_ema": str(bool(args.use_ema)),
           "ss_ema_decay": str(ema_decay(args) if args.use_ema else None),
           "ss_validation_split": str(args.validation_split),
           "ss_validate_every_n_steps": str(args.validate_every_n_steps),
           "ss_validation_seed": str(args.validation_seed),
           "ss_save_every_n_steps": str(args.save_every_n_steps),
           "ss_save_every_n_epochs": str(args.save_every_n_epochs)}
    return out


def ema_decay(args) -> float:
    return args.ema_decay if args.ema_decay is not None else DEFAULT_EMA_DECAY
