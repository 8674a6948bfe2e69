"""The algorithm plugin object: discovery, the canonical state of every algorithm in files, clear errors.

Pure numpy except the one GRAPH_MODE training run at the end (LoKr through ``mindone-lora train`` with exact resume).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

from mindone_lora_plugin.cli import main
from mindone_lora_plugin.errors import LoraError, PluginError
from mindone_lora_plugin.formats.diffusers import DiffusersFormat
from mindone_lora_plugin.formats.kohya import KohyaFormat
from mindone_lora_plugin.formats.reader import read_lora
from mindone_lora_plugin.state import LoraModule, LoraState

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # [64, 64]
CONV = "down_blocks.1.resnets.0.conv1"  # [64, 32, 3, 3]


@pytest.fixture
def pm(plugin_manager):
    if not {"loha", "lokr"} <= set(plugin_manager.algorithms()):
        pytest.skip("the mindone-lora-lycoris plugin is not installed")
    return plugin_manager


def one_line_error(capsys, argv, env=None) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


def state_of(pm, algo: str, settings=None, seed=0) -> LoraState:
    """A LoRA of ``algo`` on one attention Linear and one 3×3 conv of the tiny SD1 UNet, random non-zero tensors."""
    a = pm.get_algorithm(algo)
    rng = np.random.default_rng(seed)
    st = LoraState(architecture="sd1", base_config={"layers_per_block": 2})
    for path, shape, rank in ((ATTN, (64, 64), 4), (CONV, (64, 32, 3, 3), 2)):
        tensors = {k: (0.2 * rng.standard_normal(v.shape)).astype(np.float32)
                   for k, v in a.init_tensors(shape, rank, dict(settings or {}), rng).items()}
        st.add("unet", path, LoraModule(algorithm=algo, tensors=tensors, alpha=3.0,
                                        settings={"shape": list(shape)} if algo != "lora" else {}))
    return st


# ------------------------------------------------------------------------------------------------ discovery


def test_algorithms_are_listed_with_their_plugins(pm, capsys):
    assert main(["plugins", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    found = {a["name"]: a["plugin"] for a in info["algorithms"]}
    assert found == {"lora": "lora", "loha": "lycoris", "lokr": "lycoris"}
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"Algorithms:\n(?:.*\n)*\s+loha .*\[lycoris\]", table)


def test_duplicate_and_unknown_algorithm_names(pm):
    from mindone_lora_plugin.algorithms.lora import PlainLora
    from mindone_lora_plugin.hookspecs import hookimpl

    with pytest.raises(PluginError, match=r"unknown LoRA algorithm 'lohaa'; choose one of: loha, lokr, lora"):
        pm.get_algorithm("lohaa")

    class Again:
        @hookimpl
        def mindone_lora_algorithms(self):
            yield PlainLora()

    pm.register_plugin(Again(), name="again")
    with pytest.raises(PluginError, match=r"two plugins offer the algorithm 'lora': 'lora' and 'again'"):
        pm.algorithms()


def test_hookspec_example_runs(plugin_manager):
    """The example in ``mindone_lora_algorithms``'s docstring is real code: it registers and reads back."""
    from mindone_lora_plugin import hookspecs

    doc = hookspecs.mindone_lora_algorithms.__doc__
    code = textwrap.dedent(doc.split("Example::", 1)[1])
    ns: dict = {}
    exec(compile(code, "<hookspec example>", "exec"), ns)
    plugin_manager.register_plugin(type("P", (), {"mindone_lora_algorithms": staticmethod(
        ns["mindone_lora_algorithms"])}), name="diag")
    algo = plugin_manager.get_algorithm("diag")
    mod = LoraModule(algorithm="diag", tensors={"diag": np.arange(3, dtype=np.float32)}, alpha=2.0)
    np.testing.assert_allclose(algo.delta(mod), np.diag([0.0, 2.0, 4.0]))


