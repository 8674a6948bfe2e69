"""DoRA files agree with peft/diffusers and LyCORIS (torch) on the tiny SD1.x model, both directions.

* peft → ours: peft DoRA adapters (``use_dora=True``) on the torch UNet and text encoder's attention Linears, random
  A/B and magnitudes, saved the diffusers way (``save_lora_weights``); read here and merged into the mindone models
  (``apply_loras``), whose UNet/text-encoder outputs must equal peft's forward (max |diff| ≤ 1e-4).
* ours → diffusers/LyCORIS: a DoRA state built here on the same modules is written as a diffusers file, loaded by
  ``load_lora_weights`` (every ``lora_magnitude_vector`` must be injected: counted), and as a kohya file, loaded by
  ``lycoris.kohya.create_network_from_weights`` (every module matched, each with its ``dora_scale``); both torch
  forwards must equal mindone's.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("torch_runtime")]

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")


UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TE_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
N_ATTN = 68  # attention Linears of the tiny SD1 UNet and text encoder that these names reach


def _targets(path: str, comp: str) -> bool:
    names = UNET_ATTN if comp == "unet" else TE_ATTN
    return any(path == n or path.endswith("." + n) for n in names)


def torch_dora_count(pipe, adapter: str) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) and adapter in m.lora_magnitude_vector
               for comp in (pipe.unet, pipe.text_encoder) for m in comp.modules())


def test_we_load_peft_dora_files_with_matching_outputs(tiny_sd1, tmp_path, interop):
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    from mindone_lora_plugin.compose import apply_loras
    from mindone_lora_plugin.formats.reader import read_lora
    from mindone_lora_plugin.models import load_models

    pipe = interop.torch_pipeline("sd1", tiny_sd1)
    base = interop.torch_outputs(pipe)
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_ATTN, use_dora=True,
                                  rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3}),
               "text_encoder": LoraConfig(r=4, lora_alpha=2, target_modules=TE_ATTN, use_dora=True)}
    pipe.unet.add_adapter(configs["unet"])
    pipe.text_encoder.add_adapter(configs["text_encoder"], adapter_name="default")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for comp in (pipe.unet, pipe.text_encoder):
            for m in comp.modules():
                if isinstance(m, LoraLayer):
                    for w in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                        w.copy_(interop.STD * torch.randn(w.shape, generator=gen))
                    mag = m.lora_magnitude_vector["default"].weight
                    mag.mul_(0.5 + torch.rand(mag.shape, generator=gen))
    want = interop.torch_outputs(pipe)
    theirs = torch_dora_count(pipe, "default")
    assert theirs == N_ATTN
    kwargs = {}
    for comp in ("unet", "text_encoder"):
        kwargs[f"{comp}_lora_layers"] = get_peft_model_state_dict(getattr(pipe, comp))
        kwargs[f"{comp}_lora_adapter_metadata"] = configs[comp].to_dict()
    type(pipe).save_lora_weights(str(tmp_path), weight_name="theirs.safetensors", **kwargs)

    state = read_lora(str(tmp_path / "theirs.safetensors"), base=tiny_sd1)
    assert sum("magnitude" in m.tensors for _, _, m in state.modules()) == theirs == len(state)
    assert set(state.labels()) == {"lora+dora"}
    models = load_models(tiny_sd1)
    apply_loras(models, [state])
    interop.assert_outputs_match(interop.mindone_outputs(models), want, base, "peft DoRA→ours")


def _our_dora_state(models, seed: int, interop):
    """A DoRA state on the attention Linears of the mindone models: random A/B, magnitudes near the base norms."""
    from mindone_lora_plugin.state import LoraModule, LoraState

    rng = np.random.default_rng(seed)
    state = LoraState(architecture="sd1")
    for comp in ("unet", "text_encoder"):
        for path, cell in models[comp].cells_and_names():
            w = getattr(cell, "weight", None)
            if w is None or len(w.shape) != 2 or not _targets(path, comp):
                continue
            w = w.asnumpy().astype(np.float64)
            r = 4
            down = (interop.STD * rng.standard_normal((r, w.shape[1]))).astype(np.float32)
            up = (interop.STD * rng.standard_normal((w.shape[0], r))).astype(np.float32)
            mag = (np.linalg.norm(w, axis=1) * rng.uniform(0.5, 1.5, w.shape[0])).astype(np.float32)
            state.add(comp, path, LoraModule(algorithm="lora", alpha=2.0, settings={"dora_axis": "out"},
                                             tensors={"down": down, "up": up, "magnitude": mag}))
    return state


def test_diffusers_and_lycoris_load_our_dora_files_with_matching_outputs(tiny_sd1, tmp_path, interop):
    from mindone_lora_plugin.compose import apply_loras
    from mindone_lora_plugin.formats.diffusers import DiffusersFormat
    from mindone_lora_plugin.formats.kohya import KohyaFormat
    from mindone_lora_plugin.models import load_models

    models = load_models(tiny_sd1)
    state = _our_dora_state(models, seed=9, interop=interop)
    assert len(state) == N_ATTN
    apply_loras(models, [state])
    want = interop.mindone_outputs(models)

    DiffusersFormat().write(state, str(tmp_path / "d"))
    pipe = interop.torch_pipeline("sd1", tiny_sd1)
    base = interop.torch_outputs(pipe)
    pipe.load_lora_weights(str(tmp_path / "d"), weight_name="pytorch_lora_weights.safetensors", adapter_name="ours")
    assert torch_dora_count(pipe, "ours") == len(state), "not every DoRA magnitude was injected"
    interop.assert_outputs_match(interop.torch_outputs(pipe), want, base, "ours→diffusers DoRA")

    lycoris = pytest.importorskip("lycoris")
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    kpath = KohyaFormat().write(state, str(tmp_path / "k"), output_name="dora")
    saved = (LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE, LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME)
    LycorisNetworkKohya.apply_preset({"unet_target_module": ["Transformer2DModel"], "unet_target_name": []})
    try:
        pipe = interop.torch_pipeline("sd1", tiny_sd1)
        network, _ = create_network_from_weights(1.0, kpath, None, pipe.text_encoder, pipe.unet)
    finally:
        LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE, LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = saved
    loras = list(network.unet_loras) + list(network.text_encoder_loras)
    assert len(loras) == len(state), f"LyCORIS built {len(loras)} of the file's {len(state)} modules"
    assert all(getattr(m, "wd", False) for m in loras), "LyCORIS dropped a dora_scale"
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    assert lycoris is not None
    interop.assert_outputs_match(interop.torch_outputs(pipe), want, base, "ours→LyCORIS DoRA")


@pytest.mark.slow
@pytest.mark.interop
def test_merge_of_our_trained_dora_files_equals_diffusers_and_lycoris(dora_run, tiny_sd1, tmp_path, interop):
    """``mindone-lora merge`` of the run's diffusers file gives diffusers' own merge of it (``load_lora_weights`` +
    ``fuse_lora``), and of its kohya file LyCORIS's forward of it, to 1e-4 (issue #25: the folder merge refused
    every DoRA file)."""
    pytest.importorskip("lycoris")
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    from mindone_lora_plugin import safetensors_io
    from mindone_lora_plugin.cli import main
    from mindone_lora_plugin.formats.reader import read_lora

    straight = dora_run[0]
    TOL, peft_reference, weights_of = interop.TOL, interop.peft_reference, interop.weights_of
    torch_pipeline = interop.torch_pipeline
    (dfile,) = [f for f in straight.files if f.endswith("pytorch_lora_weights.safetensors")]
    (kfile,) = [f for f in straight.files if f.endswith("d.safetensors")]
    base = weights_of(torch_pipeline("sd1", tiny_sd1))
    refs = {dfile: peft_reference("sd1", tiny_sd1, dfile, 1.0)}
    saved = (LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE, LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME)
    LycorisNetworkKohya.apply_preset({"unet_target_module": ["Transformer2DModel"], "unet_target_name": []})
    try:
        pipe = torch_pipeline("sd1", tiny_sd1)
        network, _ = create_network_from_weights(1.0, kfile, None, pipe.text_encoder, pipe.unet)
    finally:
        LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE, LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = saved
    assert len(network.unet_loras) == len(read_lora(kfile)) and all(m.wd for m in network.unet_loras)
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    for m in network.unet_loras:
        m.org_module[0]._lycoris = True
    refs[kfile] = weights_of(pipe)
    for path, ref in refs.items():
        out = str(tmp_path / os.path.splitext(os.path.basename(path))[0])  # a folder: the model is one
        assert main(["merge", "--model", tiny_sd1, "--lora", path, "--out", out]) == 0
        merged, _ = safetensors_io.load(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
        moved = 0.0
        for (comp, key), want in ref.items():
            if comp == "unet":
                got = merged[key].astype(np.float64).reshape(want.shape)
                assert float(np.abs(got - want).max()) <= TOL * max(1.0, float(np.abs(want).max())), (path, key)
                moved = max(moved, float(np.abs(want - base[(comp, key)]).max()))
        assert moved > 10 * TOL, f"training moved the weights by {moved:.1e} only; the check would be void"
