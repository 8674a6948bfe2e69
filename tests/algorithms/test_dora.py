"""DoRA on the built-in ``lora`` algorithm: maths (both norm axes), file layouts, reading, converting, inspecting.

Numpy only (no MindSpore model): the MindSpore and torch sides are in ``test_interop_dora.py``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mindone_lora_plugin.cli import main
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.diffusers import DiffusersFormat
from mindone_lora_plugin.formats.kohya import KohyaFormat
from mindone_lora_plugin.formats.reader import read_lora
from mindone_lora_plugin.state import LoraModule, LoraState


def _dora_state(sd_fakes, axis: str, seed: int = 3) -> tuple[LoraState, dict]:
    """A random SD1 LoRA whose linear modules carry a DoRA magnitude (``axis`` "out": [out]; "in": [1, in]), and
    random base weights for them."""
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    base = tiny_sd1()
    plain = random_state(base, np.random.default_rng(seed), conv=False)
    rng = np.random.default_rng(seed + 1)
    out, weights = LoraState(architecture="sd1", base_config=base.base_config), {}
    for comp, path, mod in plain.modules():
        shape = mod.base_shape()
        if len(shape) != 2:
            continue  # linear modules only (1x1 proj convs of SD1 are left out)
        mag = rng.uniform(0.5, 2.0, shape[0] if axis == "out" else (1, shape[1])).astype(np.float32)
        out.add(comp, path, LoraModule(algorithm="lora", alpha=mod.alpha, settings={"dora_axis": axis},
                                       tensors={"down": mod.down, "up": mod.up, "magnitude": mag}))
        weights[(comp, path)] = rng.standard_normal(shape)
    return out, weights


def _hand_dora(mod: LoraModule, w: np.ndarray, axis: str) -> np.ndarray:
    """``m * (W + dW) / ||W + dW||`` written out: peft's row norm, or LyCORIS's ``wd_on_out=False`` column norm."""
    v = w + (mod.up.astype(np.float64) @ mod.down.astype(np.float64)) * mod.alpha / mod.down.shape[0]
    m = mod.tensors["magnitude"].astype(np.float64).reshape(-1)
    if axis == "out":
        return v * (m / np.sqrt((v ** 2).sum(axis=1)))[:, None]
    return v * (m / np.sqrt((v ** 2).sum(axis=0)))[None, :]


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_merged_weight_matches_the_formula_of_each_axis(axis, sd_fakes):
    state, weights = _dora_state(sd_fakes, axis)
    other = "in" if axis == "out" else "out"
    for comp, path, mod in state.modules():
        w = weights[(comp, path)]
        assert mod.algo.needs_base_weight(mod) and mod.algo.label(mod) == "lora+dora"
        got = mod.algo.merged_weight(mod, w)
        np.testing.assert_allclose(got, _hand_dora(mod, w, axis), rtol=1e-12, atol=1e-12)
        if w.shape[0] == w.shape[1]:  # the two axes really differ
            assert np.abs(got - _hand_dora(mod, w, other)).max() > 1e-3
    with pytest.raises(LoraError, match="depends on the base weight"):
        mod.delta()


def _file_tensors(path):
    return load_file(path)


def test_dora_files_hold_each_tools_layout_and_convert_exactly(tmp_path, sd_fakes):
    state, weights = _dora_state(sd_fakes, "out")
    dpath = DiffusersFormat().write(state, str(tmp_path / "d"))
    kpath = KohyaFormat().write(state, str(tmp_path / "k"), output_name="dora")
    d, k = _file_tensors(dpath), _file_tensors(kpath)
    mags_d = {key: v for key, v in d.items() if key.endswith(".lora_magnitude_vector")}
    mags_k = {key: v for key, v in k.items() if key.endswith(".dora_scale")}
    assert len(mags_d) == len(mags_k) == len(state)
    assert all(v.ndim == 1 for v in mags_d.values())  # peft: [out]
    assert all(v.ndim == 2 and v.shape[1] == 1 for v in mags_k.values())  # LyCORIS wd_on_out: [out, 1]
    from safetensors import safe_open

    with safe_open(dpath, framework="numpy") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.use_dora"] is True and meta["text_encoder.use_dora"] is True
    with safe_open(kpath, framework="numpy") as f:
        args = json.loads(f.metadata()["ss_network_args"])
    assert args["dora_wd"] == "True" and args["wd_on_out"] == "True"

    # diffusers → kohya → diffusers through the CLI: the same merged weights, bit for bit
    k2 = str(tmp_path / "k2.safetensors")
    assert main(["convert", dpath, k2, "--to", "kohya"]) == 0
    d2 = str(tmp_path / "d2")
    assert main(["convert", k2, d2, "--to", "diffusers"]) == 0
    for path in (dpath, kpath, k2, d2):
        back = read_lora(path)
        assert len(back) == len(state)
        for comp, p, mod in state.modules():
            got = back.components[comp][p]
            assert got.settings == {"dora_axis": "out"}
            assert np.array_equal(got.algo.merged_weight(got, weights[(comp, p)]),
                                  mod.algo.merged_weight(mod, weights[(comp, p)])), (path, comp, p)


def test_input_side_dora_stays_kohya(tmp_path, capsys, sd_fakes):
    state, weights = _dora_state(sd_fakes, "in")
    kpath = KohyaFormat().write(state, str(tmp_path / "k"), output_name="dora_in")
    mags = [v for key, v in _file_tensors(kpath).items() if key.endswith(".dora_scale")]
    assert mags and all(v.ndim == 2 and v.shape[0] == 1 for v in mags)  # LyCORIS wd_on_out=False: [1, in]
    back = read_lora(kpath)
    for comp, p, mod in state.modules():
        got = back.components[comp][p]
        assert got.settings == {"dora_axis": "in"}
        np.testing.assert_array_equal(got.algo.merged_weight(got, weights[(comp, p)]),
                                      mod.algo.merged_weight(mod, weights[(comp, p)]))
    assert main(["convert", kpath, str(tmp_path / "d"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err.strip()
    assert "input side" in err and "kohya" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "d" / "pytorch_lora_weights.safetensors")


def test_dora_inspect_and_bad_magnitude(tmp_path, capsys, sd_fakes):
    state, _ = _dora_state(sd_fakes, "out")
    path = KohyaFormat().write(state, str(tmp_path), output_name="dora")
    assert main(["inspect", path]) == 0
    assert "lora+dora" in capsys.readouterr().out
    assert main(["inspect", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["components"]["unet"]["algorithms"] == {"lora+dora": len(state.components["unet"])}

    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(".dora_scale"))
    tensors[key] = np.ones((3, 5), np.float32)
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad)
    assert main(["inspect", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "DoRA magnitude" in err and "[3, 5]" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------ MindSpore layers


def test_dora_layers_match_the_merged_weight_and_refuse_convs(plugin_manager, tiny_sd1):
    """``--lora_dora`` layers: W' = W at the start; with random tensors, the layer's outputs equal the numpy merge of
    what it holds; convs are refused in one line."""
    import mindspore as ms

    from mindone_lora_plugin.compose import apply_loras
    from mindone_lora_plugin.demo.training import model_outputs
    from mindone_lora_plugin.models import load_models, lora_layers
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    pm = plugin_manager
    base = model_outputs(load_models(tiny_sd1))
    models = load_models(tiny_sd1)
    options = LoraOptions(strategy="unet", rank=4, alpha=2, targets="attn", dora=True)
    pm.add_adapters(models, options)
    layers = [layer for _, layer in lora_layers(models["unet"])]
    assert layers and all(type(layer).__name__ == "DoraLayer" for layer in layers)
    start = model_outputs(models)
    assert max(float(np.abs(start[k] - base[k]).max()) for k in base) < 1e-5  # m = ||W||, up = 0
    rng = np.random.default_rng(1)
    for layer in layers:
        for p in (layer.down, layer.up):
            p.set_data(ms.Tensor((0.15 * rng.standard_normal(p.shape)).astype(np.float32)))
        layer.magnitude.set_data(ms.Tensor((layer.magnitude.asnumpy() * rng.uniform(0.5, 1.5, layer.magnitude.shape))
                                           .astype(np.float32)))
    got = model_outputs(models)
    state = pm.get_strategy("unet").extract(models)
    assert set(state.labels()) == {"lora+dora"} and len(state) == len(layers)
    fresh = load_models(tiny_sd1)
    apply_loras(fresh, [state])
    want = model_outputs(fresh)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-4
    assert max(float(np.abs(got[k] - base[k]).max()) for k in base) > 1e-2

    with pytest.raises(LoraError, match=r"--lora_dora adapts Linear layers only.*conv") as err:
        pm.add_adapters(load_models(tiny_sd1), LoraOptions(strategy="unet", targets="kohya-conv", dora=True))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_dora_trains_and_resumes_exactly(dora_run, tiny_sd1, training):
    """Both files hold every magnitude, the metadata records DoRA, and a resume from step 1 ends with the very same
    tensors (outputs of DoRA layers: the test above)."""
    import shutil

    train = training.train


    straight, data, tmp, train_args = dora_run
    shutil.copytree(tmp / "a" / "checkpoint-1", tmp / "b" / "checkpoint-1")
    resumed = train(train_args(tiny_sd1, data, str(tmp / "b"), "--resume_from_checkpoint", "latest"))
    assert len(straight.files) == 2
    for path in straight.files:
        a = read_lora(path)
        assert set(a.labels()) == {"lora+dora"} and len(a) > 10
    a = read_lora(next(f for f in straight.files if f.endswith("pytorch_lora_weights.safetensors")))
    b = read_lora(next(f for f in resumed.files if f.endswith("pytorch_lora_weights.safetensors")))
    assert json.loads(a.metadata["mindone_lora.training_args"])["lora_dora"] is True
    k = read_lora(next(f for f in straight.files if f.endswith("d.safetensors")))
    assert json.loads(k.metadata["ss_network_args"])["dora_wd"] == "True"
    moved = 0.0
    for comp, p, m in a.modules():
        for r, t in m.tensors.items():
            np.testing.assert_array_equal(t, b.components[comp][p].tensors[r])
        moved = max(moved, float(np.abs(m.up).max()))
    assert moved > 0


def test_lora_dora_flag_in_the_integration_api(plugin_manager):
    import argparse

    from mindone_lora_plugin.integration import FLAG_DESTS, LoraIntegration, add_lora_arguments

    parser = argparse.ArgumentParser()
    add_lora_arguments(parser)
    parser.add_argument("--rank", type=int, default=4)
    lora = LoraIntegration.from_args(parser.parse_args(["--lora_dora"]), manager=plugin_manager)
    options = lora.make_options("sd1")
    assert options.dora and options.to_metadata()["dora"] == "True" and "lora_dora" in FLAG_DESTS
    assert options.algorithm == "lora" and plugin_manager.get_algorithm("lora").settings_from(options) == {
        "dora_axis": "out"}
    assert not LoraIntegration.from_args(parser.parse_args([]), manager=plugin_manager).make_options("sd1").dora
    with pytest.raises(LoraError, match="--lora_dora applies to --lora_algo lora, not loha"):
        LoraIntegration.from_args(parser.parse_args(["--lora_dora", "--lora_algo", "loha"]), manager=plugin_manager)
