"""The script-author integration API and ``mindone-lora run`` on this project's own scripts with mindone's seams.

The scripts in ``tests/scripts/mindone_scripts/`` were written for these tests; they use the seams mindone's LoRA
scripts use (``add_adapter(LoraConfig)``, ``requires_grad`` filtering, ``TrainStep``, ``get_scheduler``,
``save_lora_weights(convert_state_dict_to_diffusers(get_peft_model_state_dict(...)))``). Every run is 1-2 steps at
32×32 on the tiny models, in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pytest

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.hookspecs import hookimpl

HERE = os.path.dirname(os.path.abspath(__file__))
SD1_SCRIPT = os.path.join(HERE, "mindone_scripts", "train_t2i_lora.py")
SDXL_SCRIPT = os.path.join(HERE, "mindone_scripts", "train_t2i_lora_sdxl.py")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("data") / "shapes"), size=32, repeats=1)


def script_args(model: str, data: str, out: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2", "--lora_rank", "4",
            "--seed", "0", *extra]


def run_in_process(script: str, argv: list[str]):
    """What ``mindone-lora run SCRIPT argv...`` does, returning the result with the session (the trained models)."""
    from mindone_lora_plugin.commands.run import run_script
    from mindone_lora_plugin.integration import LoraIntegration, split_lora_args

    lora_args, rest = split_lora_args(argv)
    return run_script(script, rest, LoraIntegration.from_args(lora_args, rank=4, train_text_encoder=False))


def lora_arrays(cell) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    from mindone_lora_plugin.models import ADAPTER, lora_layers

    return {path: (layer.lora_A[ADAPTER].weight.asnumpy(), layer.lora_B[ADAPTER].weight.asnumpy(),
                   float(layer.scaling[ADAPTER]))
            for path, layer in lora_layers(cell)}


def assert_state_matches(state, models, alpha: float, rank: int = 4):
    """Every module of the file ``state`` equals the trained model's adapter, with the true alpha; nothing missing."""
    for comp, cell in models.items():
        trained = lora_arrays(cell)
        assert set(state.components.get(comp, {})) == set(trained), comp
        for path, mod in state.components[comp].items():
            down, up, _ = trained[path]
            np.testing.assert_array_equal(mod.down, down)
            np.testing.assert_array_equal(mod.up.reshape(up.shape), up)
            assert mod.alpha == alpha and mod.rank == rank, (comp, path)


def safetensors_header(path: str) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


class _Strategies:
    """A test plugin: a strategy that trains the SD1.x UNet and text encoder by default."""

    def __init__(self):
        from mindone_lora_plugin.strategies.base import LoraStrategy

        class UnetAndTextEncoder(LoraStrategy):
            name = "test-unet-te"
            description = "UNet and text encoder (test)"
            components = ("unet", "text_encoder")
            default_components = ("unet", "text_encoder")
            architectures = ("sd1", "sd2")

        self.strategy = UnetAndTextEncoder()

    @hookimpl
    def mindone_lora_strategies(self):
        yield self.strategy


class _Recorder:
    """A test plugin wrapping the four operation hooks, to see that the integration API goes through them."""

    def __init__(self):
        self.calls: list[str] = []

    @hookimpl(wrapper=True)
    def mindone_lora_add_adapters(self, manager, models, options):
        self.calls.append("add_adapters")
        return (yield)

    @hookimpl(wrapper=True)
    def mindone_lora_trainable_parameters(self, manager, models, options):
        self.calls.append("trainable_parameters")
        return (yield)

    @hookimpl(wrapper=True)
    def mindone_lora_save_weights(self, manager, models, options, output_dir, formats, output_name, metadata):
        self.calls.append("save_weights")
        return (yield)

    @hookimpl(wrapper=True)
    def mindone_lora_load_weights(self, manager, models, options, path):
        self.calls.append("load_weights")
        return (yield)


# ---------------------------------------------------------------------------------------------- flags (no MindSpore)


def test_split_takes_only_the_plugin_flags():
    from mindone_lora_plugin.integration import split_lora_args

    ns, rest = split_lora_args(["--output_dir", "out", "--lora_rank", "8", "--lora_strategy", "sdxl",
                                "--lora_alpha=2", "--noise_offset", "-0.1", "--lora_targets", "kohya",
                                "--", "--lora_alpha", "3"])
    assert (ns.lora_strategy, ns.lora_alpha, ns.lora_targets) == ("sdxl", 2.0, "kohya")
    assert ns.lora_save_formats == "diffusers,kohya" and ns.lora_resume_from is None
    # the script's own --lora_rank, its other flags (order kept) and everything after -- reach the script
    assert rest == ["--output_dir", "out", "--lora_rank", "8", "--noise_offset", "-0.1", "--lora_alpha", "3"]


