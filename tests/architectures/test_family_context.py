"""The trainer ⇄ family contract: a family trains from a TrainingContext alone (no trainer), and its code never reaches
for the trainer."""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAMILIES = os.path.join(ROOT, "mindone_lora_plugin", "architectures")


def test_no_family_module_reaches_for_the_trainer():
    """No name, argument or attribute called ``trainer`` and no import of the trainer or its data side in any
    family's code (they get a TrainingContext)."""
    hits = []
    for folder, _, files in os.walk(FAMILIES):
        for name in (n for n in files if n.endswith(".py")):
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                named = (getattr(node, "id", None) or getattr(node, "arg", None) or getattr(node, "attr", None))
                module = getattr(node, "module", None) or ""
                if named == "trainer" or module.startswith(("mindone_lora_plugin.train.trainer",
                                                             "mindone_lora_plugin.train.data")):
                    hits.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert hits == []


@pytest.mark.slow
def test_sd1_loss_and_inputs_from_a_context_alone(tiny_sd1):
    import mindspore as ms

    from mindone_lora_plugin.architectures import get_architecture
    from mindone_lora_plugin.architectures.context import TrainingContext
    from mindone_lora_plugin.models import load_models
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.plugins import get_plugin_manager
    from mindone_lora_plugin.runtime.process import setup
    from mindone_lora_plugin.train.data.loader import Batch
    from mindone_lora_plugin.train.data.setup import StepInputs
    from mindone_lora_plugin.train.step import VaeEncode

    setup("CPU", "pynative", seed=0)
    arch = get_architecture("sd1")
    models = load_models(tiny_sd1)
    get_plugin_manager().add_adapters(models, LoraOptions(strategy="unet", rank=2))
    from mindone_lora_plugin.cli import COMMANDS, build_parser

    args = build_parser({"train": COMMANDS["train"]}).parse_args(
        ["train", "--pretrained_model_name_or_path", tiny_sd1, "--train_data_dir", tiny_sd1, "--output_dir", "x"])
    parts = arch.load_training_parts(tiny_sd1, args, models, ms.float32)
    conditioner = arch.text_conditioner(models)
    inputs = StepInputs(args, parts, VaeEncode(parts.vae), conditioner, False, has_prior=False)
    context = TrainingContext(args, models, parts, conditioner, False, inputs)
    loss_cell = arch.make_loss(context)
    rng = np.random.default_rng(0)
    batch = Batch(pixels=rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32), captions=["a red circle", ""],
                  original_sizes=[(32, 32)] * 2, crops_top_left=[(0, 0)] * 2, loss_weights=np.ones(2, np.float32))
    step_inputs = arch.model_inputs(context, batch, np.random.default_rng(1))
    again = arch.model_inputs(context, batch, np.random.default_rng(1))
    assert all(np.array_equal(a.asnumpy(), b.asnumpy()) for a, b in zip(step_inputs, again))  # every draw from rng
    assert step_inputs[0].shape == (2, 4, 16, 16)  # latents of 32 px images through the tiny VAE (2×)
    loss = float(loss_cell(*step_inputs).asnumpy())
    assert np.isfinite(loss) and loss > 0
    pipe = arch.training_pipeline(models, parts)
    assert pipe.unet is models["unet"] and pipe.vae is parts.vae
