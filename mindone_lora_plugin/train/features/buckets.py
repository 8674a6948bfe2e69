"""Aspect-ratio buckets (kohya's ``--enable_bucket``) as a training feature: its flags and checks, the image sizer
the data loaders use, the bucket log once the batch plan exists, and the ``ss_*`` bucket keys of the saved files.
The bucket maths is :mod:`mindone_lora_plugin.train.data.buckets`."""

from __future__ import annotations

import json

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.train.features.base import TrainingFeature


class Buckets(TrainingFeature):
    name = "buckets"
    description = "aspect-ratio buckets: each image trains near its own aspect ratio (--enable_bucket)"
    order = 50
    needs = {dest: ("enable_bucket", "--enable_bucket")
             for dest in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")}

    @classmethod
    def add_arguments(cls, parser) -> None:
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

    @classmethod
    def check(cls, args) -> None:
        if not args.enable_bucket:
            return
        if getattr(args, "with_prior_preservation", False):
            raise LoraError("--enable_bucket cannot be combined with --with_prior_preservation (class images are "
                            "drawn regardless of shape); use kohya folders with --reg_data_dir, whose images join "
                            "the buckets")
        from mindone_lora_plugin.train.data.buckets import check_bucket_values

        check_bucket_values(args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps)

    def __init__(self, args):
        super().__init__(args)
        self.sizer, self.settings = None, None

    def image_sizer(self, resolution: int):
        if not self.args.enable_bucket:
            return None
        from mindone_lora_plugin.train.data.buckets import BucketSizer, make_buckets, resolve_bucket_args

        self.settings = resolve_bucket_args(self.args, resolution)  # (low, high, steps); refused in one line
        self.sizer = BucketSizer(make_buckets(resolution, *self.settings), self.args.bucket_no_upscale)
        return self.sizer

    def plan_ready(self, run, plan) -> None:
        if self.sizer is None:
            return
        from mindone_lora_plugin.train.data.buckets import log_buckets

        if self.sizer.too_small:
            run.say(f"skipped {self.sizer.too_small} image(s) smaller than the smallest bucket (--bucket_no_upscale)")
        self.sizer.used = log_buckets(list(plan.examples) + list(plan.prior), run.say)

    def metadata(self) -> dict[str, str]:
        meta = {"ss_enable_bucket": str(bool(self.args.enable_bucket)),
                "ss_bucket_no_upscale": str(bool(self.args.bucket_no_upscale))}
        if self.sizer is not None:
            low, high, steps = self.settings
            meta.update(ss_min_bucket_reso=str(low), ss_max_bucket_reso=str(high), ss_bucket_reso_steps=str(steps))
            buckets = {str(i): {"resolution": [int(k.split("x")[1]), int(k.split("x")[0])], "count": n}
                       for i, (k, n) in enumerate(sorted(self.sizer.used.items()))}
            meta["ss_bucket_info"] = json.dumps({"buckets": buckets, "skipped_too_small": self.sizer.too_small})
        return meta
