"""The diffusers and kohya writers: keys, alphas, metadata, dtypes and round trips."""

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest

from mindone_lora_plugin import safetensors_io
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.alphas import pattern_key
from mindone_lora_plugin.formats.diffusers import DiffusersFormat
from mindone_lora_plugin.formats.kohya import KohyaFormat
from mindone_lora_plugin.formats.reader import read_lora
from mindone_lora_plugin.state import LoraModule, LoraState

# LoraConfig fields accepted by both mindone 0.5.0 (mindone.peft) and peft 0.21 (diffusers 0.39)
COMMON_LORA_CONFIG_FIELDS = {
    "alpha_pattern", "bias", "fan_in_fan_out", "init_lora_weights", "lora_alpha", "lora_dropout", "r",
    "rank_pattern", "target_modules", "use_rslora", "use_dora", "lora_bias", "exclude_modules", "layers_pattern",
    "layers_to_transform", "modules_to_save"}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def case(request, sd_fakes):
    random_state, tiny_sd1, tiny_sdxl = sd_fakes.random_state, sd_fakes.tiny_sd1, sd_fakes.tiny_sdxl
    base = tiny_sd1() if request.param == "sd1" else tiny_sdxl()
    return base, random_state(base, np.random.default_rng(7))


# --------------------------------------------------------------------------- diffusers


def test_diffusers_file(tmp_path, case, sd_fakes):
    assert_states_equal = sd_fakes.assert_states_equal
    base, state = case
    path = DiffusersFormat().write(state, str(tmp_path), metadata={"ss_learning_rate": "1e-4", "seed": "3"},
                                   output_name="run")
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    tensors, meta = safetensors_io.load(path)
    key_re = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight$")
    assert all(key_re.match(k) for k in tensors), [k for k in tensors if not key_re.match(k)][:3]
    assert not any(".lora.down" in k or ".lora.up" in k or "lora_linear_layer" in k for k in tensors)
    assert meta["format"] == "np"
    assert meta["ss_learning_rate"] == "1e-4" and meta["seed"] == "3"
    raw = meta["lora_adapter_metadata"]
    cfg = json.loads(raw)
    assert raw == json.dumps(cfg, indent=2, sort_keys=True)
    for comp, mods in state.components.items():
        fields = {k[len(comp) + 1:] for k in cfg if k.startswith(comp + ".") and
                  not (comp == "text_encoder" and k.startswith("text_encoder_2."))}
        assert {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern"} <= fields <= \
            COMMON_LORA_CONFIG_FIELDS
        assert cfg[f"{comp}.target_modules"] == sorted(mods)
        ranks = [m.rank for m in mods.values()]
        alphas = [m.alpha for m in mods.values()]
        assert cfg[f"{comp}.r"] == max(set(ranks), key=lambda r: (ranks.count(r), r))
        assert cfg[f"{comp}.lora_alpha"] == max(set(alphas), key=lambda a: (alphas.count(a), a))
        # every module gets exactly its rank and alpha under PEFT's pattern rule
        for path_, m in mods.items():
            rk = pattern_key(cfg[f"{comp}.rank_pattern"], path_)
            ak = pattern_key(cfg[f"{comp}.alpha_pattern"], path_)
            assert (cfg[f"{comp}.rank_pattern"][rk] if rk else cfg[f"{comp}.r"]) == m.rank
            assert (cfg[f"{comp}.alpha_pattern"][ak] if ak else cfg[f"{comp}.lora_alpha"]) == m.alpha
            assert rk in (None, path_) and ak in (None, path_)
    assert_states_equal(state, read_lora(path, base=base))


def test_diffusers_default_filename_ignores_output_name(tmp_path):
    fmt = DiffusersFormat()
    assert fmt.default_filename("anything") == "pytorch_lora_weights.safetensors"
    assert fmt.output_path(str(tmp_path), "x") == str(tmp_path / "pytorch_lora_weights.safetensors")
    assert fmt.output_path(str(tmp_path / "f.safetensors"), "x") == str(tmp_path / "f.safetensors")


def test_diffusers_uniform_has_empty_patterns(tmp_path, sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    state = random_state(tiny_sd1(), vary=False, ranks=(4,), alphas=(2.0,))
    cfg = json.loads(safetensors_io.read_metadata(DiffusersFormat().write(state, str(tmp_path)))
                     ["lora_adapter_metadata"])
    assert cfg["unet.r"] == 4 and cfg["unet.lora_alpha"] == 2
    assert cfg["unet.rank_pattern"] == {} and cfg["unet.alpha_pattern"] == {}


# --------------------------------------------------------------------------- kohya


def test_kohya_file(tmp_path, case, sd_fakes):
    assert_states_equal = sd_fakes.assert_states_equal
    base, state = case
    meta_in = {"ss_learning_rate": "0.0001", "ss_steps": "100", "format": "np", "lora_adapter_metadata": "{}",
               "sshs_model_hash": "stale"}
    path = KohyaFormat().write(state, str(tmp_path / "my_lora.safetensors"), metadata=meta_in, output_name="my_lora")
    tensors, meta = safetensors_io.load(path)
    sdxl = base.architecture == "sdxl"
    prefixes = {"lora_unet", "lora_te1", "lora_te2"} if sdxl else {"lora_unet", "lora_te"}
    stems = {k.split(".", 1)[0] for k in tensors}
    assert {re.match(r"lora_(unet|te\d?)", s).group(0) for s in stems} == prefixes
    unet_stems = [s for s in stems if s.startswith("lora_unet_")]
    if sdxl:
        assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", s) for s in unet_stems)
        assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in stems
    else:
        assert all(re.match(r"lora_unet_(down_blocks|mid_block|up_blocks)_", s) for s in unet_stems)
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0" in stems
    for s in stems:
        assert {f"{s}.lora_down.weight", f"{s}.lora_up.weight", f"{s}.alpha"} <= set(tensors)
        assert tensors[f"{s}.alpha"].shape == () and tensors[f"{s}.alpha"].dtype == np.float32
    # metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_v2"] == "False"
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if sdxl else "sd_v1")
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "Dynamic", "conv_alpha": "Dynamic"}
    assert meta["ss_output_name"] == "my_lora"
    assert meta["ss_learning_rate"] == "0.0001" and meta["ss_steps"] == "100"
    assert "format" not in meta and "lora_adapter_metadata" not in meta
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sshs_model_hash"]) and re.fullmatch(r"[0-9a-f]{8}",
                                                                                      meta["sshs_legacy_hash"])
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == ("stable-diffusion-xl-v1-base/lora" if sdxl
                                              else "stable-diffusion-v1/lora")
    assert meta["modelspec.implementation"] == ("https://github.com/Stability-AI/generative-models" if sdxl
                                                else "diffusers")
    assert meta["modelspec.title"] == "my_lora"
    assert meta["modelspec.resolution"] == ("1024x1024" if sdxl else "512x512")
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])
    assert_states_equal(state, read_lora(path, base=base))
    assert_states_equal(state, read_lora(path))


