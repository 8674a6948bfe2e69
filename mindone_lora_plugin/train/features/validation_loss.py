"""Validation loss: held-out images (``--validation_split``) or a folder (``--validation_data_dir``).

The figure is comparable across steps, runs and resumes: the held-out images are chosen by the seed, each is
centre-cropped, unflipped, with its first caption, and its VAE sample, noise and timestep come from a generator keyed
only by ``--validation_seed`` (default ``--seed``) and the batch number — drawn once, before the first step. The loss
is the plain (unweighted) MSE of the denoising target, computed with the adapters in eval mode (no dropout).
"""

from __future__ import annotations

import copy
import os

import numpy as np

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.train.features.base import TrainingFeature

WEIGHTS = 5  # position of the per-sample loss weights among DenoiseLoss's inputs


def split(examples: list, args, seed: int, resolution: int) -> tuple[list, list]:
    """``(training examples, validation examples)``: a seeded held-out fraction, a folder, or none."""
    if args.validation_data_dir:
        from mindone_lora_plugin.train.data.loader import load_examples

        other = copy.copy(args)
        other.train_data_dir, other.dataset_name, other.max_train_samples = args.validation_data_dir, None, None
        try:
            held, _ = load_examples(other, resolution)
        except LoraError as e:
            raise LoraError(f"--validation_data_dir: {e}") from None
        return examples, held
    if not args.validation_split:
        return examples, []
    n = int(round(len(examples) * args.validation_split))
    if n < 1 or n >= len(examples):
        raise LoraError(f"--validation_split {args.validation_split} of {len(examples)} image(s) holds out {n}; "
                        f"it must leave at least one image on each side")
    perm = np.random.default_rng([seed, 909]).permutation(len(examples))
    held = set(int(i) for i in perm[:n])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


class ValidationLoss:
    """The fixed validation inputs, drawn once; :meth:`__call__` gives the mean loss with the current weights."""

    def __init__(self, run, examples: list, seed: int):
        import mindspore as ms

        from mindone_lora_plugin.train.data.loader import Batch

        self.run = run
        self.count = len(examples)
        size, r = max(1, min(run.args.train_batch_size, len(examples))), run.resolution
        self.batch_size = size
        self.inputs = []  # (model inputs, number of real examples in the batch)
        for j in range(0, len(examples), size):
            chunk = examples[j:j + size]
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (size - real)  # one batch shape: pad, with weight 0
            pixels, sizes, crops = [], [], []
            for ex in chunk:
                h, w = ex.image.shape[:2]
                top, left = (h - r) // 2, (w - r) // 2
                img = ex.image[top:top + r, left:left + r]
                pixels.append(img.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)
                sizes.append(ex.original_size)
                crops.append((top, left))
            batch = Batch(np.stack(pixels), [ex.captions[0] for ex in chunk], sizes, crops)
            inputs = list(run.model_inputs(batch, np.random.default_rng([seed, j // size, 202]),
                                                weighted=False))
            mask = np.zeros(size, dtype=np.float32)
            mask[:real] = 1.0
            inputs[WEIGHTS] = ms.Tensor(mask)  # 1 for real examples, 0 for padding
            self.inputs.append((tuple(inputs), real))

    def __call__(self) -> float:
        cell = self.run.loss_cell
        cell.set_train(False)
        try:
            total = sum(float(cell(*inputs).asnumpy()) * self.batch_size for inputs, _ in self.inputs)
        finally:
            cell.set_train(True)
        return total / self.count


class ValidationLossFeature(TrainingFeature):
    name = "validation_loss"
    description = "--validation_split/--validation_data_dir: a loss on held-out images with fixed noise and timesteps"
    order = 20

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group("validation loss (fixed timesteps, noise and seed)")
        g.add_argument("--validation_split", type=float, default=0.0,
                       help="hold this fraction of the training images out for the validation loss")
        g.add_argument("--validation_data_dir", type=str, default=None,
                       help="an imagefolder (metadata.jsonl) of validation images, instead of --validation_split")
        g.add_argument("--validate_every_n_steps", type=int, default=None,
                       help="compute the validation loss every N steps (it is always computed at the end)")
        g.add_argument("--validation_seed", type=int, default=None,
                       help="seed of the validation noise and timesteps (default: --seed)")

    @classmethod
    def check(cls, args) -> None:
        checks = [
            (args.validate_every_n_steps is not None and args.validate_every_n_steps < 1,
             f"--validate_every_n_steps must be at least 1, got {args.validate_every_n_steps}"),
            (not 0.0 <= args.validation_split < 1.0,
             f"--validation_split is a fraction in [0, 1) of the training images, got {args.validation_split}"),
            (args.validation_split > 0 and bool(args.validation_data_dir),
             "--validation_split and --validation_data_dir both choose validation images; pick one"),
            (bool(args.validation_data_dir) and not os.path.isdir(args.validation_data_dir or ""),
             f"--validation_data_dir {args.validation_data_dir} does not exist; pass an imagefolder with "
             f"metadata.jsonl"),
            ((args.validate_every_n_steps is not None or args.validation_seed is not None)
             and not (args.validation_split > 0 or args.validation_data_dir),
             "--validate_every_n_steps/--validation_seed need validation images: --validation_split or "
             "--validation_data_dir"),
        ]
        for bad, message in checks:
            if bad:
                raise LoraError(message)

    def __init__(self, args):
        super().__init__(args)
        self.held_out: list = []
        self.loss = None
        self.losses: list[list] = []  # [step, loss]

    def select_examples(self, run, examples: list) -> list:
        train, self.held_out = split(examples, self.args, run.seed, run.resolution)
        if self.held_out:
            run.say(f"validation loss on {len(self.held_out)} image(s); training on {len(train)}")
        return train

    def setup(self, run) -> None:
        if self.held_out:
            seed = self.args.validation_seed if self.args.validation_seed is not None else run.seed
            self.loss = ValidationLoss(run, self.held_out, seed)

    def after_step(self, run, global_step: int, writer) -> None:
        every = self.args.validate_every_n_steps
        if self.loss is not None and every and global_step % every == 0:
            self._validate(run, global_step, writer)

    def _validate(self, run, global_step: int, writer) -> None:
        loss = self.loss()
        self.losses.append([global_step, loss])
        run.say(f"step {global_step}: validation loss {loss:.6f}")
        if writer is not None:
            writer.add_scalar("val/loss", loss, global_step)
        run.log_event("val_loss", step=global_step, val_loss=loss)

    def finish(self, run, global_step: int, writer) -> list[str]:
        if self.loss is not None and (not self.losses or self.losses[-1][0] != global_step):
            self._validate(run, global_step, writer)
        return []

    def checkpoint(self, folder: str) -> dict:
        return {"validation_losses": self.losses}

    def resume(self, folder: str, state: dict) -> None:
        self.losses = [list(x) for x in state.get("validation_losses", [])]

    def metadata(self) -> dict[str, str]:
        return {"ss_validation_split": str(self.args.validation_split),
                "ss_validate_every_n_steps": str(self.args.validate_every_n_steps),
                "ss_validation_seed": str(self.args.validation_seed)}

    def results(self) -> dict:
        return {"validation_losses": self.losses}
