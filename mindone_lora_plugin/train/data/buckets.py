"""Aspect-ratio bucketing (kohya's ``--enable_bucket``): a few fixed shapes of about the training area.

The bucket set is made once from ``--resolution`` (the largest area), ``--min_bucket_reso``/``--max_bucket_reso``
(the shortest and longest side) and ``--bucket_reso_steps`` (every side is a multiple of it), as kohya makes it: the
square of the training area, and for every width from the minimum to the maximum in steps, the tallest height that
keeps the area within the training area. Each image goes to the bucket whose aspect ratio is closest to its own, is
resized to cover it and is cropped to it at batch time (centre or random crop, as without buckets).

``--bucket_no_upscale`` keeps the fixed bucket set (one compiled graph per shape in GRAPH_MODE, so the set stays
small) but only lets an image into a bucket that fits inside it without enlarging; an image smaller than every bucket
is skipped and counted. (kohya instead makes a bucket per image size, which would compile a graph per size here.)
"""

from __future__ import annotations

import logging

import numpy as np

from mindone_lora_plugin.errors import LoraError

log = logging.getLogger(__name__)


def bucket_defaults(resolution: int) -> tuple[int, int, int]:
    """``(min_bucket_reso, max_bucket_reso, bucket_reso_steps)`` when a flag is not given: kohya's 256/1024/64 at
    512 px, scaled to the training resolution (steps of 8 below 256 px, so tiny models get a few buckets too)."""
    steps = 64 if resolution >= 256 else 8
    low = max(steps, (resolution // 2) // steps * steps)
    return low, resolution * 2, steps


def resolve_bucket_args(args, resolution: int) -> tuple[int, int, int]:
    """The bucket settings to use, checked: each a positive multiple of 8, min ≤ resolution ≤ max."""
    low, high, steps = bucket_defaults(resolution)
    low = args.min_bucket_reso if args.min_bucket_reso is not None else low
    high = args.max_bucket_reso if args.max_bucket_reso is not None else high
    steps = args.bucket_reso_steps if args.bucket_reso_steps is not None else steps
    check_bucket_values(low, high, steps)
    if not low <= resolution <= high:
        raise LoraError(f"--resolution {resolution} must lie between --min_bucket_reso {low} and --max_bucket_reso "
                        f"{high} (the square bucket has that side)")
    return low, high, steps


def check_bucket_values(low: int | None, high: int | None, steps: int | None) -> None:
    """The checks that need no resolution (the given flags only; None = not given)."""
    steps = 8 if steps is None else steps
    if steps < 8 or steps % 8:
        raise LoraError(f"--bucket_reso_steps {steps} must be a positive multiple of 8 (the VAE works in 8-pixel "
                        f"blocks), e.g. 64")
    for flag, value in (("--min_bucket_reso", low), ("--max_bucket_reso", high)):
        if value is not None and (value < steps or value % steps):
            raise LoraError(f"{flag} {value} must be a positive multiple of --bucket_reso_steps ({steps})")
    if low is not None and high is not None and low > high:
        raise LoraError(f"--min_bucket_reso {low} is larger than --max_bucket_reso {high}; the shortest side must not "
                        f"exceed the longest")


def make_buckets(resolution: int, low: int, high: int, steps: int) -> list[tuple[int, int]]:
    """Every bucket as ``(height, width)``, sorted; area ≤ resolution², sides in [low, high], multiples of steps."""
    area = resolution * resolution
    side = int(resolution // steps) * steps
    found = {(side, side)}
    for w in range(low, high + 1, steps):
        h = min(high, (area // w) // steps * steps)
        if h >= low:
            found.add((h, w))
            found.add((w, h))
    return sorted(found)


class BucketSizer:
    """Puts each image in a bucket and resizes it to cover that bucket; ``None`` for one too small (no upscale)."""

    def __init__(self, buckets: list[tuple[int, int]], no_upscale: bool):
        self.buckets = buckets
        self.no_upscale = no_upscale
        self._ratios = np.asarray([w / h for h, w in buckets], dtype=np.float64)
        self.too_small = 0
        self.used: dict[str, int] = {}  # bucket "HxW" → images in it (filled once the batch plan exists)

    def choose(self, height: int, width: int) -> tuple[int, int] | None:
        candidates = np.arange(len(self.buckets))
        if self.no_upscale:
            candidates = np.asarray([i for i, (bh, bw) in enumerate(self.buckets) if bh <= height and bw <= width],
                                    dtype=np.int64)
            if not len(candidates):
                return None
        error = np.abs(np.log(self._ratios[candidates]) - np.log(width / height))
        best = candidates[error == error.min()]
        # ties (same ratio): the largest such bucket, which keeps the most pixels
        return max((self.buckets[int(i)] for i in best), key=lambda b: b[0] * b[1])

    def __call__(self, im):
        """A PIL image → ``(uint8 HWC covering the bucket, (bucket height, bucket width))``, or ``None``."""
        from PIL import Image

        w, h = im.size
        target = self.choose(h, w)
        if target is None:
            self.too_small += 1
            return None
        bh, bw = target
        scale = max(bw / w, bh / h)
        size = (max(bw, round(w * scale)), max(bh, round(h * scale)))
        if size != (w, h):
            im = im.resize(size, Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8), target


def log_buckets(examples, say) -> dict[str, int]:
    """Say how many buckets hold images (each is one compiled graph shape); return ``{"HxW": count}``."""
    counts: dict[str, int] = {}
    for ex in examples:
        key = f"{ex.target[0]}x{ex.target[1]}"
        counts[key] = counts.get(key, 0) + 1
    say(f"aspect-ratio buckets: {len(counts)} in use (one compiled graph each): "
        + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return counts
