"""FLUX.1 files against Hugging Face diffusers 0.39 + peft (torch): files written here load there with every pair
injected and give the transformer outputs of this package's weight changes (<= 1e-4); files diffusers/peft write load
here exactly. mindone 0.5.0's ``FluxPipeline.load_lora_weights`` injects every pair of both layouts with exact scales.

Two limits of diffusers 0.39's (and mindone 0.5.0's) kohya FLUX converter (``_convert_kohya_flux_lora_to_diffusers``)
shape these tests: it splits ``single_blocks.N.linear1`` with the full model's widths written into it (3 × 3072 + 12288
rows), so on the tiny model the single blocks' q/k/v/proj_mlp are checked with full-width tensors through the converter
alone; and it returns the embedder and final-layer modules (``img_in``, ``time_in``, ``final_layer`` ...) without the
``transformer.`` prefix, so ``load_lora_weights`` drops them without a word — they are checked on the converter's output
(including its shift/scale swap of ``final_layer.adaLN_modulation.1``; it also ignores the final layer's alphas).
"""

import copy

import numpy as np
import pytest

from mindone_lora_plugin import safetensors_io
from mindone_lora_plugin.formats.diffusers import DiffusersFormat
from mindone_lora_plugin.formats.kohya import KohyaFormat
from mindone_lora_plugin.formats.reader import open_lora, read_lora
from mindone_lora_plugin.state import LoraModule, LoraState

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("flux_installed")]
torch = pytest.importorskip("torch")
pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

OUTSIDE_BLOCKS = ("x_embedder", "context_embedder", "time_text_embed.", "norm_out.linear", "proj_out")


def _linear1_part(path):
    return path.startswith("single_transformer_blocks.") and (".attn." in path or path.endswith("proj_mlp"))


@pytest.fixture(scope="module")
def base_model(flux_keys):
    tiny_transformer = flux_keys.tiny_transformer
    return tiny_transformer(seed=1)


@pytest.fixture(scope="module")
def shapes(base_model, flux_keys):
    linear_shapes = flux_keys.linear_shapes
    return linear_shapes(base_model)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), return_dict=False)


