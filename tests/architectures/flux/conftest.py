"""Shared by the FLUX format tests (the ``flux_keys`` and ``flux_installed`` fixtures): a tiny torch
``FluxTransformer2DModel`` (module names and shapes as in mindone 0.5.0 and the full model, widths tiny) and random
LoRA states on its modules."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.state import LoraModule, LoraState

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
HIDDEN = 16  # heads × head dim
N_LINEAR = 8 + 2 * 14 + 2 * 6 + 2  # embedders, 2 double blocks, 2 single blocks, norm_out.linear/proj_out


def tiny_transformer(seed: int = 0):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**TINY).eval()
    return model


def linear_shapes(model) -> dict[str, tuple[int, ...]]:
    import torch

    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def flux_base(shapes: dict) -> BaseModelInfo:
    return BaseModelInfo("flux", {}, {"transformer": dict(shapes)}, source="<tiny flux>")


def random_state(shapes: dict, seed: int = 0, paths=None, ranks=(1, 2, 3), alphas=(1.0, 2.0, 4.0, 8.0)) -> LoraState:
    """Random plain-LoRA modules (random rank, alpha and non-zero up) on ``paths`` (default: every Linear)."""
    rng = np.random.default_rng(seed)
    state = LoraState(architecture="flux")
    for path in sorted(paths if paths is not None else shapes):
        out, inp = shapes[path]
        r = int(rng.choice(ranks))
        state.add("transformer", path, LoraModule(rng.standard_normal((r, inp)).astype(np.float32) * 0.3,
                                                  rng.standard_normal((out, r)).astype(np.float32) * 0.3,
                                                  float(rng.choice(alphas))))
    return state


def assert_same_deltas(got: LoraState, want: LoraState, atol=1e-6):
    assert sorted((c, p) for c, p, _ in got.modules()) == sorted((c, p) for c, p, _ in want.modules())
    for comp, path, mod in want.modules():
        np.testing.assert_allclose(got.components[comp][path].delta(), mod.delta(), atol=atol, rtol=1e-6,
                                   err_msg=f"{comp}.{path}")


def _stand_in():
    from mindone_lora_plugin.architectures import Architecture, Component
    from mindone_lora_plugin.architectures.flux.files import FluxLoraFiles

    class FormatsFlux(FluxLoraFiles, Architecture):
        description = "FLUX.1 (the format tests' stand-in while no FLUX family is installed)"
        components = (Component("transformer", "mindone.diffusers:FluxTransformer2DModel", "lora_unet"),
                      Component("text_encoder", "mindone.transformers:CLIPTextModel", "lora_te1", kind="text_encoder"),
                      Component("text_encoder_2", "mindone.transformers:T5EncoderModel", "lora_te3",
                                kind="text_encoder"))
        denoiser = "transformer"

    return FormatsFlux()


@pytest.fixture(scope="module")
def flux_installed():
    """The FLUX.1 architecture in the process-wide plugin manager: the installed one, else a stand-in made of the
    file side (:class:`~mindone_lora_plugin.architectures.flux.files.FluxLoraFiles`) alone."""
    from mindone_lora_plugin.hookspecs import hookimpl
    from mindone_lora_plugin.plugins import get_plugin_manager, reset_plugin_manager

    if "flux" in get_plugin_manager().architectures():
        yield get_plugin_manager().architectures()["flux"]
        return
    arch = _stand_in()

    class Plugin:
        @hookimpl
        def mindone_lora_architectures(self):
            yield arch

    reset_plugin_manager()
    get_plugin_manager().register_plugin(Plugin(), name="flux_formats_test")
    yield arch
    reset_plugin_manager()


@pytest.fixture(scope="session")
def flux_keys():
    """The helpers and constants above, as attributes."""
    return SimpleNamespace(TINY=TINY, HIDDEN=HIDDEN, N_LINEAR=N_LINEAR, tiny_transformer=tiny_transformer,
                           linear_shapes=linear_shapes, flux_base=flux_base, random_state=random_state,
                           assert_same_deltas=assert_same_deltas)
