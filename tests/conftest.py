"""Shared fixtures: tiny SD1.x/SDXL model folders (built once per test session, from config, no hub), a fresh plugin
manager, ``ms_tools`` (MindSpore tensors and modes), ``training`` (parse and run ``mindone-lora train``, load written
files back) and ``dora_run`` (a DoRA training run)."""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("GLOG_v", "3")


def pytest_configure(config):
    """PyNative's synchronous launches on CPU, as the ``mindone-lora`` commands set them: it has to happen before
    the first operator of a test process (a fixture building a tiny model), or it never takes effect there."""
    from mindone_lora_plugin.runtime.process import launch_synchronously

    launch_synchronously("CPU")


#: the test files (paths under tests/) that take longest (a minute or more of one core each in a full run on the
#: 2-core machine), longest first: under ``make test``'s ``--dist loadfile --no-loadscope-reorder`` the workers take
#: files in collection order, so these start first and the run ends on short files instead of one worker finishing a
#: long one alone
SLOWEST_FIRST = ("runtime/cpu/test_cpu_backend.py", "algorithms/test_algorithms.py", "scripts/test_integration.py",
                 "demo/test_shapes_demo.py", "runtime/test_checkpointing.py", "algorithms/test_lora_dropout.py",
                 "train/test_train.py", "test_plugins.py", "train/features/test_train_features.py",
                 "ui/test_ui_browser.py", "train/test_distributed.py", "train/test_train_events.py",
                 "compose/test_interop_outputs.py", "train/data/test_train_data_features.py", "algorithms/test_dora.py",
                 "train/test_dreambooth.py", "architectures/flux/test_flux_model_arch.py",
                 "architectures/flux/test_flux_model.py", "architectures/flux/test_flux_ops.py")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    def where(item) -> str:  # the file's path under tests/, with forward slashes
        return os.path.relpath(str(item.path), HERE).replace(os.sep, "/")

    items.sort(key=lambda item: rank.get(where(item), len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> str:
    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model

    return ensure_tiny_model("sd1", str(tmp_path_factory.mktemp("models") / "tiny-sd1"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model

    return ensure_tiny_model("sdxl", str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


@pytest.fixture
def plugin_manager():
    """A fresh process-wide plugin manager for the test, forgotten afterwards."""
    from mindone_lora_plugin.plugins import get_plugin_manager, reset_plugin_manager

    reset_plugin_manager()
    yield get_plugin_manager()
    reset_plugin_manager()


# ------------------------------------------------------------------------------------------------ MindSpore


def T(array, dtype=None):
    """A MindSpore tensor of ``array`` (``dtype``: a MindSpore dtype, None keeps numpy's)."""
    import mindspore as ms

    return ms.Tensor(np.asarray(array), dtype=dtype)


@contextlib.contextmanager
def pynative():
    """PyNative for the block (whatever an earlier test module left behind); the previous mode comes back."""
    import mindspore as ms

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=mode)


@contextlib.contextmanager
def graph_mode():
    """GRAPH_MODE with the STRICT syntax level mindone's scripts use; the previous context comes back afterwards."""
    import mindspore as ms

    mode, level = ms.get_context("mode"), ms.get_context("jit_syntax_level")
    ms.set_context(mode=ms.GRAPH_MODE, jit_syntax_level=ms.STRICT)
    try:
        yield
    finally:
        ms.set_context(mode=mode, jit_syntax_level=level)


@pytest.fixture(scope="session")
def ms_tools():
    """``T(array, dtype=None)``, and the ``pynative()`` and ``graph_mode()`` context managers (above)."""
    return SimpleNamespace(T=T, pynative=pynative, graph_mode=graph_mode)


# ------------------------------------------------------------------------------------------------ training runs


def parse(argv):
    from mindone_lora_plugin.cli import COMMANDS, build_parser

    return build_parser({"train": COMMANDS["train"]}).parse_args(["train"] + list(argv))


def train(argv):
    from mindone_lora_plugin.train.trainer import Trainer

    return Trainer(parse(argv)).run()


def load_back(model: str, files, strategy: str, trained_models):
    """Load each file into fresh models; return ``[(state, {output: max abs difference vs the trained models})]``."""
    import mindspore as ms

    from mindone_lora_plugin.demo.training import model_outputs
    from mindone_lora_plugin.models import load_models
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.plugins import get_plugin_manager

    pm = get_plugin_manager()
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        ref = model_outputs(trained_models)
        found = []
        for path in files:
            fresh = load_models(model)
            state = pm.load_weights(fresh, LoraOptions(strategy=strategy), path)
            got = model_outputs(fresh)
            found.append((state, {k: float(np.abs(got[k] - ref[k]).max()) for k in ref}))
        return found
    finally:
        ms.set_context(mode=mode)


def base_outputs_differ(model: str, trained_models) -> float:
    """Max abs difference between the base model's UNet output and the trained one's (the LoRA is not a no-op)."""
    import mindspore as ms

    from mindone_lora_plugin.demo.training import model_outputs
    from mindone_lora_plugin.models import load_models

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        return float(np.abs(model_outputs(load_models(model))["unet"] - model_outputs(trained_models)["unet"]).max())
    finally:
        ms.set_context(mode=mode)


@pytest.fixture(scope="session")
def training():
    """``parse(argv)`` and ``train(argv)`` (``mindone-lora train``'s arguments, without the command: the namespace and
    the finished run), ``load_back`` and ``base_outputs_differ`` (above)."""
    return SimpleNamespace(parse=parse, train=train, load_back=load_back, base_outputs_differ=base_outputs_differ)


def dora_train_args(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--max_train_steps", "2", "--train_batch_size", "2", "--learning_rate", "1e-2",
            "--lr_warmup_steps", "0", "--seed", "5", "--report_to", "none", "--device_target", "CPU",
            "--mode", "pynative", "--resolution", "32", "--lora_dora", "--lora_targets", "attn",
            "--lora_alpha", "2", "--output_name", "d", "--checkpointing_steps", "1", *extra]


@pytest.fixture(scope="session")
def dora_run(tiny_sd1, tmp_path_factory):
    """``mindone-lora train --lora_dora`` (PyNative, 2 steps, a checkpoint after each), shared by the DoRA training
    test (algorithms/) and the DoRA merge test (compose/): the run, its data folder, the folder holding both, and the
    arguments it ran with (a function of model, data, output folder and extra flags)."""
    from mindone_lora_plugin.demo.training import make_shapes_dataset
    from mindone_lora_plugin.plugins import reset_plugin_manager

    reset_plugin_manager()
    tmp = tmp_path_factory.mktemp("dora-run")
    data = make_shapes_dataset(str(tmp / "data"), size=32, repeats=1)
    run = train(dora_train_args(tiny_sd1, data, str(tmp / "a")))
    reset_plugin_manager()
    return run, data, tmp, dora_train_args
