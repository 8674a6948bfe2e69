"""kohya's adapter dropouts on plain ``lora`` (``--network_dropout --rank_dropout --module_dropout``): kohya's semantics
in train mode, exact no-dropout outputs in eval mode, files without a trace of them, exact resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from mindone_lora_plugin.errors import LoraError

RATES = {"network_dropout": 0.3, "rank_dropout": 0.4, "module_dropout": 0.2}


def _flat(state) -> dict:
    """``component.path.role`` → float32 tensor of every module of a :class:`LoraState`."""
    return {f"{c}.{p}.{r}": np.asarray(t, np.float32) for c, p, m in state.modules() for r, t in m.tensors.items()}


def _layer(base, rank, rates, seed=0):
    from mindone_lora_plugin.algorithms.lora import lora_layer_class

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in base.weight.shape)
    tail = shape[1:]
    tensors = {"down": rng.standard_normal((rank,) + tail).astype(np.float32),
               "up": rng.standard_normal((shape[0], rank) + ((1, 1) if len(shape) == 4 else ())).astype(np.float32)}
    return lora_layer_class()(base, "lora", tensors, float(rank) / 2, rates), tensors


def _subset_sums(parts):
    """Every sum of a subset of ``parts`` (``[k, ...]``), as ``[2**k, ...]``."""
    k = parts.shape[0]
    pick = (np.arange(2 ** k)[:, None] >> np.arange(k)[None]) & 1
    return np.tensordot(pick.astype(np.float64), parts, axes=1)


def _nearest(values, candidates):
    """Per row of ``values`` ``[n, d]``: the distance to the nearest candidate row ``[m, d]``."""
    return np.sqrt(((values[:, None, :] - candidates[None]) ** 2).sum(-1)).min(1)


def test_rank_and_network_dropout_drop_as_kohya_does():
    """Linear, 3-D input: rank dropout drops whole ranks per sample (every token of a sample alike) and rescales by
    1/(1-p); network dropout drops down-output neurons per token with 1/(1-p); the mean over samples is the
    no-dropout output; eval mode is exactly base + up @ down * scale."""
    import mindspore as ms
    from mindspore import mint

    from mindone_lora_plugin.algorithms.layers import seed_dropout
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    base = mint.nn.Linear(6, 5)
    n, tokens, r = 600, 3, 4
    x1 = np.random.default_rng(1).standard_normal(6).astype(np.float32)
    x = ms.Tensor(np.broadcast_to(x1, (n, tokens, 6)).copy())
    for flag in ("rank_dropout", "network_dropout"):
        layer, t = _layer(base, r, {flag: 0.5})
        scale = layer.scaling
        parts = (t["up"] * (t["down"] @ x1)[None]).T * scale  # [r, out]: each rank's share of the adapter output
        candidates = _subset_sums(parts / 0.5)  # kept ranks, rescaled by 1 / (1 - p)
        layer.set_train(True)
        seed_dropout(7, 0)
        extra = layer(x).asnumpy() - base(x).asnumpy()
        assert _nearest(extra.reshape(-1, 5), candidates).max() < 1e-4  # whole ranks, 1/(1-p)
        same_in_sample = np.abs(extra - extra[:, :1]).max()
        assert same_in_sample < 1e-5 if flag == "rank_dropout" else same_in_sample > 1e-2
        np.testing.assert_allclose(extra.mean((0, 1)), parts.sum(0), atol=0.15 * np.abs(parts).sum())  # unbiased
        layer.set_train(False)
        want = base(x).asnumpy() + x.asnumpy() @ (t["up"] @ t["down"]).T * scale
        np.testing.assert_allclose(layer(x).asnumpy(), want, rtol=1e-5, atol=1e-5)


def test_locon_conv_dropout_and_graph_mode_masks():
    """LoCon on a 3×3 conv: rank dropout drops a rank for every pixel of a sample alike; module_dropout=1 gives the
    base output in train mode; the same seed draws the same masks in PyNative and GRAPH_MODE, other seeds others."""
    import mindspore as ms
    from mindspore import mint, nn

    from mindone_lora_plugin.algorithms.layers import seed_dropout
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    conv = mint.nn.Conv2d(3, 4, 3, padding=1)
    layer, t = _layer(conv, 2, {"rank_dropout": 0.5})
    rng = np.random.default_rng(2)
    x = ms.Tensor(rng.standard_normal((64, 3, 6, 6)).astype(np.float32))
    layer.set_train(True)
    seed_dropout(1, 0)
    extra = layer(x).asnumpy() - conv(x).asnumpy()
    layer.set_train(False)
    full = layer(x).asnumpy() - conv(x).asnumpy()
    ratio = np.einsum("nchw,nchw->n", extra, full) / np.einsum("nchw,nchw->n", full, full)
    # per sample, the kept ranks' share rescaled by 2: 0 (none kept), 2 (both) or in between, never partial pixels
    resid = extra - ratio[:, None, None, None] * full
    assert np.abs(resid[(ratio < 1e-6) | (ratio > 2 - 1e-4)]).max() < 1e-4
    assert (ratio < 1e-6).any() and (ratio > 2 - 1e-4).any()

    skip, _ = _layer(conv, 2, {"module_dropout": 1.0})
    skip.set_train(True)
    np.testing.assert_array_equal(skip(x).asnumpy(), conv(x).asnumpy())

    class Wrap(nn.Cell):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def construct(self, a):
            return self.inner(a)

    both = Wrap(_layer(conv, 2, RATES)[0])
    both.set_train(True)
    seed_dropout(3, 1)
    eager = both(x).asnumpy()
    seed_dropout(4, 1)
    other = both(x).asnumpy()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        seed_dropout(3, 1)
        graph = both(x).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-5)
    assert np.abs(other - eager).max() > 1e-3


def test_dropout_layers_on_a_unet_eval_as_peft_and_save_no_trace(plugin_manager, tiny_sd1, tmp_path):
    """``lora`` with the three dropouts on a tiny UNet (attention + LoCon convs): the layers start from the
    mindone.peft layers' tensors, eval outputs equal a peft model holding the same state, train outputs differ;
    module_dropout=1 is the base model in train mode; the saved files equal the no-dropout files key for key."""
    import mindspore as ms

    from mindone_lora_plugin.demo.training import model_outputs
    from mindone_lora_plugin.models import load_models, lora_layers
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    pm = plugin_manager
    targets = ["to_q", "conv1"]  # 12 attention Linears, 12 ResNet 3×3 convs (LoCon)
    plain = LoraOptions(strategy="unet", rank=2, alpha=2, targets=targets, conv_rank=2)
    dropped = LoraOptions(strategy="unet", rank=2, alpha=2, targets=targets, conv_rank=2, extra=dict(RATES))
    models = load_models(tiny_sd1)
    base = model_outputs(models)
    pm.add_adapters(models, dropped)
    layers = dict(lora_layers(models["unet"]))
    assert layers and {type(v).__name__ for v in layers.values()} == {"LoraLayer"}
    assert any(v.is_conv for v in layers.values()) and any(not v.is_conv for v in layers.values())
    strategy = pm.get_strategy("unet")
    rng = np.random.default_rng(4)
    for layer in layers.values():
        for p in strategy.layer_parameters(layer).values():
            p.set_data(ms.Tensor((0.2 * rng.standard_normal(p.shape)).astype(np.float32)))
    state = strategy.extract(models)
    assert all(m.settings == {} for _, _, m in state.modules())  # the rates are no module setting

    reference = load_models(tiny_sd1)
    pm.add_adapters(reference, plain)
    assert not any(type(v).__name__ == "LoraLayer" for _, v in lora_layers(reference["unet"]))
    strategy.apply(reference, state)
    want = model_outputs(reference)
    got = model_outputs(models)  # eval mode
    np.testing.assert_allclose(got["unet"], want["unet"], rtol=1e-4, atol=1e-4)
    assert np.abs(got["unet"] - base["unet"]).max() > 1e-2

    models["unet"].set_train(True)
    from mindone_lora_plugin.algorithms.layers import seed_dropout

    seed_dropout(0, 0)
    train_out = model_outputs(models)["unet"]
    assert np.abs(train_out - want["unet"]).max() > 1e-3  # dropout acts in train mode
    for layer in layers.values():
        layer.module_dropout = 1.0
    np.testing.assert_allclose(model_outputs(models)["unet"], base["unet"], rtol=1e-5, atol=1e-5)
    models["unet"].set_train(False)

    written = {}
    for name, m, opts in (("drop", models, dropped), ("plain", reference, plain)):
        files = pm.save_weights(m, opts, str(tmp_path / name), ["kohya", "diffusers"], "x", {})
        written[name] = sorted(files)
    assert len(written["drop"]) == 2
    for a, b in zip(written["drop"], written["plain"]):
        ta, tb = load_file(a), load_file(b)
        assert sorted(ta) == sorted(tb) and not any("drop" in k for k in ta)
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def test_flags_reach_lora_and_dora_refuses_rank_and_network_dropout(training):
    """The flags go to the options (no refusal for plain lora); DoRA takes module_dropout only (a DoRA layer with
    module_dropout=1 is the base layer in train mode), refusing the others in one line before any model loads."""
    from mindone_lora_plugin.plugins import get_plugin_manager
    from mindone_lora_plugin.train.flags.settings import options_from_args

    parse = training.parse

    pm = get_plugin_manager()
    common = ["--pretrained_model_name_or_path", "m", "--output_dir", "o"]
    o = options_from_args(parse(common + ["--network_dropout", "0.1", "--rank_dropout", "0.2",
                                          "--module_dropout", "0.3"]), "sd1", pm)
    assert {k: o.extra[k] for k in RATES} == {"network_dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.3}
    assert pm.get_algorithm("lora").settings_from(o) == {}
    d = options_from_args(parse(common + ["--lora_dora", "--module_dropout", "0.3"]), "sd1", pm)
    assert pm.get_algorithm("lora").settings_from(d) == {"dora_axis": "out", "module_dropout": 0.3}
    from mindspore import mint

    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    base = mint.nn.Linear(6, 4)
    rng = np.random.default_rng(5)
    tensors = {"down": rng.standard_normal((2, 6)).astype(np.float32),
               "up": rng.standard_normal((4, 2)).astype(np.float32)}
    layer = pm.get_algorithm("lora").make_layer(base, tensors, 2.0, {"dora_axis": "out", "module_dropout": 1.0})
    assert type(layer).__name__ == "DoraLayer" and "module_dropout" not in layer.settings
    import mindspore as ms

    x = ms.Tensor(rng.standard_normal((3, 6)).astype(np.float32))
    layer.set_train(False)
    assert np.abs(layer(x).asnumpy() - base(x).asnumpy()).max() > 1e-3
    layer.set_train(True)
    np.testing.assert_array_equal(layer(x).asnumpy(), base(x).asnumpy())
    with pytest.raises(LoraError, match=r"--rank_dropout cannot be combined with --lora_dora") as err:
        options_from_args(parse(common + ["--lora_dora", "--rank_dropout", "0.3"]), "sd1", pm)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_dropout_training_resumes_exactly_and_changes_training(tiny_sd1, tmp_path, training):
    """``train`` with the three dropouts (PyNative, 2 steps): a resume from step 1 repeats step 2's loss and
    tensors exactly; the same resume without dropout gives another loss and other tensors; the files hold the
    trained state and nothing else; the flags are recorded in the metadata."""
    from mindone_lora_plugin.demo.training import make_shapes_dataset
    from mindone_lora_plugin.formats.reader import read_lora

    train = training.train

    data = make_shapes_dataset(str(tmp_path / "data"), size=32, repeats=1)
    drop = ["--network_dropout", "0.3", "--rank_dropout", "0.3", "--module_dropout", "0.1"]

    def args(out, *extra):
        return ["--pretrained_model_name_or_path", tiny_sd1, "--train_data_dir", data, "--output_dir", out,
                "--max_train_steps", "2", "--train_batch_size", "2", "--learning_rate", "1e-2",
                "--lr_warmup_steps", "0", "--seed", "5", "--report_to", "none", "--device_target", "CPU",
                "--mode", "pynative", "--resolution", "32", "--lora_targets", "attn", "--output_name", "d",
                "--checkpointing_steps", "1", "--save_formats", "diffusers,kohya", *extra]

    straight = train(args(str(tmp_path / "a"), *drop))
    for name in ("b", "c"):
        shutil.copytree(tmp_path / "a" / "checkpoint-1", tmp_path / name / "checkpoint-1")
    resumed = train(args(str(tmp_path / "b"), "--resume_from_checkpoint", "latest", *drop))
    undropped = train(args(str(tmp_path / "c"), "--resume_from_checkpoint", "latest"))
    assert resumed.losses == straight.losses  # same seed and step: the same masks
    assert undropped.losses[0] == straight.losses[0] and abs(undropped.losses[1] - straight.losses[1]) > 1e-7

    from mindone_lora_plugin.plugins import get_plugin_manager

    trained = _flat(get_plugin_manager().get_strategy("unet").extract(straight.models))
    assert len(straight.files) == 2
    for path in straight.files:
        a = load_file(path)
        b = load_file(path.replace(str(tmp_path / "a"), str(tmp_path / "b")))
        c = load_file(path.replace(str(tmp_path / "a"), str(tmp_path / "c")))
        assert sorted(a) == sorted(b) == sorted(c)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert max(float(np.abs(a[k].astype(np.float32) - c[k].astype(np.float32)).max()) for k in a) > 0
        held = _flat(read_lora(path))
        assert held.keys() == trained.keys()
        for k in held:
            np.testing.assert_array_equal(held[k].reshape(trained[k].shape), trained[k], err_msg=k)
    meta = read_lora(next(f for f in straight.files if f.endswith("d.safetensors"))).metadata  # kohya's keys
    assert json.loads(meta["mindone_lora.training_args"])["rank_dropout"] == 0.3
    assert meta["ss_network_dropout"] == "0.3"
    assert json.loads(meta["ss_network_args"]) == {"rank_dropout": "0.3", "module_dropout": "0.1"}
