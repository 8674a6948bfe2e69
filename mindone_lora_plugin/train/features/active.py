"""The training features of one run, called in order at each point of the lifecycle
(:mod:`mindone_lora_plugin.train.features.base`): the trainer talks to this object only, never to a feature by name.
"""

from __future__ import annotations

import contextlib

KIND = "training_features"


def installed(pm) -> list:
    """The installed feature classes, in calling order (``order``, then name)."""
    return sorted(pm.objects(KIND).values(), key=lambda cls: (cls.order, cls.name))


def add_arguments(parser, pm) -> None:
    """Every installed feature's flags."""
    for cls in installed(pm):
        cls.add_arguments(parser)


def check(args, pm) -> None:
    """Every installed feature's flag checks (before any model loads)."""
    for cls in installed(pm):
        cls.check(args)


def needs(pm) -> dict:
    """Flag dest → (the flag it needs, words): every installed feature's :attr:`TrainingFeature.needs`."""
    return {dest: need for cls in installed(pm) for dest, need in cls.needs.items()}


def _first(values):
    return next((v for v in values if v is not None), None)


class ActiveFeatures:
    """One instance of every installed feature for this run."""

    def __init__(self, args, pm):
        self.features = [cls(args) for cls in installed(pm)]

    def image_sizer(self, resolution: int):
        return _first(f.image_sizer(resolution) for f in self.features)

    def mask_source(self):
        return _first(f.mask_source() for f in self.features)

    def caption_augment(self):
        return _first(f.caption_augment() for f in self.features)

    def select_examples(self, run, examples: list) -> list:
        for f in self.features:
            examples = f.select_examples(run, examples)
        return examples

    def plan_ready(self, run, plan) -> None:
        for f in self.features:
            f.plan_ready(run, plan)

    def setup(self, run) -> None:
        for f in self.features:
            f.setup(run)

    def after_step(self, run, global_step: int, writer) -> None:
        for f in self.features:
            f.after_step(run, global_step, writer)

    def on_save(self, run, name: str, metadata: dict) -> list[str]:
        return [p for f in self.features for p in f.on_save(run, name, metadata)]

    @contextlib.contextmanager
    def drawing_weights(self):
        with contextlib.ExitStack() as stack:
            for f in self.features:
                stack.enter_context(f.drawing_weights())
            yield

    def checkpoint(self, folder: str) -> dict:
        state: dict = {}
        for f in self.features:
            state.update(f.checkpoint(folder))
        return state

    def resume(self, folder: str, state: dict) -> None:
        for f in self.features:
            f.resume(folder, state)

    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in self.features:
            out.update(f.metadata())
        return out

    def finish(self, run, global_step: int, writer) -> list[str]:
        return [p for f in self.features for p in f.finish(run, global_step, writer)]

    def results(self) -> dict:
        out: dict = {}
        for f in self.features:
            out.update(f.results())
        return out
