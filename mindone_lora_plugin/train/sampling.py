"""Validation images: the run's own models (LoRA active) in the architecture's mindone pipeline, in PyNative."""

from __future__ import annotations

import numpy as np


def generate(trainer, prompt: str, num_images: int, steps: int, seed: int, negative_prompt: str | None = None,
             width: int | None = None, height: int | None = None, guidance_scale: float | None = None):
    """Generate ``num_images`` PIL images for ``prompt`` with the trainer's current weights (default size: the
    training resolution; default CFG scale: the pipeline's)."""
    import mindspore as ms

    pipe = trainer.arch.training_pipeline(trainer.models, trainer.parts)
    pipe.set_progress_bar_config(disable=True)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cells = [c for c in (trainer.parts.vae, *trainer.models.values()) if c is not None]
    training = [c.training for c in cells]
    for c in cells:
        c.set_train(False)  # eval mode: no adapter dropout in the images
    try:
        extra = {"guidance_scale": guidance_scale} if guidance_scale is not None else {}
        out = pipe(prompt, num_images_per_prompt=num_images, num_inference_steps=steps,
                   height=height or trainer.resolution, width=width or trainer.resolution,
                   negative_prompt=negative_prompt or None,
                   generator=np.random.Generator(np.random.PCG64(seed)), **extra)
    finally:
        for c, was in zip(cells, training):
            c.set_train(was)
        ms.set_context(mode=mode)
    return out[0]


def validation_images(trainer, tag: str) -> str:
    """``--validation_prompt``: a grid of ``--num_validation_images`` images as ``validation/<tag>.png``; its path."""
    import os

    from mindone_lora_plugin.train.visuals import save_grid

    args = trainer.args
    with trainer.drawing_weights():  # the EMA weights with --use_ema
        images = generate(trainer, args.validation_prompt, args.num_validation_images,
                          steps=args.num_inference_steps or (8 if trainer.resolution <= 64 else 30), seed=trainer.seed)
    path = os.path.join(args.output_dir, "validation", f"{tag}.png")
    save_grid(images, path, f"{tag}: {args.validation_prompt}",
              {"prompt": args.validation_prompt, "seed": trainer.seed, "tag": tag})
    trainer.say(f"validation images: {path}")
    return path
