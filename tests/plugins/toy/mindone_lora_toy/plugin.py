"""The toy plugin: ``toy_sd`` (a model family: an SD1.x-shaped model whose ``model_index.json`` names
``ToyDiffusionPipeline``) and ``toy_counter`` (a training feature: ``--toy_every N`` counts every N-th step, keeps its
count in checkpoints, writes ``ss_toy_*`` metadata and, at the end, the lifecycle calls it saw to
``toy_feature_calls.json``). Registered only through the ``mindone_lora`` entry point; no core file knows it."""

from __future__ import annotations

import json
import os

from mindone_lora_plugin.architectures.base import STRUCTURE, Evidence
from mindone_lora_plugin.architectures.sd.arch import SD1
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.hookspecs import hookimpl
from mindone_lora_plugin.train.features.base import TrainingFeature

PIPELINE = "ToyDiffusionPipeline"
CALLS_FILE = "toy_feature_calls.json"


class ToySD(SD1):
    name = "toy_sd"
    label = "Toy SD"
    description = "a toy family: SD1.x-shaped, told apart by its model_index.json"
    unused_flags = ("snr_gamma",)
    modelspec_architecture = "toy-sd/lora"  # its files say so (SD1.x would claim them by their widths)
    modelspec_prefix = "toy-sd"

    def detect_folder(self, folder) -> int:
        return 5 if folder.class_name == PIPELINE else 0

    def detect_lora(self, parsed, tensors, metadata, sgm_used=False):
        if metadata.get("modelspec.architecture") == self.modelspec_architecture:
            return Evidence(self.name, STRUCTURE, f"its header names {self.modelspec_architecture}")
        return None


class ToyCounter(TrainingFeature):
    name = "toy_counter"
    description = "--toy_every N: count every N-th step"

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument_group("toy counter").add_argument("--toy_every", type=int, default=None)

    @classmethod
    def check(cls, args) -> None:
        if args.toy_every is not None and args.toy_every < 1:
            raise LoraError(f"--toy_every must be at least 1, got {args.toy_every}")

    def __init__(self, args):
        super().__init__(args)
        self.calls = ["init"]
        self.count = 0

    def select_examples(self, run, examples):
        self.calls.append(f"select_examples:{len(examples)}")
        return examples

    def setup(self, run):
        self.calls.append(f"setup:{sum(len(g['params']) for g in run.groups)}")

    def after_step(self, run, global_step, writer):
        self.calls.append(f"after_step:{global_step}")
        if self.args.toy_every and global_step % self.args.toy_every == 0:
            self.count += 1

    def checkpoint(self, folder):
        self.calls.append("checkpoint")
        return {"toy_count": self.count}

    def resume(self, folder, state):
        self.calls.append("resume")
        self.count = int(state.get("toy_count", 0))

    def metadata(self):
        return {"ss_toy_every": str(self.args.toy_every), "ss_toy_count": str(self.count)}

    def finish(self, run, global_step, writer):
        self.calls.append(f"finish:{global_step}")
        if not run.is_main:
            return []
        path = os.path.join(self.args.output_dir, CALLS_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"calls": self.calls, "count": self.count}, f)
        return []


@hookimpl
def mindone_lora_architectures():
    yield ToySD()


@hookimpl
def mindone_lora_training_features():
    yield ToyCounter
