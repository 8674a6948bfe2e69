"""The lifecycle of a training feature: what the trainer calls, when, and what a feature may use of the run.

A feature is a class (the registry holds the class; the trainer makes one instance per run, so no state leaks between
runs). Its class methods run before any model loads; its instance methods run at fixed points of the run::

    add_arguments(parser)           the flags (an argparse group of its own); ``needs``: flag → the flag it needs
    check(args)                     every check of those flags, before any model loads (one LoraError line)
    __init__(args)                  per run, after the checks
    image_sizer(resolution)         how the loaders size images (buckets), or None: square crops
    mask_source()                   where a loader finds an image's loss mask, or None
    caption_augment()               what the batch plan does to a caption each time (shuffle, dropout), or None
    select_examples(run, examples)  may hold examples out of training (the validation loss does)
    plan_ready(run, plan)           the batch plan exists (log it, refuse what it cannot do)
    setup(run)                      the models, adapters, optimizer and step exist (caches are filled here)
    after_step(run, step, writer)   after each optimizer update (step counts from 1)
    on_save(run, name, metadata)    LoRA files called ``name`` were saved: write companions (the EMA's ``-ema``)
    drawing_weights()               a context in which images are drawn (the EMA weights)
    checkpoint(folder) -> dict      write its files into a checkpoint folder; entries for trainer_state.json
    resume(folder, state)           read them back (``state`` is that trainer_state.json)
    metadata() -> dict              ``ss_*`` keys of the saved files (strings)
    finish(run, step, writer)       after the final files; returns the paths it wrote
    results() -> dict               fields of the run's TrainResult it fills (e.g. ``samples``)

``run`` is the :class:`~mindone_lora_plugin.train.features.base.FeatureRun` view of the trainer: what a feature may
read and call, nothing else.
"""

from __future__ import annotations

import contextlib
from typing import Protocol


class FeatureRun(Protocol):
    """What a feature sees of the run (the trainer implements it)."""

    args: object  # the parsed flags
    seed: int
    resolution: int
    is_main: bool  # the worker that writes files
    output_name: str
    max_steps: int
    num_epochs: int
    updates_per_epoch: int
    groups: list  # the optimizer's parameter groups ({"params": [...], ...}); their params are the trained weights

    loss_cell: object  # the loss cell the step trains (set_train(False) for a loss without dropout)
    plan: object  # the BatchPlan: ``examples``, ``prior`` (DreamBooth class images), ``batch(epoch, i)``
    parts: object  # the family's TrainingParts (VAE, tokenizers, scheduler, ...)
    inputs: object  # the run's batch inputs (train/data/setup.StepInputs): where the caches go
    conditioner: object  # the family's text conditioner cell
    train_text: bool  # whether text encoders train

    def model_inputs(self, batch, rng, weighted: bool = True) -> tuple:
        """The loss cell's inputs for a batch, every random draw from ``rng``."""

    def say(self, message: str) -> None:
        """One line to the log and the console (main worker only)."""

    def metadata(self, global_step: int) -> dict[str, str]:
        """The metadata every saved LoRA file carries at ``global_step``."""

    def save_lora(self, name: str, metadata: dict) -> list[str]:
        """Write the current LoRA weights in every chosen format under ``name``; return the paths."""

    def save_named(self, name: str, metadata: dict) -> list[str]:
        """:meth:`save_lora`, then every feature's :meth:`TrainingFeature.on_save` (the EMA files); the paths."""

    def draw(self, prompt: str, num_images: int, steps: int, seed: int, **options) -> list:
        """PIL images drawn with the current weights (``options``: negative_prompt, width, height,
        guidance_scale)."""

    def drawing_weights(self):
        """A context in which images are drawn: every feature's :meth:`TrainingFeature.drawing_weights`."""

    def log_event(self, kind: str, **fields) -> None:
        """One line of train_log.jsonl (which the UI draws)."""


class TrainingFeature:
    """A training feature; override what it needs. ``name`` must be unique among installed features; ``order``
    sorts the features the trainer calls at each point (lower first, then by name)."""

    name = ""
    description = ""
    order = 100
    #: flag dest → (the flag dest it only works with, words naming it): checked with the others, shown by the UI
    needs: dict = {}

    @classmethod
    def describe(cls) -> dict:
        return {"name": cls.name, "description": cls.description}

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Add this feature's flags to ``parser`` (an argparse parser; use a group of your own)."""

    @classmethod
    def check(cls, args) -> None:
        """Raise :class:`~mindone_lora_plugin.errors.LoraError` for a flag value this feature cannot use."""

    def __init__(self, args):
        self.args = args

    def image_sizer(self, resolution: int):
        return None

    def mask_source(self):
        return None

    def caption_augment(self):
        return None

    def select_examples(self, run: FeatureRun, examples: list) -> list:
        return examples

    def plan_ready(self, run: FeatureRun, plan) -> None:
        pass

    def setup(self, run: FeatureRun) -> None:
        pass

    def after_step(self, run: FeatureRun, global_step: int, writer) -> None:
        pass

    def on_save(self, run: FeatureRun, name: str, metadata: dict) -> list[str]:
        return []

    def drawing_weights(self):
        return contextlib.nullcontext()

    def checkpoint(self, folder: str) -> dict:
        return {}

    def resume(self, folder: str, state: dict) -> None:
        pass

    def metadata(self) -> dict[str, str]:
        return {}

    def finish(self, run: FeatureRun, global_step: int, writer) -> list[str]:
        return []

    def results(self) -> dict:
        return {}