def test_kohya_uniform_metadata(tmp_path, sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    base = tiny_sd1()
    lin = random_state(base, conv=False, vary=False, ranks=(8,), alphas=(4.0,))
    path = KohyaFormat().write(lin, str(tmp_path / "a.safetensors"))
    meta = safetensors_io.read_metadata(path)
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert "ss_network_args" not in meta
    # conv modules with their own rank/alpha → ss_network_args
    conv = random_state(base, conv=True, vary=False, ranks=(8,), alphas=(4.0,))
    for comp, p, m in list(conv.modules()):
        if m.is_conv and m.kernel_size != (1, 1):
            conv.components[comp][p] = LoraModule(m.down[:2], m.up[:, :2], 1.0)
    meta = safetensors_io.read_metadata(KohyaFormat().write(conv, str(tmp_path / "c.safetensors"),
                                                            metadata={"ss_network_args": '{"dropout": "0.1"}'}))
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["ss_network_args"]) == {"dropout": "0.1", "conv_dim": "2", "conv_alpha": "1.0"}


def test_kohya_sd2_metadata(tmp_path, sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    state = random_state(tiny_sd1(), conv=False)
    state.architecture = "sd2"
    meta = safetensors_io.read_metadata(KohyaFormat().write(state, str(tmp_path / "v.safetensors"),
                                                            metadata={"ss_base_model_version": "sd_v2_v"}))
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.resolution"] == "768x768"


def test_kohya_output_folder(tmp_path, sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    state = random_state(tiny_sd1(), conv=False)
    path = KohyaFormat().write(state, str(tmp_path), output_name="my_run")
    assert path == str(tmp_path / "my_run.safetensors")


@pytest.mark.parametrize("dtype,np_dtype", [("fp32", np.float32), ("fp16", np.float16),
                                            ("bf16", ml_dtypes.bfloat16)])
def test_kohya_dtypes(tmp_path, dtype, np_dtype, sd_fakes):
    assert_states_equal = sd_fakes.assert_states_equal
    random_state = sd_fakes.random_state
    tiny_sdxl = sd_fakes.tiny_sdxl
    state = random_state(tiny_sdxl(), np.random.default_rng(3), alphas=(1.0, 0.3, 8.0))
    path = KohyaFormat().write(state, str(tmp_path / "k.safetensors"), dtype=dtype)
    tensors, _ = safetensors_io.load(path)
    # MindSpore may own the bf16 type; alphas stay float32 so that they keep their values (0.3 is 0.29998 in fp16)
    assert {t.dtype.name for k, t in tensors.items() if not k.endswith(".alpha")} == {np.dtype(np_dtype).name}
    assert {t.dtype.name for k, t in tensors.items() if k.endswith(".alpha")} == {"float32"}
    got = read_lora(path)
    for comp, p, m in state.modules():
        g = got.components[comp][p]
        assert g.alpha == float(np.float32(m.alpha))
        assert np.array_equal(g.down, m.down.astype(np_dtype)) and np.array_equal(g.up, m.up.astype(np_dtype))
    # and back: the half-precision file converts to diffusers and kohya again without change
    again = read_lora(DiffusersFormat().write(got, str(tmp_path / "d")))
    assert_states_equal(got, again)
    assert_states_equal(got, read_lora(KohyaFormat().write(again, str(tmp_path / "k2.safetensors"))))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_diffusers_dtypes(tmp_path, dtype, sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    state = random_state(tiny_sd1(), np.random.default_rng(4))
    got = read_lora(DiffusersFormat().write(state, str(tmp_path), dtype=dtype))
    assert got.dtype() == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    for comp, p, m in state.modules():
        assert got.components[comp][p].alpha == m.alpha  # alphas live in JSON: exact


def test_round_trip_diffusers_kohya_diffusers(tmp_path, case, sd_fakes):
    assert_states_equal = sd_fakes.assert_states_equal
    base, state = case
    d1 = DiffusersFormat().write(state, str(tmp_path / "a"))
    s1 = read_lora(d1)
    k = KohyaFormat().write(s1, str(tmp_path / "b.safetensors"))
    s2 = read_lora(k, base=base)
    d2 = DiffusersFormat().write(s2, str(tmp_path / "c"))
    s3 = read_lora(d2, base=base)
    for s in (s1, s2, s3):
        assert_states_equal(state, s)
    assert s3.architecture == base.architecture


def test_kohya_needs_architecture(tmp_path, sd_fakes):
    random_state, tiny_sd1, tiny_sdxl = sd_fakes.random_state, sd_fakes.tiny_sd1, sd_fakes.tiny_sdxl
    state = random_state(tiny_sd1(), conv=False)
    state.architecture = None
    with pytest.raises(LoraError, match="SD1.x, SD2.x or SDXL.*--base"):
        KohyaFormat().write(state, str(tmp_path / "x.safetensors"))
    assert not os.listdir(tmp_path)
    xl = random_state(tiny_sdxl(), conv=False)
    xl.architecture = None  # text_encoder_2 says SDXL
    path = KohyaFormat().write(xl, str(tmp_path / "xl.safetensors"))
    assert safetensors_io.read_metadata(path)["ss_base_model_version"] == "sdxl_base_v1-0"


def test_kohya_refuses_te2_for_sd1(tmp_path, sd_fakes):
    random_state, tiny_sdxl = sd_fakes.random_state, sd_fakes.tiny_sdxl
    state = random_state(tiny_sdxl(), conv=False)
    state.architecture = "sd1"
    with pytest.raises(LoraError, match="text_encoder_2"):
        KohyaFormat().write(state, str(tmp_path / "x.safetensors"))


def test_empty_state_refused(tmp_path):
    for fmt in (DiffusersFormat(), KohyaFormat()):
        with pytest.raises(LoraError, match="no modules"):
            fmt.write(LoraState(architecture="sd1"), str(tmp_path / "e.safetensors"))


def test_unknown_dtype(tmp_path, sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    with pytest.raises(LoraError, match="fp32, fp16, bf16"):
        DiffusersFormat().write(random_state(tiny_sd1()), str(tmp_path), dtype="int8")


def test_formats_are_plugins(plugin_manager):
    formats = plugin_manager.formats()
    assert isinstance(formats["diffusers"], DiffusersFormat) and isinstance(formats["kohya"], KohyaFormat)
    assert plugin_manager.plugin_of("formats", "kohya") == "kohya"
