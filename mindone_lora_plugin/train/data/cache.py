"""Latent and text-encoder-output caches (kohya's ``--cache_latents``, ``--cache_latents_to_disk``,
``--cache_text_encoder_outputs``).

The latent cache keeps the VAE's moments (mean and log-variance) of every image's fixed crop, flipped too with
``--random_flip``; a step then draws its latent sample from them exactly as without a cache, so a cached run trains
the same numbers. On disk each entry is one safetensors file named by the image's content digest (of the resized
pixels, so the resolution or bucket is in it), the crop and the flip, and it records the VAE's identity: an entry made
by another VAE, or one that cannot be read, is re-encoded and rewritten — never silently reused.

As in kohya, what changes from epoch to epoch cannot be cached and is refused: random crops with a latent cache, and
caption shuffling/dropout or trained text encoders with a text-encoder cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

from mindone_lora_plugin.errors import LoraError

log = logging.getLogger(__name__)
FORMAT = "mindone_lora.latent_cache.v1"


def check_cache_args(args) -> None:
    """Refuse the cache settings that cannot work, before any model is loaded."""
    if args.cache_text_encoder_outputs:
        if args.train_text_encoder:
            raise LoraError("--cache_text_encoder_outputs needs frozen text encoders; drop --train_text_encoder "
                            "(a trained text encoder's outputs change every step)")
        for flag, on in (("--shuffle_caption", args.shuffle_caption), ("--caption_dropout_rate",
                                                                        args.caption_dropout_rate)):
            if on:
                raise LoraError(f"--cache_text_encoder_outputs cannot be combined with {flag}: the captions change "
                                f"every epoch, so their encodings cannot be cached (kohya refuses it too)")


def check_crops_cacheable(plan) -> None:
    if not plan.crop_is_fixed():
        raise LoraError("--cache_latents: random crops differ every epoch and cannot be cached; pass --center_crop "
                        "(kohya refuses random_crop with a latent cache too)")


def vae_identity(folder: str, variant: str | None, dtype: str) -> str:
    """A digest of the VAE's config and weight files (names, sizes, first and last MiB) and the dtype it runs in."""
    h = hashlib.sha256(dtype.encode())
    vae_dir = os.path.join(folder, "vae")
    for name in sorted(os.listdir(vae_dir)) if os.path.isdir(vae_dir) else []:
        path = os.path.join(vae_dir, name)
        if not os.path.isfile(path) or not (name.endswith((".json", ".safetensors", ".bin"))):
            continue
        size = os.path.getsize(path)
        h.update(f"{name}:{size}:{variant}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:32]


class LatentCache:
    """``(example key, flipped) → moments`` for every example of a plan, in memory, optionally backed by disk."""

    def __init__(self, encode, vae_id: str, folder: str | None, batch_size: int):
        self.encode, self.vae_id, self.folder, self.batch_size = encode, vae_id, folder, batch_size
        self.entries: dict[tuple[str, bool], np.ndarray] = {}
        self.stats = {"encoded": 0, "read": 0, "rebuilt": 0}

    def _path(self, key: str, flipped: bool) -> str:
        return os.path.join(self.folder, f"{key}-{'flip' if flipped else 'plain'}.safetensors")

    def _read(self, key: str, flipped: bool, shape) -> np.ndarray | None:
        path = self._path(key, flipped)
        if not os.path.exists(path):
            return None
        from mindone_lora_plugin import safetensors_io

        try:
            tensors, meta = safetensors_io.load(path)
            moments = tensors["moments"]
        except Exception:  # a truncated or garbled file: rebuild it
            self.stats["rebuilt"] += 1
            return None
        want = {"format": FORMAT, "vae": self.vae_id, "flipped": str(flipped), "crop": json.dumps(list(shape))}
        if any(meta.get(k) != v for k, v in want.items()) or not np.isfinite(moments).all():
            self.stats["rebuilt"] += 1
            return None
        self.stats["read"] += 1
        return moments

    def _write(self, key: str, flipped: bool, shape, moments: np.ndarray) -> None:
        from mindone_lora_plugin import safetensors_io

        meta = {"format": FORMAT, "vae": self.vae_id, "flipped": str(flipped), "crop": json.dumps(list(shape))}
        safetensors_io.save({"moments": moments}, self._path(key, flipped), meta)

    def fill(self, examples, flips: bool) -> None:
        """Encode (or read) every distinct example's fixed centre crop, and its mirror image with ``flips``."""
        from tqdm.auto import tqdm

        todo: dict[tuple[int, int], list] = {}
        seen = set()
        for ex in examples:
            for flipped in ((False, True) if flips else (False,)):
                if (ex.key, flipped) in seen:
                    continue
                seen.add((ex.key, flipped))
                got = self._read(ex.key, flipped, ex.target) if self.folder else None
                if got is not None:
                    self.entries[(ex.key, flipped)] = got
                else:
                    todo.setdefault(ex.target, []).append((ex, flipped))
        total = sum(len(v) for v in todo.values())
        with tqdm(total=total, desc="caching latents", leave=False, disable=total < 16) as bar:
            for target in sorted(todo):
                items = todo[target]
                for start in range(0, len(items), self.batch_size):
                    chunk = items[start:start + self.batch_size]
                    pixels = [_fixed_crop(ex, flipped) for ex, flipped in chunk]
                    pixels += [pixels[-1]] * (self.batch_size - len(pixels))  # one batch shape: one graph
                    moments = self.encode(np.stack(pixels))
                    for (ex, flipped), m in zip(chunk, moments):
                        self.entries[(ex.key, flipped)] = m
                        if self.folder:
                            self._write(ex.key, flipped, ex.target, m)
                    self.stats["encoded"] += len(chunk)
                    bar.update(len(chunk))

    def moments(self, keys) -> np.ndarray:
        return np.stack([self.entries[k] for k in keys])


def _fixed_crop(ex, flipped: bool) -> np.ndarray:
    th, tw = ex.target
    h, w = ex.image.shape[:2]
    top, left = (h - th) // 2, (w - tw) // 2
    img = ex.image[top:top + th, left:left + tw]
    if flipped:
        img = img[:, ::-1]
    return img.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0


class TextCache:
    """``caption → (embeds, pooled)`` of the frozen text encoder(s) for every caption of the training data."""

    def __init__(self, conditioner, tokenize, batch_size: int):
        self.conditioner, self.tokenize, self.batch_size = conditioner, tokenize, batch_size
        self.entries: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def fill(self, captions) -> None:
        todo = sorted({c for c in captions if c not in self.entries})
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
            embeds, pooled = self.conditioner(*self.tokenize(padded))
            embeds, pooled = embeds.asnumpy(), pooled.asnumpy()
            for i, c in enumerate(chunk):
                self.entries[c] = (embeds[i], pooled[i])

    def lookup(self, captions) -> tuple[np.ndarray, np.ndarray]:
        missing = [c for c in captions if c not in self.entries]
        if missing:
            self.fill(missing)
        return (np.stack([self.entries[c][0] for c in captions]), np.stack([self.entries[c][1] for c in captions]))


def cache_folder(args, output_dir: str) -> str:
    """Where ``--cache_latents_to_disk`` keeps its files: ``.latent_cache`` in the data folder, or in the output
    folder when the data folder cannot be written."""
    data = args.instance_data_dir or args.train_data_dir or args.dataset_name
    for base in ([data] if data and os.path.isdir(data) else []) + [output_dir]:
        folder = os.path.join(base, ".latent_cache")
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, f".probe-{os.getpid()}")
            open(probe, "w").close()
            os.unlink(probe)
            return folder
        except OSError:
            continue
    raise LoraError(f"--cache_latents_to_disk: cannot write a cache folder in {data} or {output_dir}")
