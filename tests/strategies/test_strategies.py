"""Strategies on the tiny SD1.x and SDXL models: what gets adapted, with which rank/alpha, what trains, round trips.

Expected module counts are computed from the model folders' ``config.json`` files alone (the diffusers UNet block
layout, the CLIP layer count), never from the strategy code under test. The optimizer-step tests run one PyNative
forward/backward of the tiny UNet on CPU (a few seconds each).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mindone_lora_plugin.errors import LoraError, PluginError
from mindone_lora_plugin.models import ADAPTER, load_models, lora_layers
from mindone_lora_plugin.options import LoraOptions

PRESETS = ("attn", "kohya", "kohya-conv")


# ---------------------------------------------------------------------------------------------- independent counts


def _read_config(folder: str, component: str) -> dict:
    with open(os.path.join(folder, component, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def unet_layout(config: dict) -> dict:
    """The module layout of a diffusers ``UNet2DConditionModel`` from its config.

    Returns the transformer depth of every ``Transformer2DModel``, the (in, out) channels of every ``ResnetBlock2D``
    and the number of down/up samplers, following the block construction rules of diffusers' ``get_down_block``,
    ``UNetMidBlock2DCrossAttn`` and ``get_up_block``.
    """
    downs, ups = config["down_block_types"], config["up_block_types"]
    n = len(downs)
    channels = list(config["block_out_channels"])
    lpb = config["layers_per_block"]
    lpb = [lpb] * n if isinstance(lpb, int) else list(lpb)
    depth = config.get("transformer_layers_per_block", 1)
    depth = [depth] * n if isinstance(depth, int) else list(depth)
    rev_depth = config.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    rev_lpb = list(reversed(lpb))
    assert config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn"

    transformers, resnets, samplers = [], [], 0
    out = channels[0]
    for i, kind in enumerate(downs):
        inp, out = out, channels[i]
        for j in range(lpb[i]):
            resnets.append((inp if j == 0 else out, out))
            if kind.startswith("CrossAttn"):
                transformers.append(depth[i])
        samplers += i < n - 1
    resnets += [(channels[-1], channels[-1])] * 2  # mid block: resnet, attention, resnet
    transformers.append(depth[-1])
    rch = list(reversed(channels))
    prev = rch[0]
    for i, kind in enumerate(ups):
        out, inp = rch[i], rch[min(i + 1, n - 1)]
        layers = rev_lpb[i] + 1
        for j in range(layers):
            skip = inp if j == layers - 1 else out
            resnets.append(((prev if j == 0 else out) + skip, out))
            if kind.startswith("CrossAttn"):
                transformers.append(rev_depth[i])
        samplers += i < n - 1
        prev = out
    return {"transformers": transformers, "resnets": resnets, "samplers": samplers}


def expected_unet(config: dict, preset: str) -> tuple[int, int]:
    """(adapted modules, of which 3×3 convs) for a preset, from the config alone.

    attn: to_q/to_k/to_v/to_out.0 of attn1 and attn2 per transformer block. kohya: + ff.net.0.proj, ff.net.2 per
    block and proj_in/proj_out per Transformer2DModel. kohya-conv: + conv1, conv2 (3×3), time_emb_proj and, where the
    channels change, conv_shortcut (1×1) per ResNet, + the 3×3 conv of every down/up sampler.
    """
    lay = unet_layout(config)
    blocks = sum(lay["transformers"])
    if preset == "attn":
        return 8 * blocks, 0
    count = 10 * blocks + 2 * len(lay["transformers"])
    if preset == "kohya":
        return count, 0
    convs3 = 2 * len(lay["resnets"]) + lay["samplers"]
    shortcuts = sum(i != o for i, o in lay["resnets"])
    return count + 3 * len(lay["resnets"]) + shortcuts + lay["samplers"], convs3


def expected_text_encoder(config: dict, preset: str) -> int:
    """q/k/v/out_proj per CLIP layer (attn); + mlp.fc1/fc2 (kohya, kohya-conv)."""
    return (4 if preset == "attn" else 6) * config["num_hidden_layers"]


def expected_counts(folder: str, components, preset: str) -> dict[str, tuple[int, int]]:
    out = {}
    for comp in components:
        config = _read_config(folder, comp)
        out[comp] = expected_unet(config, preset) if comp == "unet" else (expected_text_encoder(config, preset), 0)
    return out


def test_layout_helper_matches_the_known_sd15_counts():
    """The independent counter reproduces kohya's published SD1.5 numbers (192 / 278 with 50 3×3 convs)."""
    sd15 = dict(down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
                layers_per_block=2, transformer_layers_per_block=1)
    assert expected_unet(sd15, "kohya") == (192, 0)
    assert expected_unet(sd15, "kohya-conv") == (278, 50)
    assert expected_text_encoder({"num_hidden_layers": 12}, "kohya") == 72


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def lora_fa(plugin_manager):
    """The example plugin (examples/plugins/mindone-lora-fa), installed by ``make setup``."""
    if "lora_fa" not in plugin_manager.infos:
        pytest.skip("the example plugin is not installed: pip install ./examples/plugins/mindone-lora-fa")
    return plugin_manager.get_plugin("lora_fa")


