"""Model outputs with a LoRA active agree between this package (mindone, MindSpore PyNative on the CPU backend) and
Hugging Face diffusers 0.39 / peft (torch), in both directions, on the tiny SD1.x and SDXL model folders.

* Ours → theirs: for every preset (``attn``, ``kohya``, ``kohya-conv``) with alpha ≠ rank (and a third rank/alpha
  for 3×3 convs), text encoders included, the package writes both formats from mindone models with random non-zero
  LoRA weights. ``pipe.load_lora_weights`` loads each file into the same model folder opened with diffusers; every
  LoRA pair in the file must be injected, and the UNet and text-encoder outputs must match mindone's.
* Theirs → ours: peft adapters added by diffusers (mixed module kinds, per-module ranks/alphas through
  ``rank_pattern``/``alpha_pattern``, alpha ≠ r) are saved with ``save_lora_weights`` and the adapter metadata; also
  once the classic way (``convert_state_dict_to_diffusers``, mixed ``.lora.down``/``lora_A``/``lora_linear_layer`` keys,
  no metadata, so alpha = r as everyone reads it). ``pm.load_weights`` loads them into mindone models; the outputs
  must match the torch models that were saved.

kohya files: diffusers' kohya converter gets attention modules wrong only when their alpha is not the file's most common
one (reference §0.4; seen here: one attention module's alpha changed from 2 to 2.2 in a kohya file gives diffusers the
same outputs as before, the changed alpha is dropped). With ``kohya-conv`` here the attention and Linear modules all
carry ``alpha`` (the most common value) and only the 3×3 convs carry ``conv_alpha``, which diffusers puts into
``alpha_pattern`` correctly, so the kohya files match exactly too, with conv_alpha ≠ alpha ≠ rank.

Outputs compared (max abs difference ≤ 1e-4; their magnitudes are O(1)): the UNet output for fixed latents, an
integer timestep and fixed encoder hidden states (+ SDXL ``text_embeds``/``time_ids``), and for each text encoder
every hidden state (so the last layer's LoRA counts too) and its first output (``last_hidden_state``, or SDXL
encoder 2's projected ``text_embeds``). Each output must also move by more than 100× the tolerance when the LoRA is
loaded, so an adapter that does nothing cannot pass. torch runs in the same process as MindSpore.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("torch_runtime")]

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("mindspore")


# kohya prefixes of the components (SD1's lora_te and SDXL's lora_te1 are both ``text_encoder``)
KOHYA_PREFIX = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                "lora_te2": "text_encoder_2"}
DOWN_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight", ".lora_down.weight")

# what diffusers/peft adapt in the reverse tests: every module kind the presets reach
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


# ------------------------------------------------------------------------------------------------ set-up and inputs


@pytest.fixture
def pm(plugin_manager):
    return plugin_manager


def tiny(request, arch: str) -> str:
    return request.getfixturevalue(f"tiny_{arch}")


# ------------------------------------------------------------------------------------------------ counting and checks


def file_module_counts(path: str) -> Counter:
    """Component → number of LoRA modules (down/A tensors) in a safetensors file, read without this package."""
    from safetensors import safe_open

    counts = Counter()
    with safe_open(path, framework="numpy") as f:
        for key in f.keys():
            if not key.endswith(DOWN_SUFFIXES):
                continue
            head = key.split(".", 1)[0]
            if head.startswith("lora_"):
                comp = next(c for p, c in sorted(KOHYA_PREFIX.items(), key=lambda i: -len(i[0]))
                            if head.startswith(p + "_"))
            else:
                comp = head
            counts[comp] += 1
    return counts


def torch_lora_counts(pipe, adapter: str, interop) -> Counter:
    from peft.tuners.lora import LoraLayer

    return Counter({c: n for c, m in interop.torch_components(pipe).items()
                    if (n := sum(isinstance(s, LoraLayer) and adapter in s.lora_A for s in m.modules()))})


def mindone_lora_counts(models) -> Counter:
    from mindone_lora_plugin.models import ADAPTER, lora_layers

    return Counter({c: n for c, cell in models.items()
                    if (n := sum(ADAPTER in layer.lora_A for _, layer in lora_layers(cell)))})


# ------------------------------------------------------------------------------------------------ ours → diffusers


def randomize_mindone_lora(models, seed: int, interop) -> None:
    """Random non-zero A and B for every LoRA layer (B starts at zero, which would hide any scale error)."""
    import mindspore as ms

    from mindone_lora_plugin.models import ADAPTER, lora_layers

    rng = np.random.default_rng(seed)
    for comp in models:
        for _, layer in lora_layers(models[comp]):
            for w in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight):
                w.set_data(ms.Tensor((interop.STD * rng.standard_normal(w.shape)).astype(np.float32)))


@pytest.mark.parametrize("preset", ["attn", "kohya", "kohya-conv"])
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_loads_our_files_with_matching_outputs(request, tmp_path, pm, arch, preset, interop):
    from mindone_lora_plugin.models import load_models
    from mindone_lora_plugin.options import LoraOptions

    folder = tiny(request, arch)
    options = LoraOptions(strategy="sdxl" if arch == "sdxl" else "unet", rank=4, alpha=2, targets=preset,
                          conv_rank=2, conv_alpha=3, extra={"train_text_encoder": True})
    models = load_models(folder)
    pm.add_adapters(models, options)
    ours = mindone_lora_counts(models)
    assert set(ours) == {"unet", *(c for c in interop.TEXT_ENCODERS if c in models)}, ours
    randomize_mindone_lora(models, seed=len(preset), interop=interop)
    want = interop.mindone_outputs(models)
    files = pm.save_weights(models, options, str(tmp_path), ["diffusers", "kohya"], f"ours-{arch}-{preset}")
    assert len(files) == 2

    for path in files:
        what = f"{arch}/{preset}/{os.path.basename(path)}"
        assert file_module_counts(path) == ours, what
        pipe = interop.torch_pipeline(arch, folder)
        base = interop.torch_outputs(pipe)
        pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name="ours")
        assert torch_lora_counts(pipe, "ours", interop) == ours, f"{what}: not every LoRA pair was injected"
        interop.assert_outputs_match(interop.torch_outputs(pipe), want, base, what)


# ------------------------------------------------------------------------------------------------ diffusers → ours


def add_peft_adapters(pipe, classic: bool, interop) -> dict:
    """peft adapters on every component (random weights); return the LoraConfig per component."""
    from peft import LoraConfig

    if classic:  # what diffusers' training examples did: alpha = r, nothing else to read from the file
        configs = {"unet": LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS),
                   "te": LoraConfig(r=4, lora_alpha=4, target_modules=TE_TARGETS)}
    else:  # alpha ≠ r, and per-module ranks/alphas that only the adapter metadata carries
        configs = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS,
                                      rank_pattern={"conv1": 2, "to_k": 3}, alpha_pattern={"conv1": 3, "ff.net.2": 5}),
                   "te": LoraConfig(r=4, lora_alpha=2, target_modules=TE_TARGETS,
                                    rank_pattern={"fc1": 2}, alpha_pattern={"q_proj": 6})}
    out = {}
    for comp, model in interop.torch_components(pipe).items():
        config = configs["unet" if comp == "unet" else "te"]
        if comp == "unet":
            model.add_adapter(config)
        else:
            model.add_adapter(config, adapter_name="default")
        out[comp] = config
    gen = torch.Generator().manual_seed(7)
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for model in interop.torch_components(pipe).values():
            for m in model.modules():
                if isinstance(m, LoraLayer):
                    for w in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                        w.copy_(interop.STD * torch.randn(w.shape, generator=gen))
    return out


@pytest.mark.parametrize("classic", [False, True], ids=["peft-with-metadata", "classic-no-metadata"])
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_we_load_diffusers_files_with_matching_outputs(request, tmp_path, pm, arch, classic, interop):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from mindone_lora_plugin.models import load_models
    from mindone_lora_plugin.options import LoraOptions

    folder = tiny(request, arch)
    pipe = interop.torch_pipeline(arch, folder)
    base = interop.torch_outputs(pipe)
    configs = add_peft_adapters(pipe, classic, interop)
    want = interop.torch_outputs(pipe)
    theirs = torch_lora_counts(pipe, "default", interop)
    kwargs = {}
    for comp, model in interop.torch_components(pipe).items():
        layers = get_peft_model_state_dict(model)
        kwargs[f"{comp}_lora_layers"] = convert_state_dict_to_diffusers(layers) if classic else layers
        if not classic:
            kwargs[f"{comp}_lora_adapter_metadata"] = configs[comp].to_dict()
    type(pipe).save_lora_weights(str(tmp_path), weight_name="theirs.safetensors", **kwargs)
    path = str(tmp_path / "theirs.safetensors")
    what = f"{arch}/{'classic' if classic else 'peft+metadata'}"
    assert file_module_counts(path) == theirs, what
    if classic:  # the key styles this case is about
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
        for marker in (".lora.down.weight", ".lora_A.weight", ".lora_linear_layer.down.weight"):
            assert any(k.endswith(marker) for k in keys), (what, marker)

    models = load_models(folder)
    pm.load_weights(models, LoraOptions(strategy="sdxl" if arch == "sdxl" else "unet"), path)
    assert mindone_lora_counts(models) == theirs, f"{what}: not every LoRA pair was injected"
    interop.assert_outputs_match(interop.mindone_outputs(models), want, base, what)
