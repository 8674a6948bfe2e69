"""DreamBooth prior preservation: class images generated with the base model, saved, and reused on the next run."""

from __future__ import annotations

import hashlib
import os

from mindone_lora_plugin.errors import LoraError


def ensure_class_images(trainer, folder: str, prompt: str, wanted: int, batch_size: int) -> int:
    """Generate images of ``prompt`` into ``folder`` until it holds ``wanted`` images; return how many were made.

    Runs before adapters are added, so the images come from the base model. Each image is written atomically, so an
    interrupted run keeps what it finished and the next run only makes the rest.
    """
    from tqdm.auto import tqdm

    from mindone_lora_plugin.safetensors_io import atomic_path
    from mindone_lora_plugin.train.data.loader import IMAGE_SUFFIXES
    from mindone_lora_plugin.train.sampling import generate

    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise LoraError(f"cannot create --class_data_dir {folder}: {e.strerror or e}") from None
    have = len([f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES)])
    missing = max(0, wanted - have)
    if not missing:
        return 0
    steps = trainer.args.num_inference_steps or (8 if trainer.resolution <= 64 else 30)
    made = 0
    with tqdm(total=missing, desc="generating class images") as bar:
        while made < missing:
            n = min(batch_size, missing - made)
            images = generate(trainer, prompt, n, steps=steps, seed=trainer.seed + have + made)
            for im in images:
                digest = hashlib.sha1(im.tobytes()).hexdigest()[:12]
                path = os.path.join(folder, f"{have + made:05d}-{digest}.png")
                with atomic_path(path) as tmp:
                    im.save(tmp, format="PNG")
                made += 1
                bar.update(1)
    return made
