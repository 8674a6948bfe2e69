"""A plugin from outside the package (``tests/plugins/toy``: a model family and a training feature) installed with
pip into a folder on ``sys.path`` and found through its ``mindone_lora`` entry point, as an installed distribution
is: it trains without any core file naming it, and its feature sees the whole lifecycle."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from mindone_lora_plugin.cli import main

TOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins", "toy")


@pytest.fixture(scope="module")
def toy_plugin(tmp_path_factory):
    """pip installs the toy distribution (no dependencies, no build isolation) into a folder put on ``sys.path``;
    the process-wide plugin manager is reloaded with it, and without it afterwards."""
    from mindone_lora_plugin.plugins import get_plugin_manager, reset_plugin_manager

    source, target = tmp_path_factory.mktemp("toy-src") / "toy", str(tmp_path_factory.mktemp("toy-site"))
    shutil.copytree(TOY, source)  # the build writes build/ and *.egg-info beside the sources
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-warn-script-location", "--target", target, str(source)], check=True)
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    allow = os.environ.pop("MINDONE_LORA_PLUGINS", None)
    reset_plugin_manager()
    try:
        yield get_plugin_manager()
    finally:
        sys.path.remove(target)
        for name in [m for m in sys.modules if m.split(".")[0] == "mindone_lora_toy"]:
            del sys.modules[name]
        if allow is not None:
            os.environ["MINDONE_LORA_PLUGINS"] = allow
        reset_plugin_manager()


@pytest.fixture(scope="module")
def toy_model(tiny_sd1, tmp_path_factory):
    """The tiny SD1.x folder, marked as the toy family's (its model_index.json names ToyDiffusionPipeline)."""
    folder = str(tmp_path_factory.mktemp("models") / "tiny-toy")
    shutil.copytree(tiny_sd1, folder)
    path = os.path.join(folder, "model_index.json")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(index, _class_name="ToyDiffusionPipeline"), f)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("data") / "shapes"), size=32, repeats=1)


def train_args(model, data, out, *extra, steps: int = 2):
    return ["train", "--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--max_train_steps", str(steps), "--train_batch_size", "2", "--resolution", "32", "--report_to", "none",
            "--mode", "pynative", "--device_target", "CPU", "--seed", "1", *extra]


def test_the_plugin_is_found_through_its_entry_point(toy_plugin):
    info = toy_plugin.infos["toy"]
    assert (info.dist, info.version, info.builtin) == ("mindone-lora-toy", "0.0.1", False)
    assert toy_plugin.plugin_of("architectures", "toy_sd") == "toy"
    assert toy_plugin.plugin_of("training_features", "toy_counter") == "toy"
    assert toy_plugin.plugin_of("training_features", "ema") == "features"


def test_its_checks_run_before_any_model_loads(toy_plugin, toy_model, data, tmp_path, capsys):
    assert main(train_args(toy_model, data, str(tmp_path / "a"), "--toy_every", "0")) == 2
    assert capsys.readouterr().err.strip() == "mindone-lora: error: --toy_every must be at least 1, got 0"
    assert main(train_args(toy_model, data, str(tmp_path / "b"), "--snr_gamma", "5")) == 2  # its unused_flags
    assert capsys.readouterr().err.strip() == ("mindone-lora: error: --snr_gamma does not apply to Toy SD training "
                                               "(toy_sd); leave it out")


def test_training_a_toy_family_with_a_toy_feature(toy_plugin, toy_model, data, tmp_path):
    from mindone_lora_plugin import safetensors_io

    out = str(tmp_path / "run")
    assert main(train_args(toy_model, data, out, "--toy_every", "1", "--checkpointing_steps", "1",
                           "--save_formats", "kohya", "--output_name", "toy")) == 0
    with open(os.path.join(out, "toy_feature_calls.json"), encoding="utf-8") as f:
        seen = json.load(f)
    assert seen["calls"][0] == "init" and seen["calls"][1] == f"select_examples:{len(os.listdir(data)) - 1}"
    assert seen["calls"][2].startswith("setup:") and int(seen["calls"][2].split(":")[1]) > 0  # the trained params
    assert seen["calls"][3:] == ["after_step:1", "checkpoint", "after_step:2", "finish:2"]
    assert seen["count"] == 2
    _, meta = safetensors_io.load(os.path.join(out, "toy.safetensors"))
    assert (meta["ss_toy_every"], meta["ss_toy_count"]) == ("1", "2")
    assert json.loads(meta["mindone_lora.training_args"])["toy_every"] == 1
    with open(os.path.join(out, "checkpoint-1", "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["toy_count"] == 1 and state["lora"]["architecture"] == "toy_sd"
    # a resume gives the feature its checkpointed state back
    assert main(train_args(toy_model, data, out, "--toy_every", "1", "--save_formats", "kohya", "--output_name", "toy",
                           "--resume_from_checkpoint", "latest", steps=3)) == 0
    with open(os.path.join(out, "toy_feature_calls.json"), encoding="utf-8") as f:
        seen = json.load(f)
    assert "resume" in seen["calls"] and seen["calls"][-2:] == ["after_step:3", "finish:3"] and seen["count"] == 3
