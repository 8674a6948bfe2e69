"""Training data: an imagefolder or a local ``datasets`` dataset → deterministic, resumable batches.

Images are decoded once at start (unreadable ones are skipped and counted, or stop the run with ``--on_bad_image
stop``) and kept resized so their shorter side equals the resolution. Batch order, crops, flips and caption choice are
drawn from generators seeded by ``(seed, epoch, …)``, so a resumed run sees exactly the batches an uninterrupted run
would have, with no generator state to carry around.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass

import numpy as np

from mindone_lora_plugin.errors import LoraError

log = logging.getLogger(__name__)


@dataclass
class Example:
    image: np.ndarray  # uint8 HWC, covering ``target`` (shorter side == resolution without buckets)
    original_size: tuple[int, int]  # (height, width) before resizing
    captions: list[str]
    target: tuple[int, int] = (0, 0)  # (height, width) of the crop: (resolution, resolution) or the bucket
    key: str = ""  # content digest of the resized image (what a latent cache is keyed by)
    loss_weight: float = 1.0  # --prior_loss_weight for kohya regularisation images
    mask: np.ndarray | None = None  # uint8 HW like ``image`` (--masked_loss), None: the whole image counts


@dataclass
class Batch:
    pixels: np.ndarray  # float32 NCHW in [-1, 1]
    captions: list[str]
    original_sizes: list[tuple[int, int]]
    crops_top_left: list[tuple[int, int]]
    keys: list[tuple[str, bool]] = None  # (example key, flipped) per sample: what a latent cache looks up
    loss_weights: np.ndarray = None  # per sample (1, or --prior_loss_weight for kohya regularisation images)
    masks: np.ndarray | None = None  # float32 NHW in [0, 1] (--masked_loss)


def prepare(im, resolution: int, sizer=None, mask=None) -> Example | None:
    """A decoded PIL image → an Example without captions (``sizer``: a bucket sizer; None → square training)."""
    import hashlib

    if sizer is None:
        arr, target = _resize_short_side(im, resolution), (resolution, resolution)
    else:
        fitted = sizer(im)
        if fitted is None:
            return None
        arr, target = fitted
    key = hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()[:32]
    if mask is not None:
        mask = resize_mask(mask, arr.shape[:2])
    return Example(arr, (im.height, im.width), [], target, key, mask=mask)


def resize_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    """A PIL ``L`` mask (``--masked_loss``) resized to ``(height, width)``: uint8 HW."""
    from PIL import Image

    h, w = shape
    if mask.size != (w, h):
        mask = mask.resize((w, h), Image.BILINEAR)
    return np.asarray(mask, dtype=np.uint8)


def load_examples(args, resolution: int, sizer=None, masks=None) -> tuple[list[Example], int]:
    """Load and decode the training examples; return them and the number of unreadable images skipped."""
    ds = _load_dataset(args)
    columns = list(ds.column_names)
    for flag, col in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
        if col not in columns:
            raise LoraError(f"{flag} '{col}' is not a column of the dataset; available columns: {', '.join(columns)}")
    from datasets import Image as ImageFeature

    ds = ds.cast_column(args.image_column, ImageFeature(decode=False))
    if args.max_train_samples is not None:
        ds = ds.select(range(min(args.max_train_samples, len(ds))))
    from tqdm.auto import tqdm

    examples, bad = [], 0
    for row in tqdm(ds, desc="loading images", leave=False, disable=len(ds) < 64):
        ref = row[args.image_column]
        data = ref.get("bytes") if isinstance(ref, dict) else None
        name = ref.get("path") if isinstance(ref, dict) else ref
        im = decode_image(io.BytesIO(data) if data else name, name, args.on_bad_image)
        if im is None:
            bad += 1
            continue
        caption = row[args.caption_column]
        captions = [caption] if isinstance(caption, str) else [str(c) for c in (caption or [])]
        if not captions:
            raise LoraError(f"an example has an empty {args.caption_column!r} column; captions must be strings or "
                            f"lists of strings")
        ex = prepare(im, resolution, sizer, masks(data or name, name) if masks else None)
        if ex is not None:
            ex.captions = captions
            examples.append(ex)
    if bad:
        log.warning("skipped %d unreadable image(s)", bad)
    if not examples:
        raise LoraError("no readable images in the dataset; check --train_data_dir / --dataset_name")
    return examples, bad


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_folder_examples(folder: str, prompt: str, resolution: int, on_bad_image: str, flag: str, sizer=None,
                         masks=None) -> tuple[list[Example], int]:
    """Every image file of ``folder`` (DreamBooth instance or class images), all captioned ``prompt``."""
    if not os.path.isdir(folder):
        raise LoraError(f"{flag} {folder} does not exist; pass a folder of images")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise LoraError(f"{flag} {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    examples, bad = [], 0
    for f in files:
        path = os.path.join(folder, f)
        im = decode_image(path, path, on_bad_image)
        if im is None:
            bad += 1
            continue
        ex = prepare(im, resolution, sizer, masks(path, path) if masks else None)
        if ex is not None:
            ex.captions = [prompt]
            examples.append(ex)
    if not examples and sizer is not None and sizer.too_small:
        raise LoraError(f"every image in {flag} {folder} is smaller than the smallest bucket (--bucket_no_upscale); "
                        f"lower --min_bucket_reso or drop --bucket_no_upscale")
    if not examples:
        raise LoraError(f"none of the {len(files)} image file(s) in {flag} {folder} could be read")
    if bad:
        log.warning("skipped %d unreadable image(s) in %s", bad, folder)
    return examples, bad


def decode_image(src, name, on_bad_image: str):
    """A decoded RGB PIL image, or None for an unreadable one (``on_bad_image='stop'`` raises instead)."""
    from PIL import Image

    try:
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.load()
        return im
    except Exception as e:  # PIL raises many types for bad files
        if on_bad_image == "stop":
            raise LoraError(f"cannot read image {name}: {type(e).__name__}: {e}; fix or remove it, or pass "
                            f"--on_bad_image skip") from None
        return None


def _load_dataset(args):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if args.dataset_name:
        if not os.path.exists(args.dataset_name):
            raise LoraError(f"dataset {args.dataset_name} does not exist locally (nothing is downloaded); pass a local "
                            f"dataset folder or --train_data_dir")
        loader = lambda: datasets.load_dataset(args.dataset_name, args.dataset_config_name,  # noqa: E731
                                               cache_dir=args.cache_dir)
    elif args.train_data_dir:
        if not os.path.isdir(args.train_data_dir):
            raise LoraError(f"--train_data_dir {args.train_data_dir} does not exist; pass an imagefolder with "
                            f"metadata.jsonl")
        loader = lambda: datasets.load_dataset("imagefolder", data_dir=args.train_data_dir,  # noqa: E731
                                               cache_dir=args.cache_dir)
    else:
        raise LoraError("no training data: pass --train_data_dir (an imagefolder), --dataset_name (a local dataset) "
                        "or --instance_data_dir (DreamBooth)")
    try:
        ds = loader()
    except Exception as e:
        raise LoraError(f"cannot load the dataset: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    return ds["train"] if "train" in ds else ds[next(iter(ds))]


def _resize_short_side(im, size: int) -> np.ndarray:
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    if scale != 1:
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


class BatchPlan:
    """Deterministic batches over ``examples`` for one worker (``rank`` of ``world``), epoch by epoch.

    Without buckets an epoch is one permutation cut into batches. With buckets (``bucketed``) every batch holds one
    bucket's shape: each bucket's examples (in the epoch's permutation) are cut into batches, the last one filled up
    with other examples of the same bucket, and the batches are shuffled; the number of batches is the same every
    epoch. Either way everything is drawn from ``(seed, epoch, …)``.
    """

    def __init__(self, examples: list[Example], batch_size: int, resolution: int, seed: int, center_crop: bool,
                 random_flip: bool, rank: int = 0, world: int = 1, prior: list[Example] | None = None,
                 bucketed: bool = False, captions=None, masked: bool = False):
        self.examples, self.batch_size, self.resolution, self.seed = examples, batch_size, resolution, seed
        self.prior = prior or []
        self._order: tuple[int | None, object] = (None, None)
        self.center_crop, self.random_flip, self.rank, self.world = center_crop, random_flip, rank, world
        self.bucketed, self.captions, self.masked = bucketed, captions, masked
        for ex in list(examples) + self.prior:
            if ex.target == (0, 0):
                ex.target = (resolution, resolution)
        if bucketed:
            groups: dict[tuple[int, int], int] = {}
            for ex in examples:
                groups[ex.target] = groups.get(ex.target, 0) + 1
            self.batches_per_epoch = sum(-(-n // batch_size) for n in groups.values()) // world
        else:
            self.batches_per_epoch = (len(examples) // world) // batch_size
        if self.batches_per_epoch == 0:
            raise LoraError(f"{len(examples)} training image(s) are fewer than one batch per worker "
                            f"(--train_batch_size {batch_size} × {world} worker(s)); "
                            f"lower the batch size or add images")

    def order(self, epoch: int):
        """This worker's example indices for ``epoch`` (computed once per epoch): an array, or with buckets a list of
        index arrays, one per batch."""
        if self._order[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch, 17]).permutation(len(self.examples))
            if self.bucketed:
                self._order = (epoch, self._bucket_batches(epoch, perm))
            else:
                usable = (len(perm) // self.world) * self.world
                self._order = (epoch, perm[:usable][self.rank::self.world])
        return self._order[1]

    def _bucket_batches(self, epoch: int, perm: np.ndarray) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, 19])
        groups: dict[tuple[int, int], list[int]] = {}
        for i in perm:
            groups.setdefault(self.examples[int(i)].target, []).append(int(i))
        batches = []
        for target in sorted(groups):
            members = groups[target]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                if len(chunk) < self.batch_size:  # fill up from the same bucket: one shape per batch, fixed size
                    chunk = chunk + [members[int(j)] for j in rng.integers(len(members),
                                                                           size=self.batch_size - len(chunk))]
                batches.append(np.asarray(chunk, dtype=np.int64))
        batches = [batches[int(j)] for j in rng.permutation(len(batches))]
        usable = self.batches_per_epoch * self.world
        return batches[:usable][self.rank::self.world]

    def batch(self, epoch: int, index: int) -> Batch:
        """The batch ``index`` of ``epoch``; with prior preservation, as many class images follow the instances."""
        if self.bucketed:
            idx = self.order(epoch)[index]
        else:
            idx = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        chosen = [(self.examples[int(i)], int(i)) for i in idx]
        if self.prior:
            rng = np.random.default_rng([self.seed, epoch, index, self.rank, 31])
            picks = rng.integers(len(self.prior), size=len(idx))
            chosen += [(self.prior[int(j)], 1_000_000 + int(j)) for j in picks]
        pixels, captions, sizes, crops, keys, weights, masks = [], [], [], [], [], [], []
        for ex, i in chosen:
            rng = np.random.default_rng([self.seed, epoch, i, 29])
            img, top, left = self._crop(ex.image, ex.target, rng)
            flipped = bool(self.random_flip and rng.random() < 0.5)
            if flipped:
                img = img[:, ::-1]
            if self.masked:
                th, tw = ex.target
                m = (ex.mask[top:top + th, left:left + tw] / 255.0 if ex.mask is not None
                     else np.ones((th, tw)))
                masks.append((m[:, ::-1] if flipped else m).astype(np.float32))
            pixels.append(img.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)
            caption = ex.captions[int(rng.integers(len(ex.captions)))]
            captions.append(self.captions(caption, rng) if self.captions is not None else caption)
            sizes.append(ex.original_size)
            crops.append((top, left))
            keys.append((ex.key, flipped))
            weights.append(ex.loss_weight)
        return Batch(np.stack(pixels), captions, sizes, crops, keys, np.asarray(weights, dtype=np.float32),
                     np.stack(masks) if self.masked else None)

    def _crop(self, img: np.ndarray, target: tuple[int, int], rng) -> tuple[np.ndarray, int, int]:
        th, tw = target
        h, w = img.shape[:2]
        if self.center_crop:
            top, left = (h - th) // 2, (w - tw) // 2
        else:
            top, left = int(rng.integers(h - th + 1)), int(rng.integers(w - tw + 1))
        return img[top:top + th, left:left + tw], top, left

    def crop_is_fixed(self) -> bool:
        """True when every crop is the same at every epoch (centre crop, or images already the crop's size)."""
        return self.center_crop or all(ex.image.shape[:2] == ex.target for ex in list(self.examples) + self.prior)
