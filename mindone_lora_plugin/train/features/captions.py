"""Caption augmentation as kohya does it (``--shuffle_caption --keep_tokens --caption_dropout_rate``) as a training
feature: its flags and checks, the augmentation the batch plan applies, and its ``ss_*`` keys. The augmentation
itself is :class:`mindone_lora_plugin.train.data.captions.CaptionAugment`."""

from __future__ import annotations

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.train.features.base import TrainingFeature


class CaptionAugmentation(TrainingFeature):
    name = "captions"
    description = "caption shuffling (keeping leading tags) and caption dropout, per sample and epoch"
    order = 50
    needs = {"keep_tokens": ("shuffle_caption", "--shuffle_caption (it is the number of tags left in place)")}

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group("caption augmentation (kohya)",
                                      "Changes each sample's caption every epoch (not with a text-encoder cache).")
        g.add_argument("--shuffle_caption", action="store_true",
                       help="shuffle the comma-separated tags of each caption (after --keep_tokens), per epoch")
        g.add_argument("--keep_tokens", type=int, default=0,
                       help="number of leading comma-separated tags --shuffle_caption leaves in place")
        g.add_argument("--caption_dropout_rate", type=float, default=0.0,
                       help="probability (0 to 1) of training a sample with an empty caption")

    @classmethod
    def check(cls, args) -> None:
        if args.keep_tokens is not None and args.keep_tokens < 0:
            raise LoraError(f"--keep_tokens {args.keep_tokens} is out of range; it accepts 0 or more")
        rate = args.caption_dropout_rate
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise LoraError(f"--caption_dropout_rate {rate} is out of range; it accepts 0.0 ≤ value ≤ 1.0")

    def caption_augment(self):
        from mindone_lora_plugin.train.data.captions import CaptionAugment

        augment = CaptionAugment.from_args(self.args)
        return augment if augment.active else None

    def metadata(self) -> dict[str, str]:
        return {"ss_caption_dropout_rate": str(self.args.caption_dropout_rate),
                "ss_keep_tokens": str(self.args.keep_tokens),
                "ss_shuffle_caption": str(bool(self.args.shuffle_caption))}