def _models(folder: str, **kw):
    return load_models(folder, **kw)


def _requires_grad(models) -> dict[str, dict[str, bool]]:
    return {c: {p.name: bool(p.requires_grad) for p in cell.get_parameters()} for c, cell in models.items()}


def _kernel(layer) -> tuple[int, ...]:
    return tuple(int(s) for s in layer.get_base_layer().weight.shape[2:])


def _randomise(models, seed: int = 0) -> None:
    """Give every LoRA A and B random values (B starts at zero, which would hide A's gradient)."""
    import mindspore as ms

    rng = np.random.default_rng(seed)
    for cell in models.values():
        for _, layer in lora_layers(cell):
            for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight):
                p.set_data(ms.Tensor(rng.normal(0.0, 0.05, p.shape).astype(np.float32), dtype=p.dtype))


def _lora_weights(models) -> dict[str, tuple[np.ndarray, np.ndarray, float, float, int]]:
    out = {}
    for comp, cell in models.items():
        for path, layer in lora_layers(cell):
            out[f"{comp}.{path}"] = (layer.lora_A[ADAPTER].weight.asnumpy().copy(),
                                     layer.lora_B[ADAPTER].weight.asnumpy().copy(),
                                     float(layer.lora_alpha[ADAPTER]), float(layer.scaling[ADAPTER]),
                                     int(layer.r[ADAPTER]))
    return out


# ---------------------------------------------------------------------------------------------- what gets adapted


COUNT_CASES = [(arch, strategy, preset, te, comps)
               for preset in PRESETS
               for arch, strategy, te, comps in (("sd1", "unet", True, ("unet", "text_encoder")),
                                                 ("sd1", "text_encoder", False, ("text_encoder",)),
                                                 ("sdxl", "sdxl", True, ("unet", "text_encoder", "text_encoder_2")),
                                                 ("sdxl", "unet", False, ("unet",)))]


@pytest.mark.parametrize("arch,strategy,preset,te,comps", COUNT_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in COUNT_CASES])
def test_adapted_modules_match_the_model_structure(request, plugin_manager, arch, strategy, preset, te, comps):
    folder = request.getfixturevalue(f"tiny_{arch}")
    models = _models(folder)
    options = LoraOptions(strategy=strategy, rank=4, alpha=2, conv_rank=2, conv_alpha=3, targets=preset,
                          extra={"train_text_encoder": te})
    adapted = plugin_manager.add_adapters(models, options)

    expected = expected_counts(folder, comps, preset)
    assert set(adapted) == set(comps)
    for comp, (count, convs3) in expected.items():
        layers = dict(lora_layers(models[comp]))
        assert len(adapted[comp]) == len(layers) == count, comp
        assert sorted(adapted[comp]) == sorted(layers)
        assert sum(_kernel(layer) not in ((), (1, 1)) for layer in layers.values()) == convs3
    for comp in set(models) - set(comps):  # components the run does not adapt stay untouched
        assert not list(lora_layers(models[comp]))


def test_example_plugin_strategy_adapts_like_unet(tiny_sd1, plugin_manager, lora_fa):
    models = _models(tiny_sd1)
    options = LoraOptions(strategy="lora-fa", targets="kohya-conv", extra={"train_text_encoder": True})
    adapted = plugin_manager.add_adapters(models, options)
    expected = expected_counts(tiny_sd1, ("unet", "text_encoder"), "kohya-conv")
    assert {c: len(p) for c, p in adapted.items()} == {c: n for c, (n, _) in expected.items()}


