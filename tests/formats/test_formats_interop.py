"""Files written here, loaded by the libraries that consume them: Hugging Face diffusers 0.39 (torch, peft) and
mindone 0.5.0. Each module's weights must land on the right layer with the exact scale alpha / rank.

kohya files with alphas that vary per module are loaded with wrong scales by both libraries' own kohya converters (a
known bug, reference §0.4); for those only the weight placement is checked, and the scales with uniform alphas.
"""

import numpy as np
import pytest

from mindone_lora_plugin.architectures.sd.tiny import SD1_UNET, SDXL_UNET
from mindone_lora_plugin.demo.tiny import CLIP
from mindone_lora_plugin.formats.diffusers import DiffusersFormat
from mindone_lora_plugin.formats.kohya import KohyaFormat

pytestmark = pytest.mark.interop


def check(state, models, get_weight, adapter="x", scales=True):
    wrong, missing = [], []
    for comp, model in models.items():
        for path, m in state.components.get(comp, {}).items():
            layer = model[path]
            if not hasattr(layer, "lora_A") or adapter not in layer.lora_A:
                missing.append(f"{comp}.{path}")
                continue
            ok = (np.array_equal(get_weight(layer.lora_A[adapter]), m.down)
                  and np.array_equal(get_weight(layer.lora_B[adapter]), m.up))
            if scales:
                ok = ok and abs(layer.scaling[adapter] - m.scale) < 1e-9
            if not ok:
                wrong.append(f"{comp}.{path}")
    assert not missing, missing[:5]
    assert not wrong, wrong[:5]


def _torch_models(arch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=1000, **CLIP)
    models = {"unet": diffusers.UNet2DConditionModel(**(SDXL_UNET if arch == "sdxl" else SD1_UNET)),
              "text_encoder": transformers.CLIPTextModel(config)}
    if arch == "sdxl":
        models["text_encoder_2"] = transformers.CLIPTextModelWithProjection(config)
    pipe = diffusers.StableDiffusionXLPipeline if arch == "sdxl" else diffusers.StableDiffusionPipeline
    return pipe, models


def _load(pipe, models, folder, weight_name, with_metadata):
    kw = {"unet_config": models["unet"].config} if "text_encoder_2" in models else {}
    if with_metadata:
        sd, alphas, meta = pipe.lora_state_dict(folder, weight_name=weight_name, return_lora_metadata=True, **kw)
        extra = {"metadata": meta}
    else:
        sd, alphas = pipe.lora_state_dict(folder, weight_name=weight_name, **kw)
        extra = {}
    pipe.load_lora_into_unet(sd, alphas, unet=models["unet"], adapter_name="x", **extra)
    for comp in ("text_encoder", "text_encoder_2"):
        if comp in models:
            pipe.load_lora_into_text_encoder(sd, alphas, text_encoder=models[comp], prefix=comp, adapter_name="x",
                                             **extra)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_hf_diffusers_loads_diffusers_file_exactly(tmp_path, arch, sd_fakes):
    random_state, tiny_sd1, tiny_sdxl = sd_fakes.random_state, sd_fakes.tiny_sd1, sd_fakes.tiny_sdxl
    pipe, models = _torch_models(arch)
    base = tiny_sdxl() if arch == "sdxl" else tiny_sd1()
    state = random_state(base, np.random.default_rng(0))  # ranks and alphas vary per module
    DiffusersFormat().write(state, str(tmp_path))
    _load(pipe, models, str(tmp_path), "pytorch_lora_weights.safetensors", with_metadata=True)
    check(state, {c: dict(m.named_modules()) for c, m in models.items()}, lambda layer: layer.weight.detach().numpy())


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_hf_diffusers_loads_kohya_file(tmp_path, arch, sd_fakes):
    random_state, tiny_sd1, tiny_sdxl = sd_fakes.random_state, sd_fakes.tiny_sd1, sd_fakes.tiny_sdxl
    base = tiny_sdxl() if arch == "sdxl" else tiny_sd1()
    for vary in (False, True):
        pipe, models = _torch_models(arch)
        state = (random_state(base, np.random.default_rng(1)) if vary
                 else random_state(base, vary=False, ranks=(4,), alphas=(2.0,)))
        KohyaFormat().write(state, str(tmp_path / f"k{vary}.safetensors"))
        _load(pipe, models, str(tmp_path), f"k{vary}.safetensors", with_metadata=False)
        check(state, {c: dict(m.named_modules()) for c, m in models.items()},
              lambda layer: layer.weight.detach().numpy(), scales=not vary)


def test_mindone_loads_diffusers_and_kohya_files(tmp_path, sd_fakes):
    random_state, tiny_sdxl = sd_fakes.random_state, sd_fakes.tiny_sdxl
    pytest.importorskip("mindspore")
    from mindone_lora_plugin.runtime.process import quiet_mindone_imports

    quiet_mindone_imports()
    from mindone.diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from mindone.transformers import CLIPTextModel, CLIPTextModelWithProjection
    from transformers import CLIPTextConfig

    def models():
        config = CLIPTextConfig(vocab_size=1000, **CLIP)
        return {"unet": UNet2DConditionModel(**SDXL_UNET), "text_encoder": CLIPTextModel(config),
                "text_encoder_2": CLIPTextModelWithProjection(config)}

    def cells(ms):
        return {c: dict(m.cells_and_names()) for c, m in ms.items()}

    state = random_state(tiny_sdxl(), np.random.default_rng(2))
    DiffusersFormat().write(state, str(tmp_path))
    ms = models()
    _load(StableDiffusionXLPipeline, ms, str(tmp_path), "pytorch_lora_weights.safetensors", with_metadata=True)
    check(state, cells(ms), lambda layer: layer.weight.asnumpy())

    uniform = random_state(tiny_sdxl(), vary=False, ranks=(4,), alphas=(2.0,))
    KohyaFormat().write(uniform, str(tmp_path / "k.safetensors"))
    ms = models()
    _load(StableDiffusionXLPipeline, ms, str(tmp_path), "k.safetensors", with_metadata=False)
    check(uniform, cells(ms), lambda layer: layer.weight.asnumpy())


def test_lora_config_fields_accepted_by_both(sd_fakes):
    random_state, tiny_sdxl = sd_fakes.random_state, sd_fakes.tiny_sdxl
    pytest.importorskip("peft")
    pytest.importorskip("mindspore")
    import json

    from peft import LoraConfig as PeftLoraConfig

    from mindone_lora_plugin.runtime.process import quiet_mindone_imports

    quiet_mindone_imports()
    from mindone.peft import LoraConfig as MindoneLoraConfig

    from mindone_lora_plugin.formats.diffusers import adapter_config

    state = random_state(tiny_sdxl(), np.random.default_rng(3))
    for comp, mods in state.components.items():
        cfg = json.loads(json.dumps(adapter_config(mods)))
        for cls in (PeftLoraConfig, MindoneLoraConfig):
            made = cls(**cfg)
            assert made.r == cfg["r"] and made.lora_alpha == cfg["lora_alpha"]
            assert made.rank_pattern == cfg["rank_pattern"] and made.alpha_pattern == cfg["alpha_pattern"]
