"""The plugin system: entry-point discovery, name clashes, broken plugins, the allowlist, ``mindone-lora plugins``,
plugin arguments, operation hooks, and the example plugin (``examples/plugins/mindone-lora-fa``) with its ``peft``
format.

Throwaway third-party plugins are real distributions: a ``*.dist-info`` folder (``METADATA`` + ``entry_points.txt``)
and a module in a temporary folder put on ``sys.path``, which is all ``importlib.metadata`` needs. Nothing here
imports MindSpore.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import textwrap
from importlib import metadata

import numpy as np
import pytest

import mindone_lora_plugin
from mindone_lora_plugin.errors import LoraError, PluginError
from mindone_lora_plugin.hookspecs import hookimpl
from mindone_lora_plugin.options import LoraOptions
from mindone_lora_plugin.plugins import ENV_PLUGINS, LoraPluginManager
from mindone_lora_plugin.state import LoraModule, LoraState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "plugins", "mindone-lora-fa")
BUILTINS = ("core", "diffusers", "features", "flux", "kohya", "lora", "sd", "sd3")
LOGGER = "mindone_lora_plugin.plugins"


# ---------------------------------------------------------------------------------------------- throwaway plugins


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    """``make(dist, version, {entry point: module}, {module: source})`` installs a throwaway distribution."""
    root = tmp_path / "site"
    root.mkdir()
    modules: list[str] = []

    def make(dist: str, version: str, entry_points: dict[str, str], sources: dict[str, str]) -> str:
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
        (info / "entry_points.txt").write_text(f"[mindone_lora]\n{lines}")
        for module, source in sources.items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
            modules.append(module)
        return str(root)

    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(ENV_PLUGINS, raising=False)
    yield make
    for module in modules:
        sys.modules.pop(module, None)


STRATEGY_PLUGIN = """
    from mindone_lora_plugin.hookspecs import hookimpl
    from mindone_lora_plugin.strategies.base import LoraStrategy

    class Ff(LoraStrategy):
        name = {name!r}
        description = "feed-forward layers only"

    @hookimpl
    def mindone_lora_strategies():
        yield Ff()