def test_example_plugin_strategy_with_kohya_dropout_trains_only_b(tiny_sd1, plugin_manager, lora_fa):
    """With a dropout asked for, the adapters are the core's plain-LoRA layer, not mindone.peft's: LoRA-FA still
    freezes A and hands only B to the optimizer."""
    from mindone_lora_plugin.models import lora_layers

    models = _models(tiny_sd1, components=("unet",))
    options = LoraOptions(strategy="lora-fa", targets=["to_k"], extra={"network_dropout": 0.1})
    plugin_manager.add_adapters(models, options)
    layers = dict(lora_layers(models["unet"]))
    assert layers and all("peft" not in type(layer).__module__ for layer in layers.values())
    params = [p for g in plugin_manager.trainable_parameters(models, options) for p in g["params"]]
    assert len(params) == len(layers) and all("lora_B" in p.name for p in params)
    assert not any("lora_A" in p.name for p in models["unet"].trainable_params())


def test_explicit_target_list(tiny_sd1, plugin_manager):
    models = _models(tiny_sd1, components=("unet",))
    config = _read_config(tiny_sd1, "unet")
    adapted = plugin_manager.add_adapters(models, LoraOptions(targets=["to_k", "ff.net.2"]))
    blocks = sum(unet_layout(config)["transformers"])
    assert len(adapted["unet"]) == 3 * blocks  # attn1.to_k, attn2.to_k, ff.net.2 per transformer block
    assert all(p.endswith((".to_k", ".ff.net.2")) for p in adapted["unet"])


# ---------------------------------------------------------------------------------------------- rank and alpha


@pytest.mark.parametrize("alpha,conv_rank,conv_alpha,want_linear,want_conv", [
    (2.0, 2, 3.0, (4, 2.0), (2, 3.0)),     # everything set: 3×3 convs get conv_rank/conv_alpha
    (None, None, None, (4, 4.0), (4, 4.0)),  # alpha defaults to rank, conv_* to rank/alpha
    (8.0, 2, None, (4, 8.0), (2, 8.0)),      # conv_alpha defaults to alpha
], ids=["explicit", "defaults", "conv-alpha-from-alpha"])
def test_rank_and_alpha_land_in_every_layer(tiny_sd1, plugin_manager, alpha, conv_rank, conv_alpha, want_linear,
                                            want_conv):
    models = _models(tiny_sd1)
    options = LoraOptions(rank=4, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha, targets="kohya-conv",
                          extra={"train_text_encoder": True})
    plugin_manager.add_adapters(models, options)
    seen = set()
    for comp, cell in models.items():
        for path, layer in lora_layers(cell):
            conv3 = _kernel(layer) not in ((), (1, 1))
            rank, a = want_conv if conv3 else want_linear
            seen.add(conv3)
            assert layer.r[ADAPTER] == rank, path
            assert float(layer.lora_alpha[ADAPTER]) == a, path
            assert layer.scaling[ADAPTER] == pytest.approx(a / rank), path
            assert layer.lora_A[ADAPTER].weight.shape[0] == rank
            assert layer.lora_B[ADAPTER].weight.shape[1] == rank
            assert not np.any(layer.lora_B[ADAPTER].weight.asnumpy()), "B starts at zero"
    assert seen == {True, False}


# ---------------------------------------------------------------------------------------------- trainable parameters


def test_trainable_parameters_are_exactly_the_lora_ones_sdxl(tiny_sdxl, plugin_manager):
    import mindspore as ms

    models = _models(tiny_sdxl)
    options = LoraOptions(strategy="sdxl", targets="kohya", learning_rate=1e-4,
                          learning_rates={"text_encoder": 5e-5, "text_encoder_2": 2e-5},
                          extra={"train_text_encoder": True})
    plugin_manager.add_adapters(models, options)
    groups = plugin_manager.trainable_parameters(models, options)

    assert [g["component"] for g in groups] == ["unet", "text_encoder", "text_encoder_2"]
    assert [g["lr"] for g in groups] == [1e-4, 5e-5, 2e-5]
    params = [p for g in groups for p in g["params"]]
    names = [p.name for p in params]
    assert len(set(names)) == len(names), "names must be unique across components (SDXL's two text encoders)"
    assert all(p.dtype == ms.float32 for p in params)
    for g in groups:
        comp = g["component"]
        lora = {id(p) for _, layer in lora_layers(models[comp])
                for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)}
        assert {id(p) for p in g["params"]} == lora
        assert {id(p) for p in models[comp].trainable_params()} == lora, f"only LoRA requires grad in {comp}"
    # the two text encoders have the same module paths; their parameters are told apart by the component
    te1 = {n.split(".", 1)[1] for n in names if n.startswith("text_encoder.")}
    te2 = {n.split(".", 1)[1] for n in names if n.startswith("text_encoder_2.")}
    assert te1 == te2 and te1


