"""Validation loss: held-out images (``--validation_split``) or a folder (``--validation_data_dir``).

The figure is comparable across steps, runs and resumes: the held-out images are chosen by the seed, each is
centre-cropped, unflipped, with its first caption, and its VAE sample, noise and timestep come from a generator keyed
only by ``--validation_seed`` (default ``--seed``) and the batch number — drawn once, before the first step. The loss
is the plain (unweighted) MSE of the denoising target, computed with the adapters in eval mode (no dropout).
"""

from __future__ import annotations

import copy

import numpy as np

from mindone_lora_plugin.errors import LoraError

WEIGHTS = 5  # position of the per-sample loss weights among DenoiseLoss's inputs


def split(examples: list, args, seed: int, resolution: int) -> tuple[list, list]:
    """``(training examples, validation examples)``: a seeded held-out fraction, a folder, or none."""
    if args.validation_data_dir:
        from mindone_lora_plugin.train.data import load_examples

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

    def __init__(self, trainer, examples: list, seed: int):
        from mindone_lora_plugin.train.data import Batch

        self.trainer = trainer
        self.count = len(examples)
        size, r = max(1, min(trainer.args.train_batch_size, len(examples))), trainer.resolution
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
            inputs = list(trainer._model_inputs(batch, np.random.default_rng([seed, j // size, 202]),
                                                weighted=False))
            mask = np.zeros(size, dtype=np.float32)
            mask[:real] = 1.0
            inputs[WEIGHTS] = trainer._ms.Tensor(mask)  # 1 for real examples, 0 for padding
            self.inputs.append((tuple(inputs), real))

    def __call__(self) -> float:
        cell = self.trainer.loss_cell
        cell.set_train(False)
        try:
            total = sum(float(cell(*inputs).asnumpy()) * self.batch_size for inputs, _ in self.inputs)
        finally:
            cell.set_train(True)
        return total / self.count