"""


def fresh_manager() -> LoraPluginManager:
    pm = LoraPluginManager()
    pm.load_entrypoints()
    return pm


def warnings_about(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and f"'{name}'" in r.getMessage()]


@pytest.fixture
def lora_fa(plugin_manager):
    if "lora_fa" not in plugin_manager.infos:
        pytest.skip("the example plugin is not installed: pip install ./examples/plugins/mindone-lora-fa")
    return plugin_manager


# ---------------------------------------------------------------------------------------------- discovery


def test_builtins_are_the_listed_modules_of_this_distribution(plugin_manager):
    from mindone_lora_plugin.builtin_plugins import BUILTIN_PLUGINS

    assert set(BUILTIN_PLUGINS) == set(BUILTINS)
    for name in BUILTINS:
        info = plugin_manager.infos[name]
        assert info.builtin and info.dist == "mindone-lora-plugin" and info.module == BUILTIN_PLUGINS[name]
        assert info.version == mindone_lora_plugin.__version__
    assert {"unet", "text_encoder", "sdxl", "flux"} <= set(plugin_manager.strategies())
    assert {"diffusers", "kohya"} <= set(plugin_manager.formats())
    # each family registers its own strategies (and flags), each format plugin its format
    for name, family in (("unet", "sd"), ("text_encoder", "sd"), ("sdxl", "sd"), ("flux", "flux")):
        assert plugin_manager.plugin_of("strategies", name) == family
    for name in ("diffusers", "kohya"):
        assert plugin_manager.plugin_of("formats", name) == name
    # the built-in training features come through the same registry, as classes (one instance per run)
    features = plugin_manager.objects("training_features")
    assert set(features) == {"ema", "sample_prompts", "save_cadence", "validation_loss", "caches", "buckets",
                             "captions", "masked_loss"}
    assert all(isinstance(f, type) and plugin_manager.plugin_of("training_features", n) == "features"
               for n, f in features.items())
    hooks = {p["name"]: p["hooks"] for p in plugin_manager.describe()["plugins"]}
    assert "mindone_lora_add_arguments" in hooks["flux"] and "mindone_lora_add_arguments" not in hooks["core"]
    # no entry point of this distribution stands for a built-in: the list above is the only one
    eps = [ep for ep in metadata.entry_points(group="mindone_lora")
           if ep.dist is not None and ep.dist.name == "mindone-lora-plugin" and ep.value in BUILTIN_PLUGINS.values()]
    assert all(plugin_manager.infos[ep.name].module == ep.value for ep in eps if ep.name in plugin_manager.infos)


def test_one_registry_for_every_kind(plugin_manager):
    from mindone_lora_plugin.plugins import KINDS

    assert list(KINDS) == ["strategies", "formats", "algorithms", "architectures", "training_features"]
    for kind, spec in KINDS.items():
        found = plugin_manager.objects(kind)
        assert found and all(plugin_manager.get(kind, n) is obj for n, obj in found.items())
        with pytest.raises(PluginError, match=rf"^unknown {spec.title} 'nope'; choose one of: "):
            plugin_manager.get(kind, "nope")
    if "loha" not in plugin_manager.algorithms():  # an algorithm a known plugin provides: the hint says which
        with pytest.raises(PluginError, match=r"unknown LoRA algorithm 'loha'.*pip install mindone-lora-lycoris"):
            plugin_manager.get_algorithm("loha")


def test_the_example_plugin_is_installed_and_discovered(plugin_manager):
    assert "lora_fa" in plugin_manager.infos, (
        "the example plugin is not installed: `make setup` or pip install ./examples/plugins/mindone-lora-fa")
    info = plugin_manager.infos["lora_fa"]
    assert not info.builtin and info.dist == "mindone-lora-fa"
    import mindone_lora_fa

    assert info.version == metadata.version("mindone-lora-fa") == mindone_lora_fa.__version__
    assert info.module == "mindone_lora_fa.plugin"
    assert plugin_manager.plugin_of("strategies", "lora-fa") == "lora_fa"
    assert plugin_manager.plugin_of("formats", "peft") == "lora_fa"
    described = {p["name"]: p for p in plugin_manager.describe()["plugins"]}["lora_fa"]
    assert described["hooks"] == ["mindone_lora_add_arguments", "mindone_lora_formats", "mindone_lora_load_weights",
                                  "mindone_lora_strategies"]


def test_the_installed_example_plugin_is_the_source_in_this_checkout(lora_fa):
    """pip installs the example as a copy: a stale copy would test old code (reinstall after editing it)."""
    import mindone_lora_fa

    installed = os.path.dirname(mindone_lora_fa.__file__)
    source = os.path.join(EXAMPLE, "mindone_lora_fa")
    for name in sorted(f for f in os.listdir(source) if f.endswith(".py")):
        with open(os.path.join(source, name), "rb") as a, open(os.path.join(installed, name), "rb") as b:
            assert a.read() == b.read(), f"{name} changed: pip install ./examples/plugins/mindone-lora-fa again"


def test_a_third_party_entry_point_is_loaded_with_its_version(fake_dists):
    fake_dists("mindone-lora-ff", "2.3.4", {"ff": "mlff_plugin"}, {"mlff_plugin": STRATEGY_PLUGIN.format(name="ff")})
    pm = fresh_manager()
    info = pm.infos["ff"]
    assert (info.dist, info.version, info.module, info.builtin) == ("mindone-lora-ff", "2.3.4", "mlff_plugin", False)
    assert pm.plugin_of("strategies", "ff") == "ff"
    assert {"name": "ff", "version": "2.3.4"}.items() <= {p["name"]: p for p in pm.describe()["plugins"]}["ff"].items()


# ---------------------------------------------------------------------------------------------- name clashes


class _Plugin:
    """An in-process plugin object yielding the given strategies/formats."""

    def __init__(self, strategies=(), formats=()):
        self._strategies, self._formats = strategies, formats

    @hookimpl
    def mindone_lora_strategies(self):
        return list(self._strategies)

    @hookimpl
    def mindone_lora_formats(self):
        return list(self._formats)


def _strategy(name: str):
    from mindone_lora_plugin.strategies.base import LoraStrategy

    return type("S", (LoraStrategy,), {"name": name, "description": "test"})()


def _format(name: str):
    from mindone_lora_plugin.formats.base import LoraFormat

    return type("F", (LoraFormat,), {"name": name, "description": "test"})()


def test_a_duplicate_strategy_names_both_plugins(plugin_manager):
    plugin_manager.register_plugin(_Plugin(strategies=[_strategy("unet")]), name="my_unet")
    with pytest.raises(PluginError) as err:
        plugin_manager.strategies()
    message = str(err.value)
    assert "'unet'" in message and "'my_unet'" in message and "strategy" in message
    assert ENV_PLUGINS in message


def test_a_duplicate_format_names_both_plugins(plugin_manager):
    plugin_manager.register_plugin(_Plugin(formats=[_format("kohya")]), name="kohya_too")
    with pytest.raises(PluginError, match=r"format 'kohya'.*'kohya'.*'kohya_too'"):
        plugin_manager.get_format("kohya")


def test_a_duplicate_between_two_installed_distributions(fake_dists, monkeypatch):
    fake_dists("mindone-lora-ff", "1.0", {"ff_one": "mlff_one"}, {"mlff_one": STRATEGY_PLUGIN.format(name="ff")})
    fake_dists("mindone-lora-ff2", "1.0", {"ff_two": "mlff_two"}, {"mlff_two": STRATEGY_PLUGIN.format(name="ff")})
    pm = fresh_manager()
    with pytest.raises(PluginError) as err:
        pm.get_strategy("unet")
    assert "'ff_one'" in str(err.value) and "'ff_two'" in str(err.value)
    # the allowlist is the way out
    monkeypatch.setenv(ENV_PLUGINS, "ff_two")
    pm = fresh_manager()
    assert pm.plugin_of("strategies", "ff") == "ff_two" and "ff_one" not in pm.infos


# ---------------------------------------------------------------------------------------------- unknown names


def test_unknown_names_list_the_valid_ones(plugin_manager, tmp_path):
    with pytest.raises(PluginError) as err:
        plugin_manager.get_strategy("loha")
    assert "'loha'" in str(err.value)
    assert all(name in str(err.value) for name in plugin_manager.strategies())
    with pytest.raises(PluginError) as err:
        plugin_manager.get_format("ckpt")
    assert all(name in str(err.value) for name in plugin_manager.formats())
    # the operations fail on a bad name before they touch anything
    with pytest.raises(PluginError, match="loha"):
        plugin_manager.add_adapters(None, LoraOptions(strategy="loha"))
    with pytest.raises(PluginError, match="ckpt"):
        plugin_manager.save_weights(None, LoraOptions(), str(tmp_path / "out"), ["kohya", "ckpt"])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- broken plugins


BROKEN = {
    "import": ("import_fails", "raise ImportError('needs torch_npu,\\nwhich is missing')", "failed to load"),
    "strategies": ("raises", """
        from mindone_lora_plugin.hookspecs import hookimpl

        @hookimpl
        def mindone_lora_strategies():
            raise RuntimeError("no CUDA")

        @hookimpl
        def mindone_lora_formats():
            return []
        """, "raised while registering strategies"),
    "nameless": ("nameless", """
        from mindone_lora_plugin.hookspecs import hookimpl

        @hookimpl
        def mindone_lora_formats():
            yield object()
        """, "has no name"),
    "arguments": ("bad_args", """
        from mindone_lora_plugin.hookspecs import hookimpl

        @hookimpl
        def mindone_lora_add_arguments(parser):
            parser.add_argument("--lora_rank")  # clashes with a flag that is already there
        """, "raised while adding arguments"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_plugin_is_one_warning_and_everything_else_works(fake_dists, caplog, kind, lora_fa):
    module, source, why = BROKEN[kind]
    fake_dists("mindone-lora-broken", "0.0.1", {"broken": f"mlb_{module}"}, {f"mlb_{module}": source})
    caplog.set_level(logging.WARNING, logger=LOGGER)
    pm = fresh_manager()
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora_rank")
    pm.add_arguments(parser)
    strategies, formats = pm.strategies(), pm.formats()

    lines = warnings_about(caplog, "broken")
    assert len(lines) == 1, lines
    assert "\n" not in lines[0] and "mindone-lora-broken" in lines[0] and why in lines[0]
    assert "broken" in pm.broken and "broken" not in pm.infos and not pm.has_plugin("broken")
    assert {"unet", "text_encoder", "sdxl", "lora-fa"} <= set(strategies)
    assert {"diffusers", "kohya", "peft"} <= set(formats)
    assert parser.parse_args(["--lora_fa_init", "orthogonal"]).lora_fa_init == "orthogonal"
    described = pm.describe()
    assert [b["name"] for b in described["broken"]] == ["broken"]
    assert "broken" not in {p["name"] for p in described["plugins"]}
    pm.strategies(), pm.formats(), pm.describe()
    assert len(warnings_about(caplog, "broken")) == 1, "reported once"


def test_a_built_in_plugin_that_breaks_is_an_error(plugin_manager):
    """Only third-party plugins are skipped: a failing built-in is a bug that must not hide behind a warning."""
    from mindone_lora_plugin.plugins import PluginInfo

    class Broken:
        @hookimpl
        def mindone_lora_strategies(self):
            raise RuntimeError("bug in a built-in")

    plugin_manager.register(Broken(), name="builtin_bug")
    plugin_manager.infos["builtin_bug"] = PluginInfo("builtin_bug", "mindone-lora-plugin", "0", "x", True)
    with pytest.raises(RuntimeError, match="bug in a built-in"):
        plugin_manager.strategies()


# ---------------------------------------------------------------------------------------------- the allowlist


@pytest.mark.parametrize("value,expect_fa,expect_ff", [
    (None, True, True),
    ("", False, False),
    ("none", False, False),
    ("lora_fa", True, False),           # by entry-point name
    ("mindone-lora-ff", False, True),   # by distribution name
    (" ff , lora_fa ", True, True),
])
def test_the_allowlist_selects_third_party_plugins(fake_dists, monkeypatch, lora_fa, value, expect_fa, expect_ff):
    fake_dists("mindone-lora-ff", "1.0", {"ff": "mlff_plugin"}, {"mlff_plugin": STRATEGY_PLUGIN.format(name="ff")})
    if value is not None:
        monkeypatch.setenv(ENV_PLUGINS, value)
    pm = fresh_manager()
    assert ("lora_fa" in pm.infos) is expect_fa
    assert ("ff" in pm.infos) is expect_ff
    assert ("lora-fa" in pm.strategies()) is expect_fa
    assert set(BUILTINS) <= set(pm.infos), "built-ins are always loaded"


# ---------------------------------------------------------------------------------------------- mindone-lora plugins


def _cli(*args, env_extra=None, pythonpath=None):
    env = dict(os.environ)
    env.pop(ENV_PLUGINS, None)
    env.update(env_extra or {})
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "mindone_lora_plugin", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_plugins_json(lora_fa):
    proc = _cli("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert set(info) >= {"plugins", "strategies", "formats", "broken"}
    plugins = {p["name"]: p for p in info["plugins"]}
    assert set(BUILTINS) | {"lora_fa"} <= set(plugins)
    for p in plugins.values():
        assert {"name", "version", "distribution", "module", "builtin", "hooks"} <= set(p)
    assert plugins["lora_fa"]["version"] == metadata.version("mindone-lora-fa")
    assert plugins["sd"]["version"] == mindone_lora_plugin.__version__
    strategies = {s["name"]: s for s in info["strategies"]}
    assert {"unet", "text_encoder", "sdxl", "lora-fa"} <= set(strategies)
    for s in strategies.values():
        assert {"name", "plugin", "description", "components"} <= set(s) and s["description"]
    assert strategies["lora-fa"]["plugin"] == "lora_fa"
    assert strategies["sdxl"]["architectures"] == ["sdxl"]
    formats = {f["name"]: f for f in info["formats"]}
    assert {"diffusers", "kohya", "peft"} <= set(formats)
    for f in formats.values():
        assert {"name", "plugin", "description", "filename"} <= set(f) and f["description"]
    assert formats["peft"] == {"name": "peft", "plugin": "lora_fa", "filename": "<output_name>_peft",
                               "description": formats["peft"]["description"]}
    assert info["broken"] == []


def test_plugins_table_and_a_broken_plugin(fake_dists, lora_fa):
    root = fake_dists("mindone-lora-broken", "0.0.1", {"broken": "mlb_cli"}, {"mlb_cli": "import no_such_module_x"})
    proc = _cli("plugins", pythonpath=root)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "lora_fa" in out and f"mindone-lora-fa {metadata.version('mindone-lora-fa')}" in out
    assert "lora-fa" in out and "peft" in out and "third-party" in out
    assert f"mindone-lora-plugin {mindone_lora_plugin.__version__} (built-in)" in out
    assert "BROKEN" in out and "no_such_module_x" in out
    warned = [line for line in proc.stderr.splitlines() if "'broken'" in line]
    assert len(warned) == 1 and "mindone-lora-broken" in warned[0]


def test_plugins_json_without_third_party_plugins(lora_fa):
    proc = _cli("plugins", "--json", env_extra={ENV_PLUGINS: ""})
    info = json.loads(proc.stdout)
    assert {p["name"] for p in info["plugins"]} == set(BUILTINS)
    assert "lora-fa" not in {s["name"] for s in info["strategies"]}


# ---------------------------------------------------------------------------------------------- plugin arguments


def test_plugin_arguments_reach_the_parser(plugin_manager, lora_fa):
    class Extra:
        @hookimpl
        def mindone_lora_add_arguments(self, parser):
            parser.add_argument("--my_plugin_scale", type=float, default=1.0)

    plugin_manager.register_plugin(Extra(), name="my_plugin")
    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("plugins")
    plugin_manager.add_arguments(group)
    args = parser.parse_args(["--lora_fa_init", "orthogonal", "--my_plugin_scale", "0.5"])
    assert (args.lora_fa_init, args.my_plugin_scale) == ("orthogonal", 0.5)
    assert parser.parse_args([]).lora_fa_init is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora_fa_init", "zeros"])
    assert "--lora_fa_init" in parser.format_help()


# ---------------------------------------------------------------------------------------------- operation hooks


def test_a_plugin_can_wrap_or_take_over_an_operation(plugin_manager):
    seen = []

    class Observer:
        @hookimpl(wrapper=True)
        def mindone_lora_add_adapters(self, manager, models, options):
            seen.append(("before", options.strategy))
            result = yield
            seen.append(("after", sorted(result)))
            return result

    class TakeOver:
        @hookimpl(tryfirst=True)
        def mindone_lora_add_adapters(self, manager, models, options):
            return {"unet": ["mid_block.attentions.0.proj_in"]} if options.strategy == "custom" else None

    plugin_manager.register_plugin(Observer(), name="observer")
    plugin_manager.register_plugin(TakeOver(), name="takeover")
    assert plugin_manager.add_adapters(object(), LoraOptions(strategy="custom")) == {
        "unet": ["mid_block.attentions.0.proj_in"]}
    assert seen == [("before", "custom"), ("after", ["unet"])]
    with pytest.raises(PluginError):  # returning None hands over to the core plugin, which looks the name up
        plugin_manager.add_adapters(object(), LoraOptions(strategy="another"))


# ---------------------------------------------------------------------------------------------- the peft format


def _state(seed: int = 0, te: bool = True) -> LoraState:
    rng = np.random.default_rng(seed)

    def mod(out, inp, r, alpha, k=None):
        down = rng.normal(size=(r, inp) if k is None else (r, inp, k, k)).astype(np.float32)
        up = rng.normal(size=(out, r) if k is None else (out, r, 1, 1)).astype(np.float32)
        return LoraModule(down, up, alpha)

    state = LoraState(architecture="sd1", base_config={"layers_per_block": 2}, metadata={"ss_network_dim": "4"})
    state.add("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", mod(64, 64, 4, 2.0))
    state.add("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", mod(64, 32, 4, 2.0))
    state.add("unet", "down_blocks.1.attentions.0.proj_in", mod(64, 64, 4, 2.0, k=1))
    state.add("unet", "down_blocks.0.resnets.0.conv1", mod(32, 32, 2, 3.0, k=3))
    if te:
        state.add("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", mod(32, 32, 4, 1.0))
    return state


@pytest.fixture
def peft(lora_fa):
    return lora_fa.get_format("peft")


def _assert_same(a: LoraState, b: LoraState, exact: bool = True):
    assert [(c, p) for c, p, _ in a.modules()] == [(c, p) for c, p, _ in b.modules()]
    for (_, path, x), (_, _, y) in zip(a.modules(), b.modules()):
        assert x.alpha == y.alpha, path
        check = np.testing.assert_array_equal if exact else (lambda u, v: np.testing.assert_allclose(u, v, atol=1e-2))
        check(np.asarray(x.down, np.float32), np.asarray(y.down, np.float32))
        check(np.asarray(x.up, np.float32), np.asarray(y.up, np.float32))


def test_peft_write_layout_and_read_back(peft, tmp_path):
    from mindone_lora_plugin.safetensors_io import load

    state = _state()
    path = peft.write(state, str(tmp_path / "out" / "my_peft"), metadata={"ss_steps": "10"})
    assert path == str(tmp_path / "out" / "my_peft")
    assert sorted(os.listdir(path)) == ["text_encoder", "unet"]
    assert sorted(os.listdir(os.path.join(path, "unet"))) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(path, "unet", "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 2.0
    assert config["target_modules"] == sorted(state.components["unet"])
    assert config["rank_pattern"] == {r"down_blocks\.0\.resnets\.0\.conv1": 2}
    assert config["alpha_pattern"] == {r"down_blocks\.0\.resnets\.0\.conv1": 3.0}
    tensors, meta = load(os.path.join(path, "unet", "adapter_model.safetensors"))
    assert tensors["base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape \
        == (4, 64)
    assert tensors["base_model.model.down_blocks.0.resnets.0.conv1.lora_B.weight"].shape == (32, 2, 1, 1)
    assert meta["ss_steps"] == "10" and meta["ss_network_dim"] == "4" and meta["format"] == "pt"
    assert not [f for f in os.listdir(tmp_path / "out") if f != "my_peft"], "no temporary folder left behind"

    back = peft.read(path)
    _assert_same(state, back)
    assert back.architecture == "sd1" and back.base_config == {"layers_per_block": 2}
    assert back.metadata["ss_steps"] == "10"
    # one component folder, or its weights file, reads that component
    unet_only = peft.read(os.path.join(path, "unet", "adapter_model.safetensors"))
    assert list(unet_only.components) == ["unet"]
    assert list(peft.read(os.path.join(path, "text_encoder")).components) == ["text_encoder"]


def test_peft_output_path_and_overwrite(peft, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "other.txt").write_text("x")
    first = peft.write(_state(te=True), str(out), output_name="run")  # an existing folder of something else
    assert first == str(out / "run_peft")
    second = peft.write(_state(seed=1, te=False), first)  # an existing adapter folder is replaced as a whole
    assert second == first and sorted(os.listdir(first)) == ["unet"], "no stale text_encoder/ left"
    _assert_same(peft.read(first), _state(seed=1, te=False))
    assert sorted(os.listdir(out)) == ["other.txt", "run_peft"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(first).st_mode & 0o777 == 0o777 & ~umask, "permissions of an ordinary new folder"


@pytest.mark.parametrize("dtype,np_name", [("fp16", "float16"), ("bf16", "bfloat16"), ("fp32", "float32")])
def test_peft_save_dtype(peft, tmp_path, dtype, np_name):
    path = peft.write(_state(te=False), str(tmp_path / "x_peft"), dtype=dtype)
    back = peft.read(path)
    assert back.dtype() == np_name
    _assert_same(_state(te=False), back, exact=dtype == "fp32")
    with pytest.raises(LoraError, match="fp8"):
        peft.write(_state(), str(tmp_path / "y_peft"), dtype="fp8")


def test_peft_sniff(peft):
    assert peft.sniff(["base_model.model.a.b.lora_A.weight", "base_model.model.a.b.lora_B.weight"], {})
    assert peft.sniff(["base_model.model.a.lora_A.default.weight"], {})
    assert not peft.sniff(["unet.a.b.lora_A.weight"], {})
    assert not peft.sniff(["lora_unet_a_b.lora_down.weight", "lora_unet_a_b.alpha"], {})
    assert not peft.sniff([], {})


def _edit_config(path, **changes):
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)


@pytest.mark.parametrize("damage,message", [
    ("no-config", "adapter_config.json is missing"),
    ("dora", "DoRA"),
    ("loha", "LOHA"),
    ("rank", "rank 4"),
    ("bad-key", "not a PEFT LoRA weight"),
    ("half-pair", "no lora_B"),
    ("not-a-folder", "not a PEFT adapter folder"),
])
def test_peft_read_errors_are_one_line(peft, tmp_path, damage, message):
    from mindone_lora_plugin import safetensors_io

    path = peft.write(_state(te=False), str(tmp_path / "x_peft"))
    unet = os.path.join(path, "unet")
    config, weights = os.path.join(unet, "adapter_config.json"), os.path.join(unet, "adapter_model.safetensors")
    if damage == "no-config":
        os.remove(config)
        path = unet
    elif damage == "dora":
        _edit_config(config, use_dora=True)
    elif damage == "loha":
        _edit_config(config, peft_type="LOHA")
    elif damage == "rank":
        _edit_config(config, r=8)
    elif damage in ("bad-key", "half-pair"):
        tensors, meta = safetensors_io.load(weights)
        key = next(k for k in tensors if k.endswith("lora_B.weight"))
        if damage == "bad-key":
            tensors[key.replace("lora_B.weight", "lora_B.bias")] = tensors[key][:, 0]
        else:
            del tensors[key]
        safetensors_io.save(tensors, weights, meta)
    else:
        path = str(tmp_path / "nothing")
        os.mkdir(path)
    with pytest.raises(LoraError) as err:
        peft.read(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_peft_reads_rslora_and_regex_patterns(peft, tmp_path):
    path = peft.write(_state(te=False), str(tmp_path / "x_peft"))
    config = os.path.join(path, "unet", "adapter_config.json")
    # what peft itself writes: short suffix patterns, and rsLoRA (scale alpha / sqrt(r))
    _edit_config(config, use_rslora=True, rank_pattern={"conv1": 2}, alpha_pattern={"resnets.0.conv1": 3.0})
    state = peft.read(path)
    conv = state.components["unet"]["down_blocks.0.resnets.0.conv1"]
    q = state.components["unet"]["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert conv.scale == pytest.approx(3.0 / np.sqrt(2))
    assert q.scale == pytest.approx(2.0 / np.sqrt(4))


@pytest.mark.interop
def test_peft_folder_loads_in_hugging_face_peft(peft, tiny_sd1, tmp_path):
    """The folder is a real PEFT adapter: torch peft puts every weight and scale on the diffusers UNet."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    from peft import PeftModel

    from mindone_lora_plugin.base_model_info import BaseModelInfo

    shapes = BaseModelInfo.from_folder(tiny_sd1).modules["unet"]
    rng = np.random.default_rng(0)
    state = LoraState(architecture="sd1")
    for i, path in enumerate(p for p in sorted(shapes) if p.endswith((".to_q", ".proj_in", ".conv1", ".ff.net.2"))):
        shape = shapes[path]
        r = 2 if len(shape) == 4 and shape[2:] != (1, 1) else 4
        down = rng.normal(size=(r, shape[1], *shape[2:])).astype(np.float32)
        up = rng.normal(size=(shape[0], r, 1, 1) if len(shape) == 4 else (shape[0], r)).astype(np.float32)
        state.add("unet", path, LoraModule(down, up, 1.0 + i % 3))
    folder = peft.write(state, str(tmp_path / "t_peft"))

    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    model = PeftModel.from_pretrained(unet, os.path.join(folder, "unet"))
    loaded = dict(model.named_modules())
    for path, mod in state.components["unet"].items():
        layer = loaded[f"base_model.model.{path}"]
        np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(), mod.down)
        np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy(), mod.up)
        assert layer.scaling["default"] == pytest.approx(mod.scale), path
    assert torch is not None


def test_every_hookspec_example_is_valid_python():
    """Each hookspec's ``Example::`` block compiles (a line pasted into one at the wrong indentation broke it once);
    the strategy, algorithm and architecture examples are also run in their own tests."""
    import textwrap

    from mindone_lora_plugin import hookspecs

    examples = {name: textwrap.dedent(f.__doc__.split("Example::", 1)[1]) for name, f in vars(hookspecs).items()
                if name.startswith("mindone_lora_") and "Example::" in (getattr(f, "__doc__", None) or "")}
    assert len(examples) >= 10
    for name, src in examples.items():
        compile(src, name, "exec")