def test_trainable_parameters_are_fp32_on_a_half_precision_model(tiny_sd1, plugin_manager):
    import mindspore as ms

    models = _models(tiny_sd1, components=("unet",), dtype=ms.float16)
    options = LoraOptions(targets="attn")
    plugin_manager.add_adapters(models, options)
    (group,) = plugin_manager.trainable_parameters(models, options)
    assert group["params"] and all(p.dtype == ms.float32 for p in group["params"])
    assert all(p.dtype == ms.float16 for p in models["unet"].get_parameters() if not p.requires_grad
               and ".lora_" not in p.name)


# ---------------------------------------------------------------------------------------------- misfits


def _unet_only(folder):
    return _models(folder, components=("unet",))


MISFITS = [
    ("sdxl-on-sd1", "sd1", None, dict(strategy="sdxl"), "sdxl"),
    ("text_encoder-on-sdxl", "sdxl", None, dict(strategy="text_encoder"), "sdxl"),
    ("text_encoder-without-text-encoder", "sd1", _unet_only, dict(strategy="text_encoder"), "text_encoder"),
    ("unet+te-without-text-encoder", "sd1", _unet_only, dict(extra={"train_text_encoder": True}), "text_encoder"),
    ("unet+te-on-sdxl", "sdxl", None, dict(extra={"train_text_encoder": True}), "--lora_strategy sdxl"),
    ("component-not-adaptable", "sdxl", None, dict(components=("unet", "text_encoder_2")), "text_encoder_2"),
    ("unknown-preset", "sd1", None, dict(targets="kohya-lycoris"), "kohya-lycoris"),
    ("empty-target-list", "sd1", None, dict(targets=[]), "no module"),
    ("no-matching-target", "sd1", None, dict(targets=["to_nothing"]), "to_nothing"),
    ("rank-0", "sd1", None, dict(rank=0), "rank"),
]


@pytest.mark.parametrize("arch,load,kw,message", [m[1:] for m in MISFITS], ids=[m[0] for m in MISFITS])
def test_a_strategy_that_does_not_fit_fails_before_adding_anything(request, plugin_manager, arch, load, kw, message):
    folder = request.getfixturevalue(f"tiny_{arch}")
    models = (load or _models)(folder)
    before = _requires_grad(models)
    with pytest.raises(LoraError) as err:
        plugin_manager.add_adapters(models, LoraOptions(**kw))
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    for cell in models.values():
        assert not list(lora_layers(cell))
    assert _requires_grad(models) == before, "nothing may be frozen either"


def test_unknown_strategy_lists_the_valid_ones(tiny_sd1, plugin_manager):
    models = _unet_only(tiny_sd1)
    with pytest.raises(PluginError) as err:
        plugin_manager.add_adapters(models, LoraOptions(strategy="lokr"))
    assert "lokr" in str(err.value)
    for name in ("unet", "text_encoder", "sdxl"):
        assert name in str(err.value)
    assert not list(lora_layers(models["unet"]))


# ---------------------------------------------------------------------------------------------- extract → apply


@pytest.mark.parametrize("arch,strategy,preset", [("sd1", "unet", "kohya-conv"), ("sdxl", "sdxl", "kohya")])
def test_extract_apply_round_trip(request, plugin_manager, arch, strategy, preset):
    folder = request.getfixturevalue(f"tiny_{arch}")
    strat = plugin_manager.get_strategy(strategy)
    options = LoraOptions(strategy=strategy, rank=4, alpha=2, conv_rank=2, conv_alpha=3, targets=preset,
                          extra={"train_text_encoder": True})
    models = _models(folder)
    plugin_manager.add_adapters(models, options)
    _randomise(models)
    state = strat.extract(models)
    assert set(state.components) == set(models)
    # per-module alphas: make a few differ from everything the options say
    for i, (comp, path, mod) in enumerate(list(state.modules())):
        if i % 7 == 0:
            mod.alpha = 0.5 + i / 10
    expected = {f"{c}.{p}": m for c, p, m in state.modules()}

    for prepare in ("fresh", "adapted"):
        fresh = _models(folder)
        if prepare == "adapted":  # adapters already there (resume): weights and alphas are overwritten
            plugin_manager.add_adapters(fresh, options)
        strat.apply(fresh, state, options)
        got = _lora_weights(fresh)
        assert set(got) == set(expected), prepare
        for key, (a, b, alpha, scaling, r) in got.items():
            mod = expected[key]
            np.testing.assert_array_equal(a, mod.down)
            np.testing.assert_array_equal(b.reshape(mod.up.shape), mod.up)
            assert (r, alpha) == (mod.rank, float(mod.alpha)), key
            assert scaling == pytest.approx(mod.alpha / mod.rank), key
        again = strat.extract(fresh)
        assert len(again) == len(state)