def test_add_lora_arguments_to_a_script_parser(plugin_manager):
    from mindone_lora_plugin.integration import LoraIntegration, add_lora_arguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--lora_rank", type=int, default=4)
    parser.add_argument("--train_text_encoder", action="store_true")
    add_lora_arguments(parser)
    args = parser.parse_args(["--lora_rank", "8", "--lora_alpha", "4", "--lora_targets", "to_q,ff.net.2",
                              "--train_text_encoder", "--lora_save_formats", "kohya"])
    lora = LoraIntegration.from_args(args)
    options = lora.make_options("sd1")
    assert (options.strategy, options.rank, options.effective_alpha) == ("unet", 8, 4.0)
    assert options.targets == ["to_q", "ff.net.2"] and options.train_text_encoder is True
    assert lora.save_formats == ["kohya"] and lora.make_options("sdxl").strategy == "sdxl"


@pytest.mark.parametrize("flags, message", [
    (["--lora_strategy", "nope"], "unknown LoRA strategy 'nope'"),
    (["--lora_save_formats", "diffusers,nope"], "unknown LoRA format 'nope'"),
    (["--lora_resume_from", "/no/such/lora.safetensors"], "no such file"),
    (["--lora_alpha", "abc"], "--lora_alpha"),
])
def test_bad_requests_are_refused_before_the_script_runs(flags, message, tmp_path, capsys, plugin_manager):
    from mindone_lora_plugin.cli import main

    code = main(["run", SD1_SCRIPT, "--output_dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # the script never started


def test_run_help_and_missing_script(capsys, tmp_path):
    from mindone_lora_plugin.cli import main

    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--lora_strategy", "--lora_alpha", "--lora_targets", "--lora_save_formats", "--lora_resume_from"):
        assert flag in out
    assert main(["run", str(tmp_path / "missing.py")]) == 2
    assert "no such script" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the patches


def test_patches_are_installed_and_undone():
    from mindone_lora_plugin.integration import LoraIntegration
    from mindone_lora_plugin.runtime.process import quiet_mindone_imports
    from mindone_lora_plugin.scripts.seams import patched
    from mindone_lora_plugin.scripts.session import ScriptSession

    quiet_mindone_imports()
    from mindone.diffusers import StableDiffusionPipeline, optimization, training_utils
    from mindone.diffusers.loaders import peft as diffusers_peft
    from mindone.transformers.integrations import peft as transformers_peft

    originals = (diffusers_peft.PeftAdapterMixin.add_adapter, transformers_peft.PeftAdapterMixin.add_adapter,
                 training_utils.TrainStep.__init__, optimization.get_scheduler)
    save = StableDiffusionPipeline.save_lora_weights.__func__
    with patched(ScriptSession(LoraIntegration())):
        assert getattr(diffusers_peft.PeftAdapterMixin.add_adapter, "__mindone_lora_patch__", False)
        assert getattr(transformers_peft.PeftAdapterMixin.add_adapter, "__mindone_lora_patch__", False)
        assert getattr(StableDiffusionPipeline.save_lora_weights, "__mindone_lora_patch__", False)
        from mindone.diffusers.optimization import get_scheduler

        assert len(get_scheduler("constant", 1e-4, num_warmup_steps=0, num_training_steps=3)) == 4
        from mindone.diffusers._peft import LoraConfig  # older scripts' import path
        from mindone.diffusers._peft.tuners.tuners_utils import BaseTunerLayer
        from mindone.peft import LoraConfig as current
        from mindone.peft.tuners.tuners_utils import BaseTunerLayer as current_layer

        assert LoraConfig is current and BaseTunerLayer is current_layer
    assert (diffusers_peft.PeftAdapterMixin.add_adapter, transformers_peft.PeftAdapterMixin.add_adapter,
            training_utils.TrainStep.__init__, optimization.get_scheduler) == originals
    assert StableDiffusionPipeline.save_lora_weights.__func__ is save
    assert "mindone.diffusers._peft" not in sys.modules
    assert len(optimization.get_scheduler("constant", 1e-4, num_warmup_steps=0, num_training_steps=3)) == 3


# ---------------------------------------------------------------------------------------------- the integration API


def test_integration_api_four_seams_through_the_hooks(tiny_sd1, tmp_path, plugin_manager):
    import mindspore as ms

    from mindone_lora_plugin.formats.reader import read_lora
    from mindone_lora_plugin.integration import LoraIntegration, add_lora_arguments
    from mindone_lora_plugin.models import load_models

    recorder = _Recorder()
    plugin_manager.register_plugin(recorder, name="test-recorder")
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora_rank", type=int, default=4)
    parser.add_argument("--train_text_encoder", action="store_true")
    add_lora_arguments(parser)
    flags = ["--lora_rank", "2", "--lora_alpha", "1", "--lora_targets", "kohya", "--train_text_encoder"]

    models = load_models(tiny_sd1, components=("unet", "text_encoder"))
    lora = LoraIntegration.from_args(parser.parse_args(flags))
    adapted = lora.add_adapters(unet=models["unet"], text_encoder=models["text_encoder"])
    assert set(adapted) == {"unet", "text_encoder"} and lora.trains("text_encoder")
    params = lora.trainable_parameters()
    requires_grad = [p for cell in models.values() for p in cell.get_parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in requires_grad}  # what the script's filter would have picked
    rng = np.random.default_rng(0)
    for p in params:  # "train": B is zero after the gaussian init
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)))
    paths = lora.save(str(tmp_path / "my-lora"))
    assert sorted(os.path.basename(p) for p in paths) == ["my-lora.safetensors", WEIGHT_NAME]
    for path in paths:
        assert_state_matches(read_lora(path), models, alpha=1.0, rank=2)

    # warm start (--lora_resume_from, either format) into fresh models, then load() again
    for path in paths:
        fresh = load_models(tiny_sd1, components=("unet", "text_encoder"))
        warm = LoraIntegration.from_args(parser.parse_args(flags + ["--lora_resume_from", path]))
        warm.add_adapters(unet=fresh["unet"], text_encoder=fresh["text_encoder"])
        for comp in ("unet", "text_encoder"):
            want, got = lora_arrays(models[comp]), lora_arrays(fresh[comp])
            assert set(got) == set(want)
            for key, (a, b, scaling) in want.items():
                np.testing.assert_array_equal(got[key][0], a)
                np.testing.assert_array_equal(got[key][1], b)
                assert got[key][2] == scaling == 0.5
    warm.load(paths[0])
    assert recorder.calls[:3] == ["add_adapters", "trainable_parameters", "trainable_parameters"]
    assert {"save_weights", "load_weights"} <= set(recorder.calls)

    # a file for components this run does not train is refused
    unet_only = LoraIntegration(rank=2, alpha=1, targets="kohya")
    unet_only.add_adapters(unet=load_models(tiny_sd1, components=("unet",))["unet"])
    with pytest.raises(LoraError, match="which this run does not train"):
        unet_only.load(paths[0])


# ---------------------------------------------------------------------------------------------- mindone-lora run


@pytest.mark.slow
def test_run_sd1_script_kohya_targets_graph_mode(tiny_sd1, shapes, tmp_path):
    """mindone's default mode; targets beyond attention (the mixed-key pitfall); alpha ≠ rank; checkpoints."""
    from mindone_lora_plugin.formats.reader import read_lora
    from mindone_lora_plugin.runtime.process import quiet_mindone_imports

    out = str(tmp_path / "sd1-lora")
    result = run_in_process(SD1_SCRIPT, script_args(tiny_sd1, shapes, out, "--checkpointing_steps", "1",
                                                    "--lora_targets", "kohya", "--lora_alpha", "2"))
    assert result.exit_code == 0
    session = result.session
    assert list(session.models) == ["unet"] and len(session.adapted["unet"]) == 72  # kohya targets, not the 48 attn
    for folder in (out, os.path.join(out, "checkpoint-1"), os.path.join(out, "checkpoint-2")):
        assert sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) == [WEIGHT_NAME,
                                                                                        "sd1-lora.safetensors"]
    trained = session.bundle()
    b = lora_arrays(trained["unet"])
    assert all(np.abs(up).max() > 0 for _, up, _ in b.values())  # B moved away from its zero init: it trained
    for name in (WEIGHT_NAME, "sd1-lora.safetensors"):
        assert_state_matches(read_lora(os.path.join(out, name)), trained, alpha=2.0)
    first = read_lora(os.path.join(out, "checkpoint-1", WEIGHT_NAME)).components["unet"]
    final = read_lora(os.path.join(out, WEIGHT_NAME)).components["unet"]
    assert any(not np.array_equal(m.up, final[p].up) for p, m in first.items())  # checkpoint-1: step 1's weights

    # the diffusers file: pure PEFT keys and the true alpha in its header; mindone's own loader gets every module
    header = safetensors_header(os.path.join(out, WEIGHT_NAME))
    keys = [k for k in header if k != "__metadata__"]
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys) and len(keys) == 144
    config = json.loads(header["__metadata__"]["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (4, 2)
    quiet_mindone_imports()
    from mindone.diffusers import UNet2DConditionModel

    fresh = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    fresh.load_lora_adapter(out, prefix="unet", weight_name=WEIGHT_NAME, adapter_name="default")
    loaded = lora_arrays(fresh)
    assert set(loaded) == set(b)
    for path, (down, up, _) in b.items():
        np.testing.assert_array_equal(loaded[path][0], down)
        np.testing.assert_array_equal(loaded[path][1], up)
        assert loaded[path][2] == 0.5  # alpha 2 / rank 4


def test_run_passes_the_scripts_gradient_checkpointing_flag(tiny_sd1, shapes, tmp_path, capsys):
    out = str(tmp_path / "run-gc")
    result = run_in_process(SD1_SCRIPT, script_args(tiny_sd1, shapes, out, "--gradient_checkpointing", "--mode",
                                                    "pynative", "--max_train_steps", "1"))
    assert result.exit_code == 0
    assert "gradient checkpointing: 18 blocks of UNet2DConditionModel recomputed" in capsys.readouterr().err
    from mindone_lora_plugin.runtime import recompute

    assert recompute.is_enabled(result.session.models["unet"])


@pytest.mark.slow
def test_run_sd1_script_with_lokr(tiny_sd1, shapes, tmp_path):
    """`mindone-lora run --lora_algo lokr`: mindone's own script trains LoKr adapters (its optimizer gets their
    factors) and the kohya file holds them; the diffusers layout, which cannot hold LoKr, is refused up front."""
    from mindone_lora_plugin.formats.reader import read_lora

    out = str(tmp_path / "lokr")
    result = run_in_process(SD1_SCRIPT, script_args(tiny_sd1, shapes, out, "--mode", "pynative", "--lora_algo",
                                                    "lokr", "--lora_save_formats", "kohya", "--lora_output_name", "k"))
    assert result.exit_code == 0
    state = read_lora(os.path.join(out, "k.safetensors"))
    assert set(state.algorithms()) == {"lokr"} and len(state) == len(result.session.adapted["unet"]) > 10
    assert max(float(np.abs(m.delta()).max()) for _, _, m in state.modules()) > 0  # the zero-initialised factor moved
    with pytest.raises(Exception, match="kohya"):
        run_in_process(SD1_SCRIPT, script_args(tiny_sd1, shapes, str(tmp_path / "d"), "--lora_algo", "lokr",
                                               "--lora_save_formats", "diffusers"))


@pytest.mark.slow
def test_run_sdxl_script_with_both_text_encoders(tiny_sdxl, shapes, tmp_path, capsys, monkeypatch):
    """SDXL: UNet + both text encoders, alpha 8 with the script's rank 4, through the command line."""
    from mindone_lora_plugin.cli import main
    from mindone_lora_plugin.formats.reader import read_lora
    from mindone_lora_plugin.scripts.session import ScriptSession

    out = str(tmp_path / "sdxl-lora")
    sessions = []
    init = ScriptSession.__init__

    def keep(self, *a, **kw):  # the command line does not return the session; note it for the checks below
        init(self, *a, **kw)
        sessions.append(self)

    monkeypatch.setattr(ScriptSession, "__init__", keep)
    code = main(["run", "--lora_alpha", "8", SDXL_SCRIPT,
                 *script_args(tiny_sdxl, shapes, out, "--mode", "pynative", "--train_text_encoder",
                              "--lora_output_name", "xl")])
    err = capsys.readouterr().err
    assert code == 0, err
    session = sessions[0]
    assert set(session.models) == {"unet", "text_encoder", "text_encoder_2"}
    assert "strategy 'sdxl'" in err
    trained = session.bundle()
    for name in (WEIGHT_NAME, "xl.safetensors"):
        state = read_lora(os.path.join(out, name))
        assert state.architecture == "sdxl"
        assert_state_matches(state, trained, alpha=8.0)
    config = json.loads(safetensors_header(os.path.join(out, WEIGHT_NAME))["__metadata__"]["lora_adapter_metadata"])
    assert config["text_encoder_2.lora_alpha"] == 8 and config["text_encoder.r"] == 4
    # the second encoder and the UNet trained (the first encoder's last layer gets no gradient in SDXL)
    for comp in ("unet", "text_encoder_2"):
        assert any(np.abs(up).max() > 0 for _, up, _ in lora_arrays(trained[comp]).values()), comp


# ---------------------------------------------------------------------------------------------- refusals


def test_run_refuses_a_strategy_without_the_unet(tiny_sd1, shapes, tmp_path, capsys, plugin_manager):
    from mindone_lora_plugin.cli import main

    out = tmp_path / "out"
    code = main(["run", SD1_SCRIPT, *script_args(tiny_sd1, shapes, str(out), "--mode", "pynative"),
                 "--lora_strategy", "text_encoder"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "strategy 'text_encoder' does not train the unet" in err and err.count("error:") == 1
    assert not any(name.endswith(".safetensors") for _, _, files in os.walk(out) for name in files)


def test_run_refuses_text_encoders_the_script_never_adapts(tiny_sd1, shapes, tmp_path, capsys, plugin_manager):
    from mindone_lora_plugin.cli import main

    plugin_manager.register_plugin(_Strategies(), name="test-strategies")
    out = tmp_path / "out"
    code = main(["run", SD1_SCRIPT, *script_args(tiny_sd1, shapes, str(out), "--mode", "pynative"),
                 "--lora_strategy", "test-unet-te"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "trains the text_encoder, but train_t2i_lora.py never adds LoRA adapters to it" in captured.err
    assert "step 1" not in captured.out  # refused before the first training step
    assert not any(name.endswith(".safetensors") for _, _, files in os.walk(out) for name in files)


def test_run_refuses_adapters_left_out_of_the_optimizer(tiny_sdxl, shapes, tmp_path, capsys, plugin_manager):
    from mindone_lora_plugin.cli import main

    code = main(["run", SDXL_SCRIPT, *script_args(tiny_sdxl, shapes, str(tmp_path / "out"), "--mode", "pynative",
                                                   "--train_text_encoder", "--optimize_unet_only")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "adds LoRA adapters to its text_encoder but never optimizes them" in err


def test_run_refuses_unet_strategy_with_sdxl_text_encoders(tiny_sdxl, shapes, tmp_path, capsys, plugin_manager):
    from mindone_lora_plugin.cli import main

    code = main(["run", SDXL_SCRIPT, *script_args(tiny_sdxl, shapes, str(tmp_path / "out"), "--mode", "pynative",
                                                   "--train_text_encoder"), "--lora_strategy", "unet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "strategy 'unet' does not train the text_encoder" in err and "--lora_strategy sdxl" in err


def test_run_warm_start_from_a_kohya_file(tiny_sd1, shapes, tmp_path, capsys):
    """--lora_resume_from: the file's weights are in the adapters when training starts (learning rate 0 keeps them)."""
    import mindspore as ms

    from mindone_lora_plugin.formats.reader import read_lora
    from mindone_lora_plugin.integration import LoraIntegration
    from mindone_lora_plugin.models import load_models

    author = LoraIntegration(rank=4, alpha=2, targets="kohya", save_formats="kohya")
    author.add_adapters(unet=load_models(tiny_sd1, components=("unet",))["unet"])
    rng = np.random.default_rng(1)
    for p in author.trainable_parameters():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
    (kohya,) = author.save(str(tmp_path / "start"))

    out = str(tmp_path / "warm")
    result = run_in_process(SD1_SCRIPT, script_args(tiny_sd1, shapes, out, "--mode", "pynative", "--max_train_steps",
                                                    "1", "--learning_rate", "0", "--lora_targets", "kohya",
                                                    "--lora_alpha", "2", "--lora_resume_from", kohya))
    assert result.exit_code == 0 and result.session.resumed_from == kohya
    assert "warm start from" in capsys.readouterr().err
    start = read_lora(kohya)
    for name in (WEIGHT_NAME, "warm.safetensors"):
        saved = read_lora(os.path.join(out, name))
        assert set(saved.components["unet"]) == set(start.components["unet"])
        for path, mod in start.components["unet"].items():
            np.testing.assert_allclose(saved.components["unet"][path].down, mod.down, rtol=0, atol=1e-7)
            np.testing.assert_allclose(saved.components["unet"][path].up, mod.up, rtol=0, atol=1e-7)
            assert saved.components["unet"][path].alpha == 2.0
