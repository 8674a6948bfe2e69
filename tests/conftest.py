"""Shared fixtures: tiny SD1.x/SDXL model folders (built once per session, from config, no hub), a fresh plugin
manager, ``ms_tools`` (MindSpore tensors, modes), ``training`` (run ``mindone-lora train``, load files back),
``dora_run`` (a DoRA training run), ``sd_fakes`` (fake SD base models and LoRA states)."""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import numpy as np
import pytest

from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.state import LoraModule, LoraState

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
    """``mindone-lora train --lora_dora`` (PyNative, 2 steps, a checkpoint after each) for the DoRA tests of algorithms/
    and compose/: the run, its data folder, the folder holding both, and ``dora_train_args``."""
    from mindone_lora_plugin.demo.training import make_shapes_dataset
    from mindone_lora_plugin.plugins import reset_plugin_manager

    reset_plugin_manager()
    tmp = tmp_path_factory.mktemp("dora-run")
    data = make_shapes_dataset(str(tmp / "data"), size=32, repeats=1)
    run = train(dora_train_args(tiny_sd1, data, str(tmp / "a")))
    reset_plugin_manager()
    return run, data, tmp, dora_train_args


# ------------------------------------------------------------------------------------------------ fake SD models
# and LoRA states, pure numpy: unet_modules/clip_modules list a diffusers UNet's/CLIP's Linear and Conv2d weights with
# diffusers' shapes; tiny_sd1_info/tiny_sdxl_info mirror architectures.sd.tiny (the tiny_sd1/tiny_sdxl folders)


def _transformer(prefix, ch, cross, layers, linear_proj, out):
    proj = (ch, ch) if linear_proj else (ch, ch, 1, 1)
    out[f"{prefix}.proj_in"] = proj
    out[f"{prefix}.proj_out"] = proj
    for t in range(layers):
        tb = f"{prefix}.transformer_blocks.{t}"
        for a, kv in (("attn1", ch), ("attn2", cross)):
            out[f"{tb}.{a}.to_q"] = (ch, ch)
            out[f"{tb}.{a}.to_k"] = (ch, kv)
            out[f"{tb}.{a}.to_v"] = (ch, kv)
            out[f"{tb}.{a}.to_out.0"] = (ch, ch)
        out[f"{tb}.ff.net.0.proj"] = (ch * 8, ch)
        out[f"{tb}.ff.net.2"] = (ch, ch * 4)


def _resnet(prefix, cin, cout, temb, out):
    out[f"{prefix}.conv1"] = (cout, cin, 3, 3)
    out[f"{prefix}.time_emb_proj"] = (cout, temb)
    out[f"{prefix}.conv2"] = (cout, cout, 3, 3)
    if cin != cout:
        out[f"{prefix}.conv_shortcut"] = (cout, cin, 1, 1)


def unet_modules(channels=(32, 64), down_attn=(False, True), layers_per_block=2, transformer_layers=(1, 1),
                 cross=32, linear_proj=False, add_embedding_in=None) -> dict:
    """Module path → weight shape of a UNet2DConditionModel (up blocks mirror the down blocks)."""
    L = layers_per_block
    temb = channels[0] * 4
    out = {"conv_in": (channels[0], 4, 3, 3), "time_embedding.linear_1": (temb, channels[0]),
           "time_embedding.linear_2": (temb, temb), "conv_out": (4, channels[0], 3, 3)}
    if add_embedding_in:
        out["add_embedding.linear_1"] = (temb, add_embedding_in)
        out["add_embedding.linear_2"] = (temb, temb)
    n = len(channels)
    cin = channels[0]
    skips = [channels[0]]
    for b, ch in enumerate(channels):
        for j in range(L):
            _resnet(f"down_blocks.{b}.resnets.{j}", cin if j == 0 else ch, ch, temb, out)
            if down_attn[b]:
                _transformer(f"down_blocks.{b}.attentions.{j}", ch, cross, transformer_layers[b], linear_proj, out)
            skips.append(ch)
        cin = ch
        if b < n - 1:
            out[f"down_blocks.{b}.downsamplers.0.conv"] = (ch, ch, 3, 3)
            skips.append(ch)
    mid = channels[-1]
    _resnet("mid_block.resnets.0", mid, mid, temb, out)
    _transformer("mid_block.attentions.0", mid, cross, transformer_layers[-1], linear_proj, out)
    _resnet("mid_block.resnets.1", mid, mid, temb, out)
    rev = list(reversed(channels))
    prev = rev[0]
    for b, ch in enumerate(rev):
        attn = list(reversed(down_attn))[b]
        tl = list(reversed(transformer_layers))[b]
        for j in range(L + 1):
            skip = skips.pop()
            _resnet(f"up_blocks.{b}.resnets.{j}", (prev if j == 0 else ch) + skip, ch, temb, out)
            if attn:
                _transformer(f"up_blocks.{b}.attentions.{j}", ch, cross, tl, linear_proj, out)
        prev = ch
        if b < n - 1:
            out[f"up_blocks.{b}.upsamplers.0.conv"] = (ch, ch, 3, 3)
    return out


def clip_modules(hidden=32, layers=5, intermediate=37, projection=None) -> dict:
    """Module path → weight shape of a CLIP text encoder (as BaseModelInfo lists it: no embeddings)."""
    out = {}
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for q in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}.self_attn.{q}"] = (hidden, hidden)
        out[f"{p}.mlp.fc1"] = (intermediate, hidden)
        out[f"{p}.mlp.fc2"] = (hidden, intermediate)
    if projection:
        out["text_projection"] = (projection, hidden)
    return out