def test_apply_refuses_a_state_for_another_model(tiny_sd1, tiny_sdxl, plugin_manager):
    strat = plugin_manager.get_strategy("sdxl")
    models = _models(tiny_sdxl)
    plugin_manager.add_adapters(models, LoraOptions(strategy="sdxl", extra={"train_text_encoder": True}))
    state = strat.extract(models)
    with pytest.raises(LoraError, match="text_encoder_2"):
        plugin_manager.get_strategy("unet").apply(_models(tiny_sd1), state)


# ---------------------------------------------------------------------------------------------- one optimizer step


@pytest.fixture(scope="module")
def cpu_pynative():
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", mode="pynative", seed=0)


def one_step(unet, groups, seed: int = 0) -> dict[int, np.ndarray]:
    """One AdamWeightDecay step on a simple loss of the UNet output; return each optimized parameter's gradient."""
    import mindspore as ms
    from mindspore import nn

    rng = np.random.default_rng(seed)
    config = unet.config
    sample = ms.Tensor(rng.normal(size=(1, config.in_channels, 16, 16)).astype(np.float32))
    context = ms.Tensor(rng.normal(size=(1, 8, config.cross_attention_dim)).astype(np.float32))
    timestep = ms.Tensor([500], ms.int32)
    optimizer = nn.AdamWeightDecay([{"params": g["params"], "lr": g["lr"]} for g in groups],
                                   learning_rate=1e-3, weight_decay=0.0)

    def loss_fn():
        out = unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
        return (out ** 2).mean()

    loss, grads = ms.value_and_grad(loss_fn, None, optimizer.parameters)()
    assert np.isfinite(float(loss))
    optimizer(grads)
    return {id(p): g.asnumpy() for p, g in zip(optimizer.parameters, grads)}


def _snapshot(cell) -> list[tuple[object, str, np.ndarray]]:
    # keyed by object: a PyNative forward may rename parameters (slicing a CellList re-prefixes them)
    return [(p, p.name, p.asnumpy().copy()) for p in cell.get_parameters()]


def _changed(snapshot) -> set[int]:
    return {id(p) for p, _, before in snapshot if not np.array_equal(before, p.asnumpy())}


def test_one_step_changes_only_lora_parameters_unet(tiny_sd1, plugin_manager, cpu_pynative):
    models = _unet_only(tiny_sd1)
    options = LoraOptions(rank=4, alpha=4, targets="kohya-conv", learning_rate=1e-3)
    plugin_manager.add_adapters(models, options)
    _randomise(models)
    groups = plugin_manager.trainable_parameters(models, options)
    trained = {id(p) for g in groups for p in g["params"]}
    snap = _snapshot(models["unet"])
    grads = one_step(models["unet"], groups)
    changed = _changed(snap)

    assert changed <= trained, "a frozen parameter changed"
    # every LoRA weight with a real gradient moved (both A and B: B is non-zero here)
    moving = {i for i, g in grads.items() if np.abs(g).max() > 1e-6}
    assert moving <= changed
    assert len(changed) >= 0.9 * len(trained)
    a_ids = {id(layer.lora_A[ADAPTER].weight) for _, layer in lora_layers(models["unet"])}
    assert a_ids & changed, "the unet strategy trains A too"


