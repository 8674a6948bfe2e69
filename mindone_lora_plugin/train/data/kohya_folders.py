"""Datasets the way kohya users keep them: ``<repeats>_<name>/`` folders of images with caption files.

``--train_data_dir`` holds sub-folders such as ``10_sks dog/``: every image in one is used ``repeats`` (10) times an
epoch, captioned by the file beside it with ``--caption_extension`` (``sks_1.png`` → ``sks_1.txt``), or by the
folder's name after the repeats (``sks dog``) when there is none — kohya's DreamBooth style. ``--reg_data_dir`` holds
regularisation (class) images the same way; as in kohya, they are used as often as the training images in each epoch
(cycled, or only the first ones) and their loss is weighted by ``--prior_loss_weight``.
"""

from __future__ import annotations

import logging
import os
import re

from mindone_lora_plugin.errors import LoraError

log = logging.getLogger(__name__)

FOLDER = re.compile(r"^(\d+)_(.+)$")


def is_kohya_folder(folder: str) -> bool:
    """True for a folder of ``<repeats>_<name>/`` sub-folders and no imagefolder metadata file."""
    if not os.path.isdir(folder):
        return False
    names = os.listdir(folder)
    if any(n.startswith("metadata.") for n in names):
        return False
    return any(FOLDER.match(n) and os.path.isdir(os.path.join(folder, n)) for n in names)


def scan(folder: str, flag: str, caption_extension: str) -> list[tuple[str, str, int]]:
    """``[(image path, caption, repeats)]`` of every ``<repeats>_<name>/`` sub-folder, sorted by path."""
    from mindone_lora_plugin.train.data.loader import IMAGE_SUFFIXES

    if not os.path.isdir(folder):
        raise LoraError(f"{flag} {folder} does not exist; pass a folder of <repeats>_<name>/ image folders")
    subs = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
    matched = [(n, FOLDER.match(n)) for n in subs]
    bad = [n for n, m in matched if not m]
    if bad:
        log.warning("%s: ignoring sub-folder(s) not named <repeats>_<name>: %s", flag, ", ".join(bad))
    items = []
    for name, m in matched:
        if not m:
            continue
        repeats, class_tokens = int(m.group(1)), m.group(2).strip()
        if repeats < 1:
            raise LoraError(f"{flag}: folder {name!r} has 0 repeats; name it <repeats ≥ 1>_<name>, e.g. "
                            f"10_{m.group(2)}")
        sub = os.path.join(folder, name)
        for f in sorted(os.listdir(sub)):
            if not f.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(sub, f)
            items.append((path, _caption(path, caption_extension, class_tokens), repeats))
    if not items:
        raise LoraError(f"{flag} {folder} holds no images in <repeats>_<name>/ sub-folders (e.g. 10_sks dog/)")
    return items


def _caption(image_path: str, extension: str, fallback: str) -> str:
    path = os.path.splitext(image_path)[0] + extension
    if not os.path.isfile(path):
        return fallback
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise LoraError(f"cannot read caption file {path}: {e}; it must be UTF-8 text") from None
    return " ".join(text.splitlines()[0].split()) if text else fallback


def balance_regularisation(reg: list, wanted: int) -> list:
    """kohya's rule: the regularisation examples, cycled (or cut) to ``wanted`` (the training images per epoch)."""
    if not reg:
        return []
    return [reg[i % len(reg)] for i in range(wanted)]


def load_kohya_examples(folder: str, flag: str, args, resolution: int, sizer=None, loss_weight: float = 1.0,
                        masks=None):
    """The examples of a kohya folder, each repeated as its folder says; ``(examples, unreadable, distinct images)``."""
    from tqdm.auto import tqdm

    from mindone_lora_plugin.train.data.loader import decode_image, prepare

    items = scan(folder, flag, args.caption_extension)
    examples, bad = [], 0
    distinct = 0
    for path, caption, repeats in tqdm(items, desc=f"loading {flag}", leave=False, disable=len(items) < 64):
        im = decode_image(path, path, args.on_bad_image)
        if im is None:
            bad += 1
            continue
        ex = prepare(im, resolution, sizer, masks(path, path) if masks else None)
        if ex is None:
            continue
        ex.captions, ex.loss_weight = [caption], loss_weight
        distinct += 1
        examples.extend([ex] * repeats)
    if bad:
        log.warning("skipped %d unreadable image(s) in %s", bad, folder)
    if not examples:
        raise LoraError(f"no usable images in {flag} {folder}"
                        + ("; all are smaller than the smallest bucket (--bucket_no_upscale)" if sizer is not None
                           and sizer.too_small else ""))
    return examples, bad, distinct
