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
from mindone_lora_plugin.train.features.base import TrainingFeature

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


def draw(run, prompts: list[SamplePrompt], global_step: int) -> list[str]:
    """Generate one image per prompt with the run's current weights; return the PNG paths."""
    from mindone_lora_plugin.train.visuals import save_png

    args = run.args
    folder = os.path.join(args.output_dir, "samples")
    default_steps = args.num_inference_steps or (8 if run.resolution <= 64 else 30)
    paths = []
    for i, p in enumerate(prompts):
        settings = dict(asdict(p), width=p.width or run.resolution, height=p.height or run.resolution,
                        seed=run.seed if p.seed is None else p.seed, steps=p.steps or default_steps)
        image = run.draw(p.prompt, 1, steps=settings["steps"], seed=settings["seed"],
                         negative_prompt=p.negative_prompt, width=settings["width"], height=settings["height"],
                         guidance_scale=p.guidance_scale)[0]
        path = os.path.join(folder, file_name(run.output_name, global_step, i))
        save_png(image, path, dict(settings, step=global_step))
        paths.append(path)
    return paths


class SamplePrompts(TrainingFeature):
    name = "sample_prompts"
    description = "--sample_prompts FILE: images drawn every N steps or epochs (kohya's prompt syntax)"
    order = 30

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group("sample images during training")
        g.add_argument("--sample_prompts", type=str, default=None,
                       help="a text file, one prompt a line, options as kohya: --n negative --w width --h height "
                            "--d seed --l CFG scale --s steps")
        g.add_argument("--sample_every_n_steps", type=int, default=None, help="draw the sample prompts every N steps")
        g.add_argument("--sample_every_n_epochs", type=int, default=None,
                       help="draw the sample prompts every N epochs")

    @classmethod
    def check(cls, args) -> None:
        for flag in ("sample_every_n_steps", "sample_every_n_epochs"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise LoraError(f"--{flag} must be at least 1, got {value}")
        if (args.sample_every_n_steps or args.sample_every_n_epochs) and not args.sample_prompts:
            raise LoraError("--sample_every_n_steps/--sample_every_n_epochs need --sample_prompts FILE")
        if args.sample_prompts and not (args.sample_every_n_steps or args.sample_every_n_epochs):
            raise LoraError("--sample_prompts needs --sample_every_n_steps or --sample_every_n_epochs (when to draw "
                            "them)")
        if args.sample_prompts:
            read_prompts(args.sample_prompts)

    def __init__(self, args):
        super().__init__(args)
        self.prompts = read_prompts(args.sample_prompts) if args.sample_prompts else []
        self.samples: list[str] = []
        self.drawing = None

    def setup(self, run) -> None:
        self.drawing = run.drawing_weights  # the EMA weights with --use_ema

    def after_step(self, run, global_step: int, writer) -> None:
        if run.is_main and self.prompts and is_due(self.args, global_step, run.updates_per_epoch):
            with self.drawing():
                self.samples += draw(run, self.prompts, global_step)

    def results(self) -> dict:
        return {"samples": self.samples}
