"""Image generation with LoRAs applied, and PNGs with their metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.compose.live import apply_loras
from mindone_lora_plugin.compose.maths import _as_list
from mindone_lora_plugin.compose.specs import WeightedLora, _pairs
from mindone_lora_plugin.errors import LoraError


@dataclass
class GeneratedImage:
    image: object  # PIL.Image
    seed: int
    metadata: dict[str, str] = field(default_factory=dict)


def load_pipeline(model_dir: str, loras=(), dtype: str | None = None):
    """The architecture's mindone pipeline (:meth:`~mindone_lora_plugin.architectures.base.Architecture.load_pipeline`:
    ``StableDiffusionPipeline`` for SD1.x/2.x without a safety checker, ``StableDiffusionXLPipeline`` for SDXL) from a
    diffusers-layout folder, with ``loras`` applied at once (:func:`apply_loras`).

    Call :func:`mindone_lora_plugin.runtime.process.setup` first (it turns the CPU backend on when the target is CPU).
    """
    from mindone_lora_plugin.architectures import get_architecture
    from mindone_lora_plugin.runtime.process import quiet_mindone_imports

    info = BaseModelInfo.from_folder(model_dir)
    quiet_mindone_imports()
    ms_dtype = None
    if dtype:
        from mindone_lora_plugin.dtypes import mindspore_dtype

        ms_dtype = mindspore_dtype(dtype)
    pipe = get_architecture(info.architecture).load_pipeline(model_dir, ms_dtype)
    pipe.lora_adapter_names = []
    if loras:
        pipe.lora_adapter_names = apply_loras(pipeline_models(pipe, info.architecture), loras)
    return pipe


def pipeline_models(pipe, architecture: str | None = None):
    """The adaptable components of a pipeline (the UNet and text encoders for SD) as
    :class:`~mindone_lora_plugin.models.Models`."""
    from mindone_lora_plugin.architectures import find_architecture, known_components
    from mindone_lora_plugin.models import Models

    arch = find_architecture(architecture)
    names = arch.component_names() if arch is not None else known_components()
    return Models(**{c: getattr(pipe, c, None) for c in names}, architecture=architecture)


def generate_images(pipe, prompt: str, negative_prompt: str | None = None, num_images: int = 1, steps: int = 30,
                    guidance_scale: float = 7.5, seed: int = 0, height: int | None = None, width: int | None = None,
                    batch_size: int = 4, progress: bool = True) -> list[GeneratedImage]:
    """Generate ``num_images`` images, ``batch_size`` per pipeline call.

    Image ``i`` starts from the noise of seed ``seed + i`` (one numpy generator per image), so ``--num_images 1
    --seed S`` reproduces any image alone. Runs in PyNative mode; shows the pipeline's progress bar per batch unless
    ``progress`` is False.
    """
    import mindspore as ms

    if num_images < 1 or steps < 1 or batch_size < 1:
        raise LoraError("the number of images, steps and the batch size must be at least 1")
    for what, v in (("--height", height), ("--width", width)):
        if v is not None and (v < 8 or v % 8):
            raise LoraError(f"{what} {v} must be a positive multiple of 8")
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    out = []
    try:
        for start in range(0, num_images, batch_size):
            seeds = [int(seed) + i for i in range(start, min(num_images, start + batch_size))]
            desc = f"images {start + 1}-{start + len(seeds)}/{num_images}" if len(seeds) > 1 else \
                f"image {start + 1}/{num_images}"
            pipe.set_progress_bar_config(disable=not progress, desc=desc)
            gens = [np.random.Generator(np.random.PCG64(s)) for s in seeds]
            result = pipe([prompt] * len(seeds), negative_prompt=[negative_prompt] * len(seeds) if negative_prompt
                          else None, num_inference_steps=int(steps), guidance_scale=float(guidance_scale),
                          height=height, width=width, num_images_per_prompt=1,
                          generator=gens if len(gens) > 1 else gens[0])
            images = result[0] if isinstance(result, (tuple, list)) else result.images
            out.extend(GeneratedImage(im, s) for im, s in zip(images, seeds))
    finally:
        ms.set_context(mode=mode)
    return out


def image_metadata(prompt: str, negative_prompt: str | None, seed: int, steps: int, guidance_scale: float,
                   size: tuple[int, int], model: str, loras, sampler: str = "") -> dict[str, str]:
    """The PNG text chunks written with every image: separate keys, plus an A1111-style ``parameters`` entry (the
    LoRAs as ``<lora:name:weight>`` tags) that A1111/Forge "PNG info" tools read."""
    from mindone_lora_plugin import __version__

    loras = _as_list(loras)
    listed = [lo.describe() if isinstance(lo, WeightedLora) else {"weight": w}
              for lo, (_, w) in zip(loras, _pairs(loras))]
    tags = " ".join(f"<lora:{d.get('name', 'lora')}:{_num(d['weight'])}>" for d in listed)
    w, h = size
    params = (f"{prompt}{' ' + tags if tags else ''}\nNegative prompt: {negative_prompt or ''}\n"
              f"Steps: {steps}, Sampler: {sampler or 'default'}, CFG scale: {_num(guidance_scale)}, Seed: {seed}, "
              f"Size: {w}x{h}, Model: {os.path.basename(os.path.normpath(model))}")
    return {"parameters": params, "prompt": prompt, "negative_prompt": negative_prompt or "", "seed": str(seed),
            "steps": str(steps), "guidance_scale": _num(guidance_scale), "width": str(w), "height": str(h),
            "model": os.path.abspath(model), "loras": json.dumps(listed), "software": f"mindone-lora {__version__}"}


def _num(x: float) -> str:
    return f"{float(x):g}"


def save_png(image, path: str, metadata: dict[str, str] | None = None) -> str:
    """Save a PIL image as PNG with text metadata, atomically."""
    from PIL import PngImagePlugin

    from mindone_lora_plugin.safetensors_io import atomic_path

    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
