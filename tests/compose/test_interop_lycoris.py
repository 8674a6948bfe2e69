"""LoHa and LoKr agree with LyCORIS (``lycoris-lora`` on torch), both directions, on the tiny SD1.x model.

* Ours → LyCORIS: mindone models get LoHa/LoKr adapters (``kohya-conv`` preset: attention, Linear, 1×1 and 3×3
  convs; text encoder too) with random non-zero factors; the kohya file written from them is loaded by
  ``lycoris.kohya.create_network_from_weights`` into the same model folder opened with diffusers. LyCORIS skips names
  it cannot place silently, so the modules it built are counted against the file's; the UNet and text-encoder
  outputs must equal mindone's (max |diff| ≤ 1e-4).
* LyCORIS → ours: LyCORIS creates a LoHa/LoKr network on the torch models (its defaults), random factors, and saves
  it; ``pm.load_weights`` loads the file into mindone models, whose outputs must equal LyCORIS's forward.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("torch_runtime")]

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
lycoris = pytest.importorskip("lycoris")


ALGOS = ("loha", "lokr")
TARGET_CLASSES = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]


@pytest.fixture
def pm(plugin_manager):
    if not {"loha", "lokr"} <= set(plugin_manager.algorithms()):
        pytest.skip("the mindone-lora-lycoris plugin is not installed")
    return plugin_manager


@pytest.fixture
def kohya_targets():
    """LyCORIS's kohya network restricted to kohya's target classes (its default list also names time_embedding,
    which makes re-creating a network on a diffusers UNet fail with a duplicated name)."""
    from lycoris.kohya import LycorisNetworkKohya as N

    saved = (N.UNET_TARGET_REPLACE_MODULE, N.UNET_TARGET_REPLACE_NAME)
    N.apply_preset({"unet_target_module": TARGET_CLASSES, "unet_target_name": []})
    yield
    N.UNET_TARGET_REPLACE_MODULE, N.UNET_TARGET_REPLACE_NAME = saved


def file_modules(path: str) -> int:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return len({k.split(".", 1)[0] for k in f.keys()})


def randomize(models, seed: int, interop) -> None:
    import mindspore as ms

    from mindone_lora_plugin.models import lora_layers
    from mindone_lora_plugin.strategies.base import algorithm_of_layer

    rng = np.random.default_rng(seed)
    for cell in models.values():
        for _, layer in lora_layers(cell):
            for p in algorithm_of_layer(layer).layer_parameters(layer).values():
                p.set_data(ms.Tensor((interop.STD * rng.standard_normal(p.shape)).astype(np.float32)))


@pytest.mark.parametrize("algo", ALGOS)
def test_lycoris_loads_our_files_with_matching_outputs(tiny_sd1, tmp_path, pm, kohya_targets, algo, interop):
    from lycoris.kohya import create_network_from_weights

    from mindone_lora_plugin.models import load_models, lora_layers
    from mindone_lora_plugin.options import LoraOptions

    options = LoraOptions(strategy="unet", rank=4, alpha=2, targets="kohya-conv", conv_rank=2, conv_alpha=3,
                          algorithm=algo, extra={"train_text_encoder": True})
    models = load_models(tiny_sd1)
    pm.add_adapters(models, options)
    ours = sum(1 for cell in models.values() for _ in lora_layers(cell))
    randomize(models, seed=len(algo), interop=interop)
    want = interop.mindone_outputs(models)
    (path,) = pm.save_weights(models, options, str(tmp_path), ["kohya"], f"ours-{algo}")
    assert file_modules(path) == ours

    pipe = interop.torch_pipeline("sd1", tiny_sd1)
    base = interop.torch_outputs(pipe)
    network, _ = create_network_from_weights(1.0, path, None, pipe.text_encoder, pipe.unet)
    matched = len(network.unet_loras) + len(network.text_encoder_loras)
    assert matched == ours, f"LyCORIS built {matched} of the file's {ours} modules"
    assert {type(m).__name__ for m in network.unet_loras} == {"LohaModule" if algo == "loha" else "LokrModule"}
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    interop.assert_outputs_match(interop.torch_outputs(pipe), want, base, f"ours→LyCORIS {algo}")


@pytest.mark.parametrize("algo", ALGOS)
def test_we_load_lycoris_files_with_matching_outputs(tiny_sd1, tmp_path, pm, kohya_targets, algo, interop):
    from lycoris.kohya import create_network

    from mindone_lora_plugin.models import load_models, lora_layers
    from mindone_lora_plugin.options import LoraOptions

    pipe = interop.torch_pipeline("sd1", tiny_sd1)
    base = interop.torch_outputs(pipe)
    preset = tmp_path / "kohya.toml"  # kohya's target classes (see kohya_targets)
    preset.write_text(f"enable_conv = true\nunet_target_module = {TARGET_CLASSES!r}\nunet_target_name = []\n"
                      "text_encoder_target_module = ['CLIPAttention', 'CLIPMLP']\ntext_encoder_target_name = []\n")
    network = create_network(1.0, 4, 2.0, None, pipe.text_encoder, pipe.unet, algo=algo, conv_dim=2, conv_alpha=3,
                             preset=str(preset))
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(interop.STD * torch.randn(p.shape, generator=gen))
    want = interop.torch_outputs(pipe)
    path = str(tmp_path / f"theirs-{algo}.safetensors")
    network.save_weights(path, torch.float32, {})
    theirs = len(network.unet_loras) + len(network.text_encoder_loras)
    assert theirs == 147  # 117 UNet + 30 text-encoder modules: every kohya-conv target

    models = load_models(tiny_sd1)
    state = pm.load_weights(models, LoraOptions(strategy="unet", algorithm=algo), path)
    assert set(state.algorithms()) == {algo}
    assert sum(1 for cell in models.values() for _ in lora_layers(cell)) == theirs == len(state)
    interop.assert_outputs_match(interop.mindone_outputs(models), want, base, f"LyCORIS→ours {algo}")