def merged_output(model, state: LoraState):
    """The transformer's output with every delta of ``state`` added to its weights (this package's maths)."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for _, path, mod in state.modules():
            mods[path].weight += torch.from_numpy(mod.delta().astype(np.float32))
        return ref(**inputs())[0]


def pipeline(model):
    return diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=model)


def injected(model, adapter):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and adapter in m.lora_A}


def test_kohya_file_loads_in_diffusers_with_the_same_outputs(tmp_path, base_model, shapes, flux_keys):
    # kohya's default targets (every Linear of the double and single blocks) minus linear1 (see the module docstring)
    random_state = flux_keys.random_state
    paths = [p for p in shapes if not p.startswith(OUTSIDE_BLOCKS) and not _linear1_part(p)]
    # one rank (as kohya trains): diffusers gives every converted module lora_alpha = the first module's rank, so
    # a kohya file whose ranks differ gets wrong scales there (ComfyUI and kohya read alpha / rank per module)
    state = random_state(shapes, seed=11, paths=paths, ranks=(2,))
    path = KohyaFormat().write(state, str(tmp_path / "flux_kohya.safetensors"))
    names = {k.split(".")[0] for k in safetensors_io.read_header(path)[0] if k != "__metadata__"}
    assert "lora_unet_double_blocks_1_img_attn_qkv" in names and "lora_unet_double_blocks_0_txt_attn_qkv" in names
    model = copy.deepcopy(base_model)
    pipeline(model).load_lora_weights(path, adapter_name="k")
    layers = injected(model, "k")
    assert sorted(layers) == sorted(paths)  # every pair injected, each on its module
    with torch.no_grad():
        got = model(**inputs())[0]
    want = merged_output(base_model, state)
    assert float((got - want).abs().max()) <= 1e-4
    with torch.no_grad():
        assert float((want - base_model(**inputs())[0]).abs().max()) > 1e-2  # the LoRA does change the output


def test_diffusers_file_loads_in_diffusers_exactly(tmp_path, base_model, shapes, flux_keys):
    random_state = flux_keys.random_state
    state = random_state(shapes, seed=12)  # every Linear, alphas and ranks varying
    path = DiffusersFormat().write(state, str(tmp_path / "d"))
    model = copy.deepcopy(base_model)
    pipeline(model).load_lora_weights(path, adapter_name="d")
    layers = injected(model, "d")
    assert sorted(layers) == sorted(shapes)
    for _, p, mod in state.modules():
        layer = layers[p]
        assert np.array_equal(layer.lora_A["d"].weight.detach().numpy(), mod.down), p
        assert np.array_equal(layer.lora_B["d"].weight.detach().numpy(), mod.up), p
        assert layer.scaling["d"] == pytest.approx(mod.scale, rel=1e-9), p  # top proj_out vs single proj_out too
    with torch.no_grad():
        got = model(**inputs())[0]
    assert float((got - merged_output(base_model, state)).abs().max()) <= 1e-4


def test_files_made_by_diffusers_and_peft_read_exactly(tmp_path, base_model, shapes, flux_keys):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    assert_same_deltas, flux_base = flux_keys.assert_same_deltas, flux_keys.flux_base

    model = copy.deepcopy(base_model)
    targets = sorted(shapes)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                        rank_pattern={"^proj_out": 2, "transformer_blocks.0.attn.to_q": 3},
                        alpha_pattern={"single_transformer_blocks.1.proj_mlp": 1})
    model.add_adapter(config, adapter_name="default")
    torch.manual_seed(5)
    with torch.no_grad():
        for layer in injected(model, "default").values():
            layer.lora_B["default"].weight.normal_()
    layers = injected(model, "default")
    want = {p: (m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]).detach().numpy()
            for p, m in layers.items()}
    meta = config.to_dict()
    meta["target_modules"] = targets
    diffusers.FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(model),
                                             transformer_lora_adapter_metadata=meta)
    lf = open_lora(str(tmp_path))
    assert lf.format.name == "diffusers" and lf.state.architecture == "flux"
    got = lf.state.components["transformer"]
    assert sorted(got) == sorted(want)
    for p, delta in want.items():
        np.testing.assert_allclose(got[p].delta(), delta, atol=1e-6, err_msg=p)
    assert got["proj_out"].rank == 2 and got["single_transformer_blocks.0.proj_out"].rank == 4
    assert_same_deltas(read_lora(str(tmp_path), base=flux_base(shapes)), lf.state)
    # and its kohya conversion keeps every delta
    k = KohyaFormat().write(lf.state, str(tmp_path / "k.safetensors"))
    assert_same_deltas(read_lora(k), lf.state, atol=1e-5)


def _converted(path):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from safetensors.torch import load_file

    sd = _convert_kohya_flux_lora_to_diffusers(load_file(path))
    return {k.removeprefix("transformer.").rsplit(".lora_", 1)[0]: None for k in sd}, sd


def _delta(sd, path):
    pre = f"transformer.{path}" if f"transformer.{path}.lora_A.weight" in sd else path
    return (sd[f"{pre}.lora_B.weight"] @ sd[f"{pre}.lora_A.weight"]).double().numpy()  # scale folded in


def test_diffusers_converter_agrees_on_embedders_and_final_layer(tmp_path, shapes, flux_keys):
    random_state = flux_keys.random_state
    paths = [p for p in shapes if p.startswith(OUTSIDE_BLOCKS)]
    state = random_state(shapes, seed=13, paths=paths)
    names, sd = _converted(KohyaFormat().write(state, str(tmp_path / "outside.safetensors")))
    assert sorted(names) == sorted(paths)
    for _, p, mod in state.modules():
        # diffusers 0.39 leaves the final layer's alpha out (its converter's "TODO: alphas"): compare up @ down there
        want = mod.delta() / mod.scale if p in ("norm_out.linear", "proj_out") else mod.delta()
        np.testing.assert_allclose(_delta(sd, p), want, atol=1e-5, err_msg=p)


@pytest.mark.parametrize("layout", ["split parts (block-diagonal)", "kohya-trained (dense)"])
def test_diffusers_converter_agrees_on_full_width_linear1(tmp_path, layout):
    hidden, rng = 3072, np.random.default_rng(14)
    parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    sizes = (hidden, hidden, hidden, 4 * hidden)
    if layout.startswith("split"):
        state = LoraState(architecture="flux")
        for name, rows in zip(parts, sizes):
            state.add("transformer", f"single_transformer_blocks.0.{name}",
                      LoraModule(rng.standard_normal((2, hidden)).astype(np.float32) * 0.1,
                                 rng.standard_normal((rows, 2)).astype(np.float32) * 0.1, 4.0))
        path = KohyaFormat().write(state, str(tmp_path / "l1.safetensors"))
    else:
        path = str(tmp_path / "l1.safetensors")
        safetensors_io.save({"lora_unet_single_blocks_0_linear1.lora_down.weight":
                             rng.standard_normal((4, hidden)).astype(np.float32) * 0.1,
                             "lora_unet_single_blocks_0_linear1.lora_up.weight":
                             rng.standard_normal((sum(sizes), 4)).astype(np.float32) * 0.1,
                             "lora_unet_single_blocks_0_linear1.alpha": np.asarray(1.0, np.float32)}, path, {})
        state = read_lora(path)
    header = safetensors_io.read_header(path)[0]
    assert header["lora_unet_single_blocks_0_linear1.lora_up.weight"]["shape"][0] == sum(sizes)
    _, sd = _converted(path)
    probe = rng.standard_normal((hidden, 3))  # compare delta @ probe through the factors: no 12288 × 3072 matrices
    for name in parts:
        p = f"single_transformer_blocks.0.{name}"
        mod = state.components["transformer"][p]
        a, b = (sd[f"transformer.{p}.lora_{x}.weight"].double().numpy() for x in "AB")
        np.testing.assert_allclose(b @ (a @ probe), mod.up.astype(np.float64) @ (mod.down @ probe) * mod.scale,
                                   atol=1e-6, err_msg=p)


def test_mindone_loads_both_layouts_with_every_pair_and_scale(tmp_path, flux_keys):
    """mindone 0.5.0's ``FluxPipeline.load_lora_weights`` (MindSpore, injection only: no forward pass on CPU here)."""
    TINY, random_state = flux_keys.TINY, flux_keys.random_state
    pytest.importorskip("mindspore")
    from mindone.diffusers import FluxPipeline as MsFluxPipeline, FluxTransformer2DModel as MsFlux


    for fmt in (DiffusersFormat(), KohyaFormat()):
        model = MsFlux(**TINY)
        cells = dict(model.cells_and_names())
        shapes = {n: tuple(c.weight.shape) for n, c in cells.items() if type(c).__name__ in ("Dense", "Linear")}
        if fmt.name == "kohya":  # mindone's converter has diffusers' two limits (module docstring)
            paths = [p for p in shapes if not p.startswith(OUTSIDE_BLOCKS) and not _linear1_part(p)]
            state = random_state(shapes, seed=21, paths=paths, ranks=(2,))
        else:  # every module, ranks and alphas varying
            state = random_state(shapes, seed=22)
        path = fmt.write(state, str(tmp_path / fmt.name))
        MsFluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                       tokenizer_2=None, transformer=model).load_lora_weights(path, adapter_name="x")
        cells = dict(model.cells_and_names())  # the adapted cells replaced the Dense ones
        missing, wrong = [], []
        for _, p, mod in state.modules():
            cell = cells[p]
            if not hasattr(cell, "lora_A") or "x" not in cell.lora_A:
                missing.append(p)
                continue
            delta = cell.lora_B["x"].weight.asnumpy() @ cell.lora_A["x"].weight.asnumpy() * cell.scaling["x"]
            if not np.allclose(delta, mod.delta(), atol=1e-5):
                wrong.append(p)
        assert not missing and not wrong, (fmt.name, missing[:3], wrong[:3])