def test_lora_fa_one_step_then_save_and_load_through_the_manager(tiny_sd1, plugin_manager, lora_fa, cpu_pynative,
                                                                 tmp_path):
    from mindone_lora_plugin.safetensors_io import load

    options = LoraOptions(strategy="lora-fa", rank=4, alpha=2, conv_rank=2, conv_alpha=1, targets="kohya-conv",
                          learning_rate=1e-3, extra={"train_text_encoder": True, "lora_fa_init": "orthogonal"})
    models = _models(tiny_sd1)
    adapted = plugin_manager.add_adapters(models, options)
    a_params = [layer.lora_A[ADAPTER].weight for c in adapted for _, layer in lora_layers(models[c])]
    assert a_params and not any(p.requires_grad for p in a_params), "A is frozen as soon as it is added"
    _randomise(models)  # a non-zero B gives A a real gradient: only the freezing keeps it still
    groups = plugin_manager.trainable_parameters(models, options)
    trained = [p for g in groups for p in g["params"]]
    assert len(trained) == sum(len(v) for v in adapted.values()), "one parameter (B) per adapted module"
    assert all(p.name.endswith(".lora_B.weight") for p in trained)
    assert not any(p.requires_grad for p in a_params)
    for comp in adapted:
        assert {id(p) for p in models[comp].trainable_params()} == {
            id(layer.lora_B[ADAPTER].weight) for _, layer in lora_layers(models[comp])}

    unet_groups = [g for g in groups if g["component"] == "unet"]
    snap = _snapshot(models["unet"])
    one_step(models["unet"], unet_groups)
    changed = _changed(snap)
    b_unet = {id(layer.lora_B[ADAPTER].weight) for _, layer in lora_layers(models["unet"])}
    assert changed <= b_unet and len(changed) >= 0.9 * len(b_unet)
    assert not changed & {id(p) for p in a_params}, "A must not change"

    # save in the example plugin's peft format and in kohya, through the manager
    out = tmp_path / "out"
    paths = plugin_manager.save_weights(models, options, str(out), ["peft", "kohya"], output_name="fa",
                                        metadata={"ss_steps": "1"})
    peft_dir, kohya_file = paths
    assert peft_dir == str(out / "fa_peft") and os.path.isfile(kohya_file)
    assert sorted(os.listdir(peft_dir)) == ["text_encoder", "unet"]
    with open(os.path.join(peft_dir, "unet", "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 2.0
    assert config["target_modules"] == sorted(adapted["unet"])
    assert set(config["rank_pattern"].values()) == {2} and set(config["alpha_pattern"].values()) == {1.0}
    tensors, meta = load(os.path.join(peft_dir, "unet", "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(adapted["unet"])
    assert all(k.startswith("base_model.model.") for k in tensors)
    assert meta["ss_steps"] == "1" and meta["format"] == "pt"

    trained_weights = _lora_weights(models)
    for path in (peft_dir, kohya_file):
        fresh = _models(tiny_sd1)
        state = plugin_manager.load_weights(fresh, options, path)
        assert len(state) == len(trained_weights)
        got = _lora_weights(fresh)
        assert set(got) == set(trained_weights), path
        for key, (a, b, alpha, scaling, r) in got.items():
            ta, tb, talpha, tscaling, tr = trained_weights[key]
            np.testing.assert_array_equal(a, ta)
            np.testing.assert_array_equal(b, tb)
            assert (alpha, scaling, r) == (talpha, tscaling, tr), key
        fresh_groups = plugin_manager.trainable_parameters(fresh, options)
        assert all(p.name.endswith(".lora_B.weight") for g in fresh_groups for p in g["params"])
        assert not any(layer.lora_A[ADAPTER].weight.requires_grad
                       for c in fresh.values() for _, layer in lora_layers(c)), "A stays frozen after a load"


# ---------------------------------------------------------------------------------------------- lora-fa specifics


def test_lora_fa_orthogonal_init(tiny_sd1, plugin_manager, lora_fa):
    models = _unet_only(tiny_sd1)
    options = LoraOptions(strategy="lora-fa", rank=4, targets="kohya-conv", extra={"lora_fa_init": "orthogonal"})
    plugin_manager.add_adapters(models, options)
    for path, layer in lora_layers(models["unet"]):
        a = layer.lora_A[ADAPTER].weight.asnumpy().reshape(4, -1)
        np.testing.assert_allclose(a @ a.T, np.eye(4), atol=1e-5, err_msg=path)
        assert not np.any(layer.lora_B[ADAPTER].weight.asnumpy())


def test_lora_fa_rejects_an_unknown_init_before_adding(tiny_sd1, plugin_manager, lora_fa):
    models = _unet_only(tiny_sd1)
    with pytest.raises(LoraError, match="lora_fa_init"):
        plugin_manager.add_adapters(models, LoraOptions(strategy="lora-fa", extra={"lora_fa_init": "zeros"}))
    assert not list(lora_layers(models["unet"]))
