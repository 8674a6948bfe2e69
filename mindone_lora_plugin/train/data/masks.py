"""``--masked_loss`` masks, as kohya makes them: the image's alpha channel, or a mask image of the same name in
``--conditioning_data_dir`` (its red channel; white = train, black = ignore). The per-pixel loss is multiplied by the
mask, area-averaged down to the latent size; an image without a mask counts fully.
"""

from __future__ import annotations

import io
import os

import numpy as np

from mindone_lora_plugin.errors import LoraError


class MaskSource:
    """Finds the mask of an image: ``--conditioning_data_dir/<stem>.*`` first, else the image's own alpha channel."""

    def __init__(self, conditioning_data_dir: str | None):
        self.files = {}
        if conditioning_data_dir:
            from mindone_lora_plugin.train.data.loader import IMAGE_SUFFIXES

            if not os.path.isdir(conditioning_data_dir):
                raise LoraError(f"--conditioning_data_dir {conditioning_data_dir} does not exist; it accepts a folder "
                                f"of mask images named like the training images")
            for f in sorted(os.listdir(conditioning_data_dir)):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    self.files[os.path.splitext(f)[0]] = os.path.join(conditioning_data_dir, f)
        self.found = 0

    def __call__(self, src, name):
        """The mask of the image at ``src`` (a path or bytes) as a PIL ``L`` image, or None."""
        from PIL import Image

        stem = os.path.splitext(os.path.basename(str(name or "")))[0]
        try:
            if stem in self.files:
                with Image.open(self.files[stem]) as m:
                    mask = m.convert("RGB").getchannel("R")
            else:
                with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                    if "A" not in im.getbands() and "transparency" not in im.info:
                        return None
                    mask = im.convert("RGBA").getchannel("A")
            mask.load()
        except OSError as e:
            raise LoraError(f"--masked_loss: cannot read the mask of {name}: {e}") from None
        self.found += 1
        return mask


def latent_masks(masks: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """``(N, H, W)`` masks in [0, 1] → ``(N, 1, h, w)`` float32, area-averaged to the latent size."""
    n, H, W = masks.shape
    h, w = latent_hw
    return masks.reshape(n, h, H // h, w, W // w).mean(axis=(2, 4)).astype(np.float32)[:, None]