def tiny_sd1_info() -> BaseModelInfo:
    return BaseModelInfo("sd1", {"layers_per_block": 2}, {"unet": unet_modules(cross=32, linear_proj=False),
                                    "text_encoder": clip_modules()}, source="<tiny-sd1>")


def tiny_sdxl_info() -> BaseModelInfo:
    return BaseModelInfo("sdxl", {"layers_per_block": 2},
                         {"unet": unet_modules(cross=64, linear_proj=True, transformer_layers=(1, 2),
                                               add_embedding_in=80),
                          "text_encoder": clip_modules(),
                          "text_encoder_2": clip_modules(projection=32)}, source="<tiny-sdxl>")


def real_sdxl_unet() -> dict:
    """The real SDXL base UNet layout (3 down blocks, transformer layers (1, 2, 10)); shapes as in SDXL."""
    return unet_modules(channels=(320, 640, 1280), down_attn=(False, True, True), transformer_layers=(1, 2, 10),
                        cross=2048, linear_proj=True, add_embedding_in=2816)


def real_sd1_unet() -> dict:
    return unet_modules(channels=(320, 640, 1280, 1280), down_attn=(True, True, True, False),
                        transformer_layers=(1, 1, 1, 1), cross=768, linear_proj=False)


def kohya_targets(modules: dict, conv: bool = False) -> list[str]:
    """kohya's default UNet/TE targets (transformer children, CLIP attention/MLP), plus the resnet/sampler set."""
    out = []
    for p in modules:
        if ".attentions." in p or ".self_attn." in p or ".mlp." in p:
            out.append(p)
        elif conv and (".resnets." in p or "samplers." in p):
            out.append(p)
    return out


def random_state(base: BaseModelInfo, rng=None, conv=True, vary=True, dtype=np.float32, ranks=(2, 4, 8),
                 alphas=(1.0, 4.0, 0.5, 8.0, 3.0), components=None) -> LoraState:
    """A LoraState over ``base``'s kohya targets with per-module ranks/alphas (uniform when ``vary`` is False)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    st = LoraState(architecture=base.architecture, base_config=base.base_config)
    for comp, mods in base.modules.items():
        if components is not None and comp not in components:
            continue
        for path in kohya_targets(mods, conv=conv):
            shape = mods[path]
            r = int(rng.choice(ranks)) if vary else ranks[0]
            a = float(rng.choice(alphas)) if vary else alphas[0]
            if len(shape) == 4:
                down = rng.standard_normal((r, shape[1], shape[2], shape[3]))
                up = rng.standard_normal((shape[0], r, 1, 1))
            else:
                down = rng.standard_normal((r, shape[1]))
                up = rng.standard_normal((shape[0], r))
            st.add(comp, path, LoraModule(down.astype(dtype), up.astype(dtype), a))
    return st


def assert_states_equal(a: LoraState, b: LoraState, exact=True, atol=0.0):
    ka = [(c, p) for c, p, _ in a.modules()]
    kb = [(c, p) for c, p, _ in b.modules()]
    assert ka == kb, (set(ka) ^ set(kb))
    for c, p, m in a.modules():
        n = b.components[c][p]
        assert m.rank == n.rank, (c, p)
        assert float(m.alpha) == float(n.alpha), (c, p, m.alpha, n.alpha)
        assert m.down.shape == n.down.shape and m.up.shape == n.up.shape, (c, p)
        if exact:
            assert m.down.dtype == n.down.dtype, (c, p, m.down.dtype, n.down.dtype)
            assert np.array_equal(m.down, n.down) and np.array_equal(m.up, n.up), (c, p)
        else:
            np.testing.assert_allclose(m.down.astype(np.float32), n.down.astype(np.float32), atol=atol)
            np.testing.assert_allclose(m.up.astype(np.float32), n.up.astype(np.float32), atol=atol)


def fake_model_folder(base: BaseModelInfo, folder) -> str:
    """A diffusers-layout folder whose configs and weight headers describe ``base`` (zero weights, fp16)."""
    import json
    import os

    from safetensors.numpy import save_file

    folder = str(folder)
    xl = "text_encoder_2" in base.modules
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}
    if xl:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    for comp, mods in base.modules.items():
        sub = os.path.join(folder, comp)
        os.makedirs(sub, exist_ok=True)
        if comp == "unet":
            cross = mods["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"][1]
            config = {"layers_per_block": base.base_config.get("layers_per_block"), "cross_attention_dim": cross}
            name = "diffusion_pytorch_model.safetensors"
        else:
            config = {"hidden_size": mods["text_model.encoder.layers.0.self_attn.q_proj"][1]}
            name = "model.safetensors"
        with open(os.path.join(sub, "config.json"), "w") as f:
            json.dump(config, f)
        save_file({f"{p}.weight": np.zeros(s, np.float16) for p, s in mods.items()}, os.path.join(sub, name))
    return folder


@pytest.fixture(scope="session")
def sd_fakes():
    """The fake SD base models and LoRA states above, as attributes (``tiny_sd1``/``tiny_sdxl``: the ``*_info``
    functions, base-model infos of the tiny folders, not the folders)."""
    return SimpleNamespace(unet_modules=unet_modules, clip_modules=clip_modules, tiny_sd1=tiny_sd1_info,
                           tiny_sdxl=tiny_sdxl_info, real_sdxl_unet=real_sdxl_unet, real_sd1_unet=real_sd1_unet,
                           kohya_targets=kohya_targets, random_state=random_state,
                           assert_states_equal=assert_states_equal, fake_model_folder=fake_model_folder)
