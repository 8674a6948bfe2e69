"""Generation with mindone's ``FluxPipeline``: from a model folder (``generate``) or from a training run's live
modules (validation images), in PyNative, one numpy generator per image (seed ``seed + i`` for image ``i``)."""

from __future__ import annotations

import numpy as np

from mindone_lora_plugin.errors import LoraError

#: FLUX.1-dev's embedded guidance default (schnell ignores it: no guidance embedding)
DEFAULT_GUIDANCE = 3.5


def load_pipeline(folder: str, dtype=None):
    """``FluxPipeline.from_pretrained(folder)`` (``dtype``: a MindSpore dtype for the weights, or None)."""
    from mindone_lora_plugin.runtime.process import quiet_mindone_imports

    quiet_mindone_imports()
    from mindone.diffusers import FluxPipeline

    kw = {"mindspore_dtype": dtype} if dtype is not None else {}
    return FluxPipeline.from_pretrained(folder, **kw)


def live_pipeline(transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler):
    """A ``FluxPipeline`` around already-loaded modules (a training run's, LoRA layers active)."""
    from mindone.diffusers import FluxPipeline

    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def size_step(pipe) -> int:
    """Image sides must be multiples of this: the VAE's downsampling × the 2×2 latent patches (16 for FLUX.1)."""
    return pipe.vae_scale_factor * 2


def generate(pipe, prompt: str, num_images: int = 1, steps: int = 28, seed: int = 0, height: int | None = None,
             width: int | None = None, guidance_scale: float = DEFAULT_GUIDANCE, max_sequence_length: int | None = None,
             progress: bool = False) -> list:
    """``num_images`` PIL images for ``prompt``. ``max_sequence_length`` (the T5 prompt length) defaults to the T5
    tokenizer's ``model_max_length``, at most 512."""
    import mindspore as ms

    if num_images < 1 or steps < 1:
        raise LoraError("the number of images and of steps must be at least 1")
    step = size_step(pipe)
    for what, v in (("--height", height), ("--width", width)):
        if v is not None and (v < step or v % step):
            raise LoraError(f"{what} {v} must be a positive multiple of {step} for this FLUX model")
    length = max_sequence_length or min(512, int(getattr(pipe.tokenizer_2, "model_max_length", 512) or 512))
    pipe.set_progress_bar_config(disable=not progress)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    images = []
    try:
        for i in range(num_images):
            out = pipe(prompt, height=height, width=width, num_inference_steps=int(steps),
                       guidance_scale=float(guidance_scale), max_sequence_length=length,
                       generator=np.random.Generator(np.random.PCG64(int(seed) + i)))
            images.extend(out[0] if isinstance(out, (tuple, list)) else out.images)
    finally:
        ms.set_context(mode=mode)
    return images
