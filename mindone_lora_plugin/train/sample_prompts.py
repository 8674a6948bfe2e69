"""``--sample_prompts FILE``: images drawn during training, in kohya's prompt-file syntax.

One prompt a line (empty lines and lines starting with ``#`` are skipped), options after it as kohya writes them::

    a red circle on a white background --n blurry --w 512 --h 768 --d 42 --l 7.5 --s 28

``--n`` negative prompt, ``--w``/``--h`` size (rounded down to a multiple of 8; default: the training resolution),
``--d`` seed (default: ``--seed``), ``--l`` CFG scale (default 7.5), ``--s`` denoising steps (default
``--num_inference_steps``, else 30, or 8 on tiny models). Images go to ``output_dir/samples/`` as
``<name>_<step:06d>_<prompt index:02d>.png``, with the prompt and its settings in the PNG text.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from mindone_lora_plugin.errors import LoraError

OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "guidance_scale", "s": "steps"}


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float = 7.5
    steps: int | None = None


def parse_line(line: str, where: str) -> SamplePrompt:
    parts = (" " + line.strip()).split(" --")
    prompt = parts[0].strip()
    if not prompt:
        raise LoraError(f"{where}: no prompt before the options; write the prompt first, e.g. 'a cat --w 512'")
    sample = SamplePrompt(prompt)
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        value = value.strip()
        if key not in OPTIONS:
            raise LoraError(f"{where}: unknown option --{key}; prompt lines take "
                            f"{', '.join('--' + k for k in OPTIONS)}")
        field = OPTIONS[key]
        if key == "n":
            sample.negative_prompt = value
            continue
        try:
            number = float(value) if key == "l" else int(value)
        except ValueError:
            raise LoraError(f"{where}: --{key} needs a {'number' if key == 'l' else 'whole number'}, got "
                            f"{value!r}") from None
        if key in ("w", "h"):
            if number < 8:
                raise LoraError(f"{where}: --{key} {number} is too small; use at least 8 pixels")
            number -= number % 8
        if key == "s" and number < 1:
            raise LoraError(f"{where}: --s must be at least 1 step, got {number}")
        setattr(sample, field, number)
    return sample


def read_prompts(path: str) -> list[SamplePrompt]:
    """The prompts of ``path``; a line that cannot be used is one error naming the file, line and option."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LoraError(f"--sample_prompts {path}: cannot read it ({getattr(e, 'strerror', None) or e}); pass a "
                        f"UTF-8 text file with one prompt a line") from None
    prompts = [parse_line(line, f"--sample_prompts {path} line {i}") for i, line in enumerate(lines, 1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise LoraError(f"--sample_prompts {path} holds no prompt (one a line; '#' starts a comment)")
    return prompts


def is_due(args, global_step: int, updates_per_epoch: int) -> bool:
    """Whether the sample prompts are drawn after ``global_step``."""
    if not args.sample_prompts:
        return False
    if args.sample_every_n_steps and global_step % args.sample_every_n_steps == 0:
        return True
    return bool(args.sample_every_n_epochs and global_step % updates_per_epoch == 0
                and (global_step // updates_per_epoch) % args.sample_every_n_epochs == 0)


def file_name(output_name: str, step: int, index: int) -> str:
    return f"{output_name}_{step:06d}_{index:02d}.png"


def draw(trainer, prompts: list[SamplePrompt], global_step: int) -> list[str]:
    """Generate one image per prompt with the trainer's current weights; return the PNG paths."""
    from mindone_lora_plugin.train.sampling import generate
    from mindone_lora_plugin.train.visuals import save_png

    args = trainer.args
    folder = os.path.join(args.output_dir, "samples")
    default_steps = args.num_inference_steps or (8 if trainer.resolution <= 64 else 30)
    paths = []
    for i, p in enumerate(prompts):
        settings = dict(asdict(p), width=p.width or trainer.resolution, height=p.height or trainer.resolution,
                        seed=trainer.seed if p.seed is None else p.seed, steps=p.steps or default_steps)
        image = generate(trainer, p.prompt, 1, steps=settings["steps"], seed=settings["seed"],
                         negative_prompt=p.negative_prompt, width=settings["width"], height=settings["height"],
                         guidance_scale=p.guidance_scale)[0]
        path = os.path.join(folder, file_name(trainer.output_name, global_step, i))
        save_png(image, path, dict(settings, step=global_step))
        paths.append(path)
    return paths
