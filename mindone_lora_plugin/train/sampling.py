"""Validation images: the run's own models (LoRA active) in a mindone Stable Diffusion pipeline, in PyNative."""

from __future__ import annotations

import numpy as np


def generate(trainer, prompt: str, num_images: int, steps: int, seed: int, negative_prompt: str | None = None,
             width: int | None = None, height: int | None = None, guidance_scale: float | None = None):
    """Generate ``num_images`` PIL images for ``prompt`` with the trainer's current weights (default size: the
    training resolution; default CFG scale: the pipeline's)."""
    import mindspore as ms

    from mindone.diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(trainer.noise_scheduler.config)
    m = trainer.models
    if trainer.architecture == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=trainer.vae, text_encoder=m["text_encoder"],
                                         text_encoder_2=m["text_encoder_2"], tokenizer=trainer.tokenizer,
                                         tokenizer_2=trainer.tokenizer_2, unet=m["unet"], scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=trainer.vae, text_encoder=m["text_encoder"], tokenizer=trainer.tokenizer,
                                       unet=m["unet"], scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cells = [trainer.vae, *m.values()]
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
