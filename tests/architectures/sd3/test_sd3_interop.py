"""SD3 files against Hugging Face diffusers 0.39 + peft (torch), on the tiny SD3.5 folder (dual attention, q/k norms):

* ours → theirs: a LoRA on every Linear of the joint blocks and of both CLIPs (random non-zero weights, alpha ≠ rank)
  is written in the diffusers layout; ``StableDiffusion3Pipeline.load_lora_weights`` must inject every pair, and the
  transformer and text-encoder outputs must equal mindone's (≤ 1e-4). diffusers 0.39 has no converter for sd-scripts'
  SD3 names, so the kohya file is checked against the diffusers file on our side (same deltas) and its names against
  the original MMDiT's modules (what sd-scripts and ComfyUI's ``lora_unet_`` key map name);
* theirs → ours: peft adapters diffusers adds (per-module ranks/alphas in the adapter metadata) saved with
  ``save_lora_weights`` load here with every pair injected and the same outputs.
Each output must move by more than 100× the tolerance when the LoRA is loaded, so a LoRA that does nothing fails.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

pytestmark = pytest.mark.interop
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TOL = 1e-4
STD = 0.15
IDS = [[0, 5, 9, 12, 20, 33, 47, 1]]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                       "norm1_context.linear"]
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffusers.utils import logging as hf_logging

    from mindone_lora_plugin.architectures.sd3.tiny import ensure_tiny_model
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return ensure_tiny_model("3.5", str(tmp_path_factory.mktemp("sd3") / "tiny-sd3"))


@pytest.fixture
def pm(plugin_manager):
    return plugin_manager


def fixed_inputs(width: int, pooled: int):
    rng = np.random.default_rng(5)
    return (rng.standard_normal((1, 16, 16, 16)).astype(np.float32), rng.standard_normal((1, 6, width)).astype(
        np.float32), rng.standard_normal((1, pooled)).astype(np.float32))


def mindone_outputs(models) -> dict[str, np.ndarray]:
    import mindspore as ms

    cfg = models["transformer"].config
    x, text, pooled = fixed_inputs(cfg.joint_attention_dim, cfg.pooled_projection_dim)
    out = {"transformer": models["transformer"](ms.Tensor(x), ms.Tensor(text), ms.Tensor(pooled),
                                                ms.Tensor([500.0], ms.float32), return_dict=False)[0].asnumpy()}
    for comp in COMPONENTS[1:]:
        res = models[comp](ms.Tensor(np.array(IDS, np.int32)), output_hidden_states=True, return_dict=False)
        out[comp] = res[0].asnumpy()
        out[comp + ".hidden"] = res[2][-2].asnumpy()
    return out


def torch_outputs(pipe) -> dict[str, np.ndarray]:
    cfg = pipe.transformer.config
    x, text, pooled = fixed_inputs(cfg.joint_attention_dim, cfg.pooled_projection_dim)
    with torch.no_grad():
        out = {"transformer": pipe.transformer(torch.from_numpy(x), torch.from_numpy(text), torch.from_numpy(pooled),
                                               torch.tensor([500.0]), return_dict=False)[0].numpy()}
        for comp in COMPONENTS[1:]:
            res = getattr(pipe, comp)(torch.tensor(IDS), output_hidden_states=True)
            out[comp] = res.text_embeds.numpy()
            out[comp + ".hidden"] = res.hidden_states[-2].numpy()
    return out


def assert_match(got, want, base, what):
    for key in want:
        moved = float(np.abs(want[key] - base[key]).max())
        assert moved > 100 * TOL, f"{what}: the LoRA does not change {key} ({moved:.1e}); the check is void"
        diff = float(np.abs(got[key] - want[key]).max())
        assert diff <= TOL, f"{what}: {key} differs by {diff:.2e}"


def mindone_counts(models) -> Counter:
    from mindone_lora_plugin.models import ADAPTER, lora_layers

    return Counter({c: n for c, cell in models.items()
                    if (n := sum(ADAPTER in layer.lora_A for _, layer in lora_layers(cell)))})


def torch_counts(pipe, adapter) -> Counter:
    from peft.tuners.lora import LoraLayer

    return Counter({c: n for c in COMPONENTS if (n := sum(
        isinstance(m, LoraLayer) and adapter in m.lora_A for m in getattr(pipe, c).modules()))})


def torch_pipeline(folder):
    return diffusers.StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32)


def test_diffusers_loads_our_files_with_every_pair_and_equal_outputs(folder, pm, tmp_path):
    import mindspore as ms

    from mindone_lora_plugin.formats.reader import read_lora
    from mindone_lora_plugin.models import ADAPTER, load_models, lora_layers
    from mindone_lora_plugin.options import LoraOptions

    options = LoraOptions(strategy="sd3", architecture="sd3", rank=4, alpha=2, targets="all-linear",
                          extra={"train_text_encoder": True})
    models = load_models(folder)
    pm.add_adapters(models, options)
    ours = mindone_counts(models)
    assert set(ours) == set(COMPONENTS) and ours["transformer"] == 29, ours
    rng = np.random.default_rng(0)
    for comp in models:
        for _, layer in lora_layers(models[comp]):
            for w in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight):
                w.set_data(ms.Tensor((STD * rng.standard_normal(w.shape)).astype(np.float32)))
    want = mindone_outputs(models)
    diffusers_file, kohya_file = pm.save_weights(models, options, str(tmp_path), ["diffusers", "kohya"], "ours")

    pipe = torch_pipeline(folder)
    base = torch_outputs(pipe)
    pipe.load_lora_weights(str(tmp_path), weight_name=os.path.basename(diffusers_file), adapter_name="ours")
    assert torch_counts(pipe, "ours") == ours, "not every LoRA pair was injected"
    assert_match(torch_outputs(pipe), want, base, "diffusers layout in diffusers")

    a, b = read_lora(diffusers_file), read_lora(kohya_file)
    assert a.architecture == b.architecture == "sd3"
    assert {(c, p) for c, p, _ in a.modules()} == {(c, p) for c, p, _ in b.modules()}
    for comp, path, mod in a.modules():
        np.testing.assert_allclose(b.components[comp][path].delta(), mod.delta(), atol=1e-6)


def test_kohya_names_are_the_original_models_modules(folder, pm, tmp_path):
    """Every transformer module of the kohya file is a Linear of the original MMDiT model (sd-scripts' names), with
    q/k/v fused: its ``lora_up`` rows are the fused ``qkv``'s."""
    from mindone_lora_plugin import safetensors_io
    from mindone_lora_plugin.models import load_models
    from mindone_lora_plugin.options import LoraOptions

    options = LoraOptions(strategy="sd3", architecture="sd3", rank=4, alpha=4, targets="all-linear")
    models = load_models(folder)
    pm.add_adapters(models, options)
    (path,) = pm.save_weights(models, options, str(tmp_path), ["kohya"], "names")
    tensors, meta = safetensors_io.load(path)
    names = {k.split(".")[0] for k in tensors}
    block = ("x_block_attn_qkv", "x_block_attn_proj", "x_block_attn2_qkv", "x_block_attn2_proj", "x_block_mlp_fc1",
             "x_block_mlp_fc2", "x_block_adaLN_modulation_1", "context_block_attn_qkv", "context_block_attn_proj",
             "context_block_mlp_fc1", "context_block_mlp_fc2", "context_block_adaLN_modulation_1")
    last = ("x_block_attn_qkv", "x_block_attn_proj", "x_block_mlp_fc1", "x_block_mlp_fc2",
            "x_block_adaLN_modulation_1", "context_block_attn_qkv", "context_block_adaLN_modulation_1")
    assert names == {f"lora_unet_joint_blocks_0_{n}" for n in block} | {f"lora_unet_joint_blocks_1_{n}" for n in last}
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (96, 12)
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["ss_base_model_version"] == "sd3"
    assert meta["modelspec.architecture"] == "stable-diffusion-3.5-medium/lora"


def test_we_load_diffusers_files_with_every_pair_and_equal_outputs(folder, pm, tmp_path):
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    from mindone_lora_plugin.models import load_models
    from mindone_lora_plugin.options import LoraOptions

    pipe = torch_pipeline(folder)
    base = torch_outputs(pipe)
    configs = {"transformer": LoraConfig(r=4, lora_alpha=8, target_modules=TRANSFORMER_TARGETS,
                                         rank_pattern={"to_k": 3}, alpha_pattern={"ff.net.2": 5}),
               "text_encoder": LoraConfig(r=4, lora_alpha=2, target_modules=TE_TARGETS, rank_pattern={"fc1": 2}),
               "text_encoder_2": LoraConfig(r=2, lora_alpha=3, target_modules=TE_TARGETS)}
    gen = torch.Generator().manual_seed(7)
    kwargs = {}
    for comp, config in configs.items():
        model = getattr(pipe, comp)
        model.add_adapter(config) if comp == "transformer" else model.add_adapter(config, adapter_name="default")
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoraLayer):
                    for w in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                        w.copy_(STD * torch.randn(w.shape, generator=gen))
        kwargs[f"{comp}_lora_layers"] = get_peft_model_state_dict(model)
        kwargs[f"{comp}_lora_adapter_metadata"] = config.to_dict()
    want, theirs = torch_outputs(pipe), torch_counts(pipe, "default")
    type(pipe).save_lora_weights(str(tmp_path), weight_name="theirs.safetensors", **kwargs)

    models = load_models(folder)
    pm.load_weights(models, LoraOptions(strategy="sd3"), str(tmp_path / "theirs.safetensors"))
    assert mindone_counts(models) == theirs, "not every LoRA pair was injected"
    assert_match(mindone_outputs(models), want, base, "diffusers' file here")
