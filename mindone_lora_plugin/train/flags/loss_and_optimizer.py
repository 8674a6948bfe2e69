"""Flags kohya's users expect that are not a feature of their own: loss and noise options, LoRA+ and optimizers
(kohya-ss/sd-scripts names; EMA, validation loss, sample prompts and save cadence are features,
``train/features/``). Checked before any model loads; recorded in
``hparams.yml`` (every flag) and as ``ss_*`` metadata in the saved files (:func:`metadata`).
"""

from __future__ import annotations

import argparse

from mindone_lora_plugin.errors import LoraError


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

    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer_type", type=str, default="AdamW",
                   help="AdamW (mindspore.nn.AdamWeightDecay, uses --adam_*), Lion, Adafactor or Prodigy "
                        "(use --learning_rate 1)")
    g.add_argument("--optimizer_args", type=str, nargs="*", default=[], metavar="KEY=VALUE",
                   help="optimizer arguments, e.g. weight_decay=0.01 betas=0.9,0.99; a wrong key lists the valid ones")



def check(args) -> None:
    """Every value of these flags, checked before any model loads; a bad one is one line naming the flag."""
    from mindone_lora_plugin.train.optimizers import parse_optimizer_args

    def positive_int(flag):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise LoraError(f"--{flag} must be at least 1, got {value}")

    positive_int("multires_noise_iterations")
    for flag in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "snr_gamma"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            name = "--min_snr_gamma/--snr_gamma" if flag == "snr_gamma" else f"--{flag}"
            raise LoraError(f"{name} must be positive, got {value}")
    if not 0.0 < args.multires_noise_discount <= 1.0:
        raise LoraError(f"--multires_noise_discount must be in (0, 1], got {args.multires_noise_discount}")
    parse_optimizer_args(args.optimizer_type, args.optimizer_args)


def metadata(args) -> dict[str, str]:
    """The ``ss_*`` keys of these flags (kohya's names where kohya has the feature)."""
    from mindone_lora_plugin.train.optimizers import describe

    return {"ss_optimizer": describe(args.optimizer_type, args.optimizer_args),
            "ss_multires_noise_iterations": str(args.multires_noise_iterations),
            "ss_multires_noise_discount": str(args.multires_noise_discount),
            "ss_debiased_estimation": str(bool(args.debiased_estimation_loss)),
            "ss_loraplus_lr_ratio": str(args.loraplus_lr_ratio),
            "ss_loraplus_unet_lr_ratio": str(args.loraplus_unet_lr_ratio),
            "ss_loraplus_text_encoder_lr_ratio": str(args.loraplus_text_encoder_lr_ratio)}