# ------------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_kohya_round_trip_is_exact_and_inspect_names_the_algorithm(pm, tmp_path, capsys, algo, sd_fakes):
    st = state_of(pm, algo)
    path = KohyaFormat().write(st, str(tmp_path / f"{algo}.safetensors"))
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        keys, meta = set(f.keys()), f.metadata()
    prefix = {"loha": "hada_", "lokr": "lokr_"}[algo]
    assert all(k.split(".", 1)[1].startswith(prefix) or k.endswith(".alpha") for k in keys)
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == algo
    back = read_lora(path, base=sd_fakes.tiny_sd1())
    for comp, p, m in st.modules():
        got = back.components[comp][p]
        assert got.algorithm == algo and got.alpha == m.alpha and got.base_shape() == m.base_shape()
        assert set(got.tensors) == set(m.tensors)
        for r in m.tensors:
            np.testing.assert_array_equal(got.tensors[r], m.tensors[r])
        np.testing.assert_allclose(got.delta(), m.delta(), rtol=0, atol=1e-6)
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["components"]["unet"]["algorithms"] == {algo: 2}
    assert main(["inspect", path]) == 0
    assert f"algorithm {algo}" in capsys.readouterr().out


def test_loha_and_lokr_maths():
    """ΔW by hand: LoHa's Hadamard product, LoKr's Kronecker product, LoKr's scale 1 when both factors are full."""
    from mindone_lora_lycoris.lokr import factorization

    rng = np.random.default_rng(1)
    t = {k: rng.standard_normal(s).astype(np.float32) for k, s in
         (("hada_w1_a", (6, 2)), ("hada_w1_b", (2, 4)), ("hada_w2_a", (6, 2)), ("hada_w2_b", (2, 4)))}
    loha = LoraModule(algorithm="loha", tensors=t, alpha=1.0)
    want = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 0.5
    np.testing.assert_allclose(loha.delta(), want, rtol=1e-5, atol=1e-6)
    w1, w2 = rng.standard_normal((2, 3)), rng.standard_normal((4, 5))
    full = LoraModule(algorithm="lokr", tensors={"lokr_w1": w1, "lokr_w2": w2}, alpha=7.0)
    assert full.scale == 1.0 and full.base_shape() == (8, 15)
    np.testing.assert_allclose(full.delta(), np.kron(w1, w2), rtol=1e-6)
    a, b = rng.standard_normal((4, 2)), rng.standard_normal((2, 5))
    low = LoraModule(algorithm="lokr", tensors={"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b}, alpha=1.0)
    assert low.rank == 2
    np.testing.assert_allclose(low.delta(), np.kron(w1, a @ b) * 0.5, rtol=1e-6)
    # what lycoris-lora 4.1.3's factorization returns (its docstring's table is older than its code: 360 → (18, 20))
    assert [factorization(n) for n in (127, 128, 250, 360, 512, 1024)] == [
        (1, 127), (8, 16), (10, 25), (18, 20), (16, 32), (32, 32)]
    assert factorization(128, 4) == (4, 32) and factorization(360, 16) == (15, 24)


def test_diffusers_cannot_hold_loha_and_says_which_format_can(pm, tmp_path, capsys):
    st = state_of(pm, "loha")
    with pytest.raises(LoraError, match=r"the diffusers format cannot hold loha modules; formats that can: kohya"):
        DiffusersFormat().write(st, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    src = KohyaFormat().write(st, str(tmp_path / "loha.safetensors"))
    line = one_line_error(capsys, ["convert", src, str(tmp_path / "d"), "--to", "diffusers"])
    assert "cannot hold loha" in line and "kohya" in line and not (tmp_path / "d").exists()


def test_algorithm_without_its_plugin_names_the_plugin(pm, tmp_path):
    path = KohyaFormat().write(state_of(pm, "lokr"), str(tmp_path / "lokr.safetensors"))
    env = dict(os.environ, MINDONE_LORA_PLUGINS="none")
    proc = subprocess.run([sys.executable, "-m", "mindone_lora_plugin", "inspect", path], env=env,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "'lokr' algorithm" in lines[0] and "mindone-lora-lycoris" in lines[0]


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_nan_or_inf_tensors_are_refused_by_name(pm, tmp_path, capsys, algo):
    st = state_of(pm, algo)
    path = KohyaFormat().write(st, str(tmp_path / "ok.safetensors"))
    from mindone_lora_plugin import safetensors_io

    tensors, meta = safetensors_io.load(path)
    bad = [k for k in sorted(tensors) if tensors[k].size > 1][1]
    tensors[bad] = tensors[bad].copy()
    tensors[bad].reshape(-1)[1] = np.inf if algo == "lora" else np.nan
    save_file(tensors, str(tmp_path / "bad.safetensors"), meta)
    before = set(os.listdir(tmp_path))
    line = one_line_error(capsys, ["convert", str(tmp_path / "bad.safetensors"), str(tmp_path / "o.safetensors"),
                                   "--to", "kohya"])
    assert f"'{bad}'" in line and ("Inf" if algo == "lora" else "NaN") in line
    assert set(os.listdir(tmp_path)) == before
    assert "holds" in one_line_error(capsys, ["inspect", str(tmp_path / "bad.safetensors")])


def test_scaled_and_merge_to_lora(pm, tmp_path, capsys):
    """A weighted LoHa scales its weight change; merge --to-lora of a LoHa asks for --rank."""
    st = state_of(pm, "loha")
    for _, p, m in st.modules():
        np.testing.assert_allclose(m.scaled(-0.5).delta(), -0.5 * m.delta(), rtol=1e-5, atol=1e-7)
    src = KohyaFormat().write(st, str(tmp_path / "loha.safetensors"))
    line = one_line_error(capsys, ["merge", "--to-lora", "--lora", src, "--out", str(tmp_path / "m.safetensors")])
    assert "--rank" in line and not (tmp_path / "m.safetensors").exists()

    lora = KohyaFormat().write(state_of(pm, "lora", seed=5), str(tmp_path / "plain.safetensors"))
    out = str(tmp_path / "m.safetensors")
    assert main(["merge", "--to-lora", "--lora", f"{src}:0.7", "--lora", f"{lora}:-1", "--out", out,
                 "--rank", "64"]) == 0
    printed = capsys.readouterr().out
    err = float(re.search(r"relative approximation error ([0-9.e+-]+)", printed).group(1))
    assert err < 1e-6, printed  # rank 64 holds every module here exactly
    merged, plain = read_lora(out), read_lora(lora)
    assert set(merged.algorithms()) == {"lora"}
    for comp, p, m in merged.modules():
        want = 0.7 * st.components[comp][p].delta() - plain.components[comp][p].delta()
        np.testing.assert_allclose(m.delta(), want, rtol=0, atol=1e-5)
    assert main(["merge", "--to-lora", "--lora", src, "--out", out, "--rank", "2", "--overwrite"]) == 0
    assert 0.01 < float(re.search(r"error ([0-9.e+-]+)", capsys.readouterr().out).group(1)) < 1


# ------------------------------------------------------------------------------------------------ training


def test_train_refuses_a_format_that_cannot_hold_the_algorithm(pm, tiny_sd1, tmp_path, training):
    train = training.train
    with pytest.raises(LoraError, match=r"the diffusers format cannot hold loha adapters; formats that can: kohya"):
        train(["--pretrained_model_name_or_path", tiny_sd1, "--train_data_dir", str(tmp_path), "--output_dir",
               str(tmp_path / "o"), "--lora_algo", "loha", "--save_formats", "diffusers,kohya"])
    with pytest.raises(PluginError, match=r"unknown LoRA algorithm 'lorb'; choose one of: loha, lokr, lora"):
        train(["--pretrained_model_name_or_path", tiny_sd1, "--train_data_dir", str(tmp_path), "--output_dir",
               str(tmp_path / "o"), "--lora_algo", "lorb"])


@pytest.mark.slow
def test_lokr_trains_in_graph_mode_and_resumes_exactly(pm, tiny_sd1, tmp_path, training):
    """GRAPH_MODE LoKr training (attention targets): checkpoints hold the kohya file, a resume from
    step 1 ends with the very same weights as the straight run, and the file loads back to the same outputs."""
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    load_back, train = training.load_back, training.train

    data = make_shapes_dataset(str(tmp_path / "data"), size=32, repeats=1)

    def args(out, *extra):
        return ["--pretrained_model_name_or_path", tiny_sd1, "--train_data_dir", data, "--output_dir", out,
                "--max_train_steps", "2", "--train_batch_size", "2", "--learning_rate", "1e-2",
                "--lr_warmup_steps", "0", "--seed", "5", "--report_to", "none", "--device_target", "CPU",
                "--resolution", "32", "--lora_algo", "lokr", "--lora_targets", "attn", "--lora_alpha", "2",
                "--save_formats", "kohya", "--output_name", "k",
                "--checkpointing_steps", "1", *extra]

    straight = train(args(str(tmp_path / "a")))
    assert os.path.isfile(tmp_path / "a" / "checkpoint-1" / "k.safetensors")
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint-1", tmp_path / "b" / "checkpoint-1")
    resumed = train(args(str(tmp_path / "b"), "--resume_from_checkpoint", "latest"))
    a, b = read_lora(straight.files[0]), read_lora(resumed.files[0])
    assert set(a.algorithms()) == {"lokr"} and len(a) == len(b) > 10
    moved = 0.0
    for comp, p, m in a.modules():
        for r, t in m.tensors.items():
            np.testing.assert_array_equal(t, b.components[comp][p].tensors[r])
        moved = max(moved, float(np.abs(m.delta()).max()))
    assert moved > 0  # the zero-initialised factors trained
    [(state, diffs)] = load_back(tiny_sd1, straight.files, "unet", straight.models)
    assert max(diffs.values()) < 1e-5, diffs


@pytest.mark.slow
def test_loha_on_sdxl_trains_the_unet_and_both_text_encoders(pm, tiny_sdxl, tmp_path, training):
    """SDXL with LoHa on the UNet and both text encoders: the kohya file holds LoHa for all three (SGM names,
    lora_te1_/lora_te2_ prefixes) and loads back into fresh models to the trained outputs."""
    from mindone_lora_plugin.demo.training import make_shapes_dataset
    from mindone_lora_plugin.safetensors_io import read_header

    load_back, train = training.load_back, training.train

    data = make_shapes_dataset(str(tmp_path / "data"), size=32, repeats=1)
    result = train(["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", data, "--output_dir",
                    str(tmp_path / "xl"), "--max_train_steps", "1", "--train_batch_size", "2", "--learning_rate",
                    "1e-2", "--lr_warmup_steps", "0", "--seed", "2", "--report_to", "none", "--device_target", "CPU",
                    "--mode", "pynative", "--lora_algo", "loha", "--train_text_encoder",
                    "--lora_targets", "to_k,k_proj", "--save_formats", "kohya", "--output_name", "xl",
                    "--checkpointing_steps", "0"])
    [path] = result.files
    state = read_lora(path)
    assert set(state.algorithms()) == {"loha"}
    assert set(state.components) == {"unet", "text_encoder", "text_encoder_2"}
    keys = [k for k in read_header(path)[0] if k != "__metadata__"]
    for prefix in ("lora_unet_input_blocks_", "lora_te1_text_model_", "lora_te2_text_model_"):
        assert any(k.startswith(prefix) and k.endswith(".hada_w1_a") for k in keys), prefix
    [(loaded, diffs)] = load_back(tiny_sdxl, result.files, "sdxl", result.models)
    assert len(loaded) == len(state) and max(diffs.values()) < 1e-5, diffs


def test_runtime_allows_optimizers_over_many_adapter_tensors():
    """MindSpore's optimizers unroll a few calls per parameter when they compile; with a learning-rate schedule per
    group, 600 tensors (SDXL with LoHa on the UNet and both text encoders has 544) exceed MindSpore's default call
    depth of 1000 (checked by hand: "Exceed function call depth limit 1000"; compiling that optimizer takes about
    two minutes here, too long for the suite). The runtime raises the limit, through ``set_recursion_limit`` where
    MindSpore has it (``get_context("max_call_depth")`` does not see that one), so the test compiles a call chain one
    deeper than the default (about 2 s): it fails with "Exceed function call depth limit 1000" without the runtime."""
    import mindspore as ms

    from mindone_lora_plugin.runtime.process import MAX_CALL_DEPTH, setup

    setup("CPU", "pynative", seed=0)
    assert MAX_CALL_DEPTH >= 20000

    def chain(x, n):
        return x if n == 0 else chain(x, n - 1)

    @ms.jit
    def deep(x):
        return chain(x, 1001)

    assert float(deep(ms.Tensor(1.0))) == 1.0


def test_adapter_dropouts_act_in_training_only(pm):
    """kohya's network/rank/module dropout inside a LoHa layer: training outputs change from call to call, eval
    outputs are exactly base + ΔW, and the layer's tensors (what files hold) are untouched."""
    import mindspore as ms
    from mindspore import mint

    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    algo = pm.get_algorithm("loha")
    base = mint.nn.Linear(16, 8)
    rng = np.random.default_rng(3)
    tensors = {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
               for k, v in algo.init_tensors((8, 16), 4, {}, rng).items()}
    layer = algo.make_layer(base, tensors, 4.0, {"network_dropout": 0.3, "rank_dropout": 0.5})
    x = ms.Tensor(rng.standard_normal((3, 16)).astype(np.float32))
    layer.set_train(True)
    a, b = layer(x).asnumpy(), layer(x).asnumpy()
    layer.set_train(False)
    c, d = layer(x).asnumpy(), layer(x).asnumpy()
    mod = algo.read_layer(layer)
    want = base(x).asnumpy() + x.asnumpy() @ mod.delta().T
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(c, d)
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-5)
    for r, t in tensors.items():
        np.testing.assert_array_equal(mod.tensors[r], t)
    skip = algo.make_layer(base, tensors, 4.0, {"module_dropout": 0.999})
    skip.set_train(True)
    np.testing.assert_allclose(skip(x).asnumpy(), base(x).asnumpy(), rtol=1e-6)


def test_written_files_get_the_usual_permissions(pm, tmp_path):
    """Every format's file is created like ``open()`` would (0666 less the umask), not 0600."""
    mask = os.umask(0o022)
    try:
        st = state_of(pm, "lora")
        paths = [DiffusersFormat().write(st, str(tmp_path / "d")), KohyaFormat().write(st, str(tmp_path / "k"))]
    finally:
        os.umask(mask)
    assert [oct(os.stat(p).st_mode & 0o777) for p in paths] == ["0o644", "0o644"]


def test_generate_applies_mixed_algorithms_each_at_its_weight(pm, tiny_sd1):
    """``apply_loras`` (what ``generate`` uses) with a LoHa and a plain LoRA: the LoHa is fused into the base weights
    at its weight, the plain LoRA becomes a PEFT adapter; together they add exactly 0.5·ΔW_loha − ΔW_lora."""
    from mindone_lora_plugin.compose import WeightedLora, active_deltas, apply_loras
    from mindone_lora_plugin.models import load_models

    loha, plain = state_of(pm, "loha", seed=1), state_of(pm, "lora", seed=2)
    models = load_models(tiny_sd1, components=("unet",))
    cells = dict(models["unet"].cells_and_names())
    before = {p: cells[p].weight.asnumpy().astype(np.float64) for p in (ATTN, CONV)}
    apply_loras(models, [WeightedLora(loha, 0.5), WeightedLora(plain, -1.0)])
    from mindone_lora_plugin.models import base_layer_of

    cells = dict(models["unet"].cells_and_names())
    adapters = active_deltas(models)
    for p in (ATTN, CONV):
        fused = base_layer_of(cells[p]).weight.asnumpy().astype(np.float64) - before[p]
        got = fused + adapters[("unet", p)]
        want = 0.5 * loha.components["unet"][p].delta() - plain.components["unet"][p].delta()
        np.testing.assert_allclose(got, want.reshape(got.shape), rtol=0, atol=1e-5)


def test_strategy_hookspec_example_runs(plugin_manager, tiny_sd1):
    """The ``mindone_lora_strategies`` docstring example registers and picks only feed-forward layers."""
    from mindone_lora_plugin import hookspecs
    from mindone_lora_plugin.models import load_models
    from mindone_lora_plugin.options import LoraOptions

    ns: dict = {}
    exec(compile(textwrap.dedent(hookspecs.mindone_lora_strategies.__doc__.split("Example::", 1)[1]), "<example>",
                 "exec"), ns)
    plugin_manager.register_plugin(type("P", (), {"mindone_lora_strategies": staticmethod(
        ns["mindone_lora_strategies"])}), name="ff")
    unet = load_models(tiny_sd1, components=("unet",))["unet"]
    targets = plugin_manager.get_strategy("ff").target_modules("unet", unet, LoraOptions(targets="kohya"))
    assert targets and all(".ff." in p for p in targets)


def test_builtin_plugin_list_is_in_code():
    """The built-in plugins, algorithms included, come from the one list in code, whatever an install's entry-point
    metadata says."""
    from mindone_lora_plugin.builtin_plugins import BUILTIN_PLUGINS
    from mindone_lora_plugin.plugins import builtin_objects

    assert BUILTIN_PLUGINS["lora"] == "mindone_lora_plugin.algorithms.lora"
    assert list(builtin_objects("algorithms")) == ["lora"]
    assert list(builtin_objects("formats")) == ["diffusers", "kohya"]