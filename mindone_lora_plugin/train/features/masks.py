"""Masked loss (kohya's ``--masked_loss``) as a training feature: its flags, the mask source the data loaders use,
the check once the batch plan exists, and ``ss_masked_loss``. Reading and scaling masks is
:mod:`mindone_lora_plugin.train.data.masks`."""

from __future__ import annotations

import os

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.train.features.base import TrainingFeature


class MaskedLoss(TrainingFeature):
    name = "masked_loss"
    description = "per-pixel loss weights from the images' alpha channels or mask images (--masked_loss)"
    order = 50
    needs = {"conditioning_data_dir": ("masked_loss", "--masked_loss")}

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group("masked loss (kohya)")
        g.add_argument("--masked_loss", action="store_true",
                       help="weight the loss per pixel by a mask: the image's alpha channel, or its namesake in "
                            "--conditioning_data_dir (red channel; white trains, black is ignored)")
        g.add_argument("--conditioning_data_dir", type=str, default=None,
                       help="mask images named like the training images (with --masked_loss)")

    @classmethod
    def check(cls, args) -> None:
        folder = args.conditioning_data_dir
        if folder and not os.path.isdir(folder):
            what = "does not exist" if not os.path.exists(folder) else "is not a folder"
            raise LoraError(f"--conditioning_data_dir {folder} {what}; it accepts an existing folder")

    def mask_source(self):
        if not self.args.masked_loss:
            return None
        from mindone_lora_plugin.train.data.masks import MaskSource

        return MaskSource(self.args.conditioning_data_dir)

    def plan_ready(self, run, plan) -> None:
        if not self.args.masked_loss:
            return
        examples = list(plan.examples)
        with_mask = sum(ex.mask is not None for ex in examples)
        if not with_mask:
            raise LoraError("--masked_loss: no training image has an alpha channel or a mask in "
                            "--conditioning_data_dir; add masks or drop --masked_loss")
        run.say(f"masked loss: {with_mask} of {len(examples)} example(s) have a mask (the rest count fully)")

    def metadata(self) -> dict[str, str]:
        return {"ss_masked_loss": str(bool(self.args.masked_loss))}
