"""``mindone-lora generate --model MODEL_DIR --lora FILE[:WEIGHT] ... --prompt "..." --out DIR``.

Loads every LoRA (any format the plugins read), applies them all at once with their weights (one PEFT adapter each),
generates ``--num_images`` images (image ``i`` with seed ``--seed + i``) with a progress bar, and writes
``DIR/0000-SEED.png`` … plus ``DIR/grid.png``. Every PNG carries the prompt, negative prompt, seed, steps, guidance
scale, size, model and LoRAs (with weights) as text metadata, and an A1111-style ``parameters`` entry. Everything that
can be checked without MindSpore (model folder, LoRA files and architectures, weights, the output folder) is checked
before the model is loaded.
"""

from __future__ import annotations

import os
import secrets

from mindone_lora_plugin.dtypes import SAVE_DTYPES
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.model_files import add_model_file_arguments, model_arg


def add_parser(subparsers):
    p = subparsers.add_parser(
        "generate", help="generate images with one or more weighted LoRAs",
        description="Generate images with a Stable Diffusion 1.x/2.x or SDXL model and any number of LoRAs applied "
                    "together, each with its own weight.")
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="the base model folder (diffusers layout) or a single-file .safetensors checkpoint")
    add_model_file_arguments(p)
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA file (kohya/A1111/civitai, diffusers/PEFT, this package's) or folder, with an optional "
                        "weight after the last colon (default 1; may be negative). Repeat for several LoRAs")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--num_images", type=int, default=1, help="images to generate (default 1)")
    p.add_argument("--steps", type=int, default=30, help="inference steps (default 30)")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed + i "
                                                          "(default: random, printed and saved)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--batch_size", type=int, default=4, help="images per pipeline call (default 4)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write the images into")
    p.add_argument("--overwrite", action="store_true", help="write into --out even when it is not empty")
    p.add_argument("--dtype", choices=SAVE_DTYPES, default=None,
                   help="load the model in this dtype (default: as saved; fp32 on CPU)")
    p.add_argument("--device_target", choices=("CPU", "GPU", "Ascend"), default=None,
                   help="MindSpore device (default: MindSpore's default)")
    return p


def run(args) -> int:
    from mindone_lora_plugin import compose
    from mindone_lora_plugin.base_model_info import BaseModelInfo

    if args.num_images < 1:
        raise LoraError(f"--num_images must be at least 1, got {args.num_images}")
    if args.batch_size < 1:
        raise LoraError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.steps < 1:
        raise LoraError(f"--steps must be at least 1, got {args.steps}")
    for flag in ("height", "width"):
        v = getattr(args, flag)
        if v is not None and (v < 8 or v % 8):
            raise LoraError(f"--{flag} {v} must be a positive multiple of 8")
    if compose.output_is_taken(args.out) and not args.overwrite:
        raise LoraError(f"the output folder {args.out} already exists and is not empty; choose another --out or pass "
                        f"--overwrite")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise LoraError(f"--out {args.out} is a file; give a folder")
    folder = model_arg(args.model, args)
    info = BaseModelInfo.from_folder(folder)
    loras = compose.load_loras(args.lora, base=info)
    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 31)

    from mindone_lora_plugin.runtime.process import setup

    setup(args.device_target, "pynative", seed)
    for lo in loras:
        print(f"LoRA {lo.path} (weight {lo.weight:g}, {lo.format}, {len(lo.state)} modules)")
    pipe = compose.load_pipeline(folder, loras, dtype=args.dtype)
    images = compose.generate_images(pipe, args.prompt, args.negative_prompt, args.num_images, args.steps,
                                     args.guidance_scale, seed, args.height, args.width,
                                     batch_size=args.batch_size)
    os.makedirs(args.out, exist_ok=True)
    sampler = type(pipe.scheduler).__name__
    written = []
    for g in images:
        meta = compose.image_metadata(args.prompt, args.negative_prompt, g.seed, args.steps, args.guidance_scale,
                                      g.image.size, args.model, loras, sampler)
        written.append(compose.save_png(g.image, os.path.join(args.out, f"{len(written):04d}-{g.seed}.png"), meta))
    from mindone_lora_plugin.train.visuals import save_grid

    meta = compose.image_metadata(args.prompt, args.negative_prompt, seed, args.steps, args.guidance_scale,
                                  images[0].image.size, args.model, loras, sampler)
    meta["seeds"] = ",".join(str(g.seed) for g in images)
    grid = save_grid([g.image for g in images], os.path.join(args.out, "grid.png"), title=args.prompt, metadata=meta)
    print(f"wrote {len(written)} image(s) and {grid} (seed {seed}) to {args.out}")
    return 0
