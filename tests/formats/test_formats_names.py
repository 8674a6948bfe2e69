"""Key parsing and name resolution for every plain-LoRA style (reference §3.1, §5)."""

import json
import re

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from mindone_lora_plugin.architectures.sd import sgm
from mindone_lora_plugin.architectures.sd.keys import flat_to_dotted
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.names import NameResolver, parse_key
from mindone_lora_plugin.formats.reader import open_lora, read_lora
from mindone_lora_plugin.state import LoraModule, LoraState


def write(path, tensors, metadata=None):
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def keyed(state, name_fn, down="lora_down.weight", up="lora_up.weight", alpha=True, alpha_fn=None):
    out = {}
    for comp, path, mod in state.modules():
        n = name_fn(comp, path)
        out[f"{n}.{down}"] = mod.down
        out[f"{n}.{up}"] = mod.up
        if alpha:
            out[f"{n}.alpha"] = alpha_fn(mod) if alpha_fn else np.array(mod.alpha, np.float32)
    return out


def with_alpha(state, fn):
    out = LoraState(architecture=state.architecture, base_config=state.base_config)
    for comp, path, mod in state.modules():
        out.add(comp, path, LoraModule(mod.down, mod.up, fn(comp, path, mod)))
    return out


# --------------------------------------------------------------------------- parse_key


@pytest.mark.parametrize("key,expected", [
    ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight",
     ("unet", "down_blocks_1_attentions_0_proj_in", "down", True)),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha",
     ("text_encoder", "text_model_encoder_layers_0_mlp_fc1", "alpha", True)),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
     ("text_encoder_2", "text_model_encoder_layers_0_mlp_fc1", "up", True)),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
     ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down", False)),
    ("text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight",
     ("text_encoder_2", "text_model.encoder.layers.1.self_attn.q_proj", "up", False)),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora.up.weight",
     ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", "up", False)),
    ("text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.down.weight",
     ("text_encoder", "text_model.encoder.layers.0.self_attn.k_proj", "down", False)),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight",
     ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "down", False)),
    ("unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_k_lora.up.weight",
     ("unet", "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", "up", False)),
    ("text_encoder.text_model.encoder.layers.3.self_attn.to_out_lora.up.weight",
     ("text_encoder", "text_model.encoder.layers.3.self_attn.out_proj", "up", False)),
    ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight",
     ("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q", "down", False)),
    ("base_model.model.down_blocks.1.attentions.0.proj_in.lora_A.weight",
     ("unet", "down_blocks.1.attentions.0.proj_in", "down", False)),
    ("base_model.model.text_model.encoder.layers.0.mlp.fc2.lora_B.weight",
     ("text_encoder", "text_model.encoder.layers.0.mlp.fc2", "up", False)),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out_0.lora_A.weight",
     ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "down", False)),
    ("down_blocks.0.resnets.0.conv1.lora_A.weight", ("unet", "down_blocks.0.resnets.0.conv1", "down", False)),
])
def test_parse_key(key, expected):
    pk = parse_key(key)
    assert (pk.component, pk.name, pk.role, pk.flat) == expected


@pytest.mark.parametrize("key", ["foo.bar", "model.layers.0.weight", "lora_unet_x.weight", "unet.x.lora_C.weight",
                                 "prior.blocks.0.lora_A.weight", "lora_unet_.lora_down.weight"])
def test_parse_key_rejects(key):
    assert parse_key(key) is None


# --------------------------------------------------------------------------- grammar


@pytest.mark.parametrize("which", ["real_sdxl_unet", "real_sd1_unet", "tiny_sdxl_unet", "big_clip"])
def test_grammar_inverts_every_module_name(which, sd_fakes):
    modules = {"real_sdxl_unet": sd_fakes.real_sdxl_unet, "real_sd1_unet": sd_fakes.real_sd1_unet,
               "tiny_sdxl_unet": lambda: sd_fakes.tiny_sdxl().modules["unet"],
               "big_clip": lambda: sd_fakes.clip_modules(hidden=1280, layers=32, projection=1280)}[which]()
    for path in modules:
        assert flat_to_dotted(path.replace(".", "_")) == path
    if "conv_in" in modules:
        for path in modules:
            s = sgm.diffusers_to_sgm(path, 2)
            assert flat_to_dotted(s.replace(".", "_")) == s


def test_resolver_with_and_without_base_agree(sd_fakes):
    tiny_sdxl = sd_fakes.tiny_sdxl
    base = tiny_sdxl()
    with_base, grammar = NameResolver(base), NameResolver(None)
    for comp, mods in base.modules.items():
        for path in mods:
            flat = path.replace(".", "_")
            assert with_base.resolve(comp, flat, True) == path
            if comp == "unet" and path.startswith(("down_blocks", "mid_block", "up_blocks")):
                s = sgm.diffusers_to_sgm(path, 2)
                assert with_base.resolve(comp, s.replace(".", "_"), True) == path
                assert grammar.resolve(comp, s.replace(".", "_"), True) == path
                assert with_base.resolve(comp, s, False) == path
            if comp != "unet" or not path.startswith(("conv_in", "conv_out", "time_", "add_")):
                assert grammar.resolve(comp, flat, True) == path
    assert with_base.resolve("unet", "down_blocks_7_attentions_0_proj_in", True) is None
    assert grammar.resolve("unet", "down_blocks_7_attentions_0_nonsense", True) is None


# --------------------------------------------------------------------------- reading every style


@pytest.fixture(scope="module")
def sd1_state(sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    return random_state(tiny_sd1(), np.random.default_rng(1))


@pytest.fixture(scope="module")
def sdxl_state(sd_fakes):
    random_state, tiny_sdxl = sd_fakes.random_state, sd_fakes.tiny_sdxl
    return random_state(tiny_sdxl(), np.random.default_rng(2))


def kohya_name(arch):
    def fn(comp, path):
        if comp == "unet":
            p = sgm.diffusers_to_sgm(path, 2) if arch == "sdxl" else path
            return "lora_unet_" + p.replace(".", "_")
        prefix = {"text_encoder": "lora_te1" if arch == "sdxl" else "lora_te", "text_encoder_2": "lora_te2"}[comp]
        return prefix + "_" + path.replace(".", "_")
    return fn


@pytest.mark.parametrize("with_base", [False, True])
def test_kohya_sd1(tmp_path, sd1_state, with_base, sd_fakes):
    assert_states_equal, tiny_sd1 = sd_fakes.assert_states_equal, sd_fakes.tiny_sd1
    p = write(tmp_path / "k.safetensors", keyed(sd1_state, kohya_name("sd1")))
    got = read_lora(p, base=tiny_sd1() if with_base else None)
    assert_states_equal(sd1_state, got)
    assert got.architecture == "sd1"  # 1x1-conv proj_in (no base), or the base


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("naming", ["sgm", "diffusers"])
def test_kohya_sdxl(tmp_path, sdxl_state, with_base, naming, sd_fakes):
    assert_states_equal, tiny_sdxl = sd_fakes.assert_states_equal, sd_fakes.tiny_sdxl
    fn = kohya_name("sdxl") if naming == "sgm" else (
        lambda c, p: {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[c]
        + "_" + p.replace(".", "_"))
    p = write(tmp_path / "k.safetensors", keyed(sdxl_state, fn))
    lf = open_lora(p, base=tiny_sdxl() if with_base else None)
    assert_states_equal(sdxl_state, lf.state)
    assert lf.state.architecture == "sdxl"
    assert lf.info.sgm == (naming == "sgm")


def test_lora_te1_on_sd1(tmp_path, sd1_state, sd_fakes):
    assert_states_equal, tiny_sd1 = sd_fakes.assert_states_equal, sd_fakes.tiny_sd1
    fn = lambda c, p: ("lora_unet_" if c == "unet" else "lora_te1_") + p.replace(".", "_")  # noqa: E731
    p = write(tmp_path / "k.safetensors", keyed(sd1_state, fn))
    assert_states_equal(sd1_state, read_lora(p, base=tiny_sd1()))
    assert_states_equal(sd1_state, read_lora(p))


def test_comfy_diffusion_model_prefix(tmp_path, sdxl_state, sd_fakes):
    assert_states_equal, tiny_sdxl = sd_fakes.assert_states_equal, sd_fakes.tiny_sdxl
    unet_only = LoraState(components={"unet": sdxl_state.components["unet"]})
    for down, up in (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight")):
        tensors = keyed(unet_only, lambda c, p: "diffusion_model." + sgm.diffusers_to_sgm(p, 2), down, up)
        p = write(tmp_path / f"c_{down[:6]}.safetensors", tensors)
        assert_states_equal(unet_only, read_lora(p))
        assert_states_equal(unet_only, read_lora(p, base=tiny_sdxl()))


@pytest.mark.parametrize("alpha_fn", [
    lambda m: np.array(m.alpha, np.float32),
    lambda m: np.array(m.alpha, np.float16),
    lambda m: np.array(m.alpha, np.float64),
    lambda m: np.array([m.alpha], np.float32),
    lambda m: np.array(m.alpha, ml_dtypes.bfloat16),
], ids=["f32", "f16", "f64", "shape1", "bf16"])
def test_alpha_storage(tmp_path, sd1_state, alpha_fn, sd_fakes):
    assert_states_equal = sd_fakes.assert_states_equal
    p = write(tmp_path / "k.safetensors", keyed(sd1_state, kohya_name("sd1"), alpha_fn=alpha_fn))
    got = read_lora(p)
    expect = with_alpha(sd1_state, lambda c, q, m: float(np.asarray(alpha_fn(m)).astype(np.float64).reshape(-1)[0]))
    assert_states_equal(expect, got)


def test_integer_alpha_and_missing_alpha(tmp_path, sd1_state, sd_fakes):
    assert_states_equal = sd_fakes.assert_states_equal
    ints = with_alpha(sd1_state, lambda c, p, m: float(int(m.alpha) or 1))
    p = write(tmp_path / "i.safetensors", keyed(ints, kohya_name("sd1"), alpha_fn=lambda m: np.array(int(m.alpha),
                                                                                                    np.int64)))
    assert_states_equal(ints, read_lora(p))
    p = write(tmp_path / "n.safetensors", keyed(sd1_state, kohya_name("sd1"), alpha=False))
    assert_states_equal(with_alpha(sd1_state, lambda c, q, m: float(m.rank)), read_lora(p))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_tensors(tmp_path, sd1_state, dtype, sd_fakes):
    assert_states_equal = sd_fakes.assert_states_equal
    st = sd1_state.astype(dtype)
    p = write(tmp_path / "k.safetensors", keyed(st, kohya_name("sd1"), alpha_fn=lambda m: np.array(m.alpha, dtype)))
    got = read_lora(p)
    assert got.dtype() == np.dtype(dtype).name
    assert_states_equal(with_alpha(st, lambda c, q, m: float(np.array(m.alpha, dtype).astype(np.float64))), got)


def peft_name(c, p):
    return f"{c}.{p}"


def test_peft_without_metadata_means_alpha_equals_rank(tmp_path, sdxl_state, sd_fakes):
    assert_states_equal = sd_fakes.assert_states_equal
    p = write(tmp_path / "pytorch_lora_weights.safetensors",
              keyed(sdxl_state, peft_name, "lora_A.weight", "lora_B.weight", alpha=False))
    assert_states_equal(with_alpha(sdxl_state, lambda c, q, m: float(m.rank)), read_lora(p))


def test_peft_with_alpha_keys(tmp_path, sdxl_state, sd_fakes):
    assert_states_equal = sd_fakes.assert_states_equal
    p = write(tmp_path / "a.safetensors", keyed(sdxl_state, peft_name, "lora_A.weight", "lora_B.weight"))
    assert_states_equal(sdxl_state, read_lora(p))


def test_diffusers_lora_down_up_and_linear_layer(tmp_path, sd1_state, sd_fakes):
    assert_states_equal, tiny_sd1 = sd_fakes.assert_states_equal, sd_fakes.tiny_sd1
    tensors = {}
    for comp, path, mod in sd1_state.modules():
        if comp == "unet":
            tensors[f"unet.{path}.lora.down.weight"] = mod.down
            tensors[f"unet.{path}.lora.up.weight"] = mod.up
        else:
            tensors[f"text_encoder.{path}.lora_linear_layer.down.weight"] = mod.down
            tensors[f"text_encoder.{path}.lora_linear_layer.up.weight"] = mod.up
    p = write(tmp_path / "d.safetensors", tensors)
    assert_states_equal(with_alpha(sd1_state, lambda c, q, m: float(m.rank)), read_lora(p, base=tiny_sd1()))


def test_mindone_mixed_style(tmp_path, sd1_state, sd_fakes):
    """What mindone 0.5.0's convert_state_dict_to_diffusers writes: attention .lora.down/up, the rest lora_A/B."""
    assert_states_equal = sd_fakes.assert_states_equal
    tensors = {}
    for comp, path, mod in sd1_state.modules():
        attn = comp == "unet" and path.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or path.endswith("to_out.0")
        d, u = ("lora.down.weight", "lora.up.weight") if attn else ("lora_A.weight", "lora_B.weight")
        tensors[f"{comp}.{path}.{d}"] = mod.down
        tensors[f"{comp}.{path}.{u}"] = mod.up
    p = write(tmp_path / "m.safetensors", tensors)
    assert_states_equal(with_alpha(sd1_state, lambda c, q, m: float(m.rank)), read_lora(p))


def test_old_attention_processor_keys(tmp_path, sd1_state, sd_fakes):
    assert_states_equal, tiny_sd1 = sd_fakes.assert_states_equal, sd_fakes.tiny_sd1
    attn = LoraState()
    tensors = {}
    te_names = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    for comp, path, mod in sd1_state.modules():
        if comp == "unet" and ".attn" in path and ".ff." not in path:
            head, leaf = path.split(".attn")[0], path.split(".attn")[1]
            a, proj = leaf.split(".", 1)
            stem = f"unet.{head}.attn{a}.processor.{proj.replace('.0', '')}_lora"
        elif comp == "text_encoder" and ".self_attn." in path:
            head, proj = path.rsplit(".", 1)
            stem = f"text_encoder.{head}.{te_names[proj]}_lora"
        else:
            continue
        attn.add(comp, path, LoraModule(mod.down, mod.up, float(mod.rank)))
        tensors[f"{stem}.down.weight"] = mod.down
        tensors[f"{stem}.up.weight"] = mod.up
    p = write(tmp_path / "o.safetensors", tensors)
    assert_states_equal(attn, read_lora(p, base=tiny_sd1()))


def test_diffusers_metadata_patterns_restore_alphas(tmp_path, sdxl_state, sd_fakes):
    from mindone_lora_plugin.formats.diffusers import adapter_metadata

    assert_states_equal = sd_fakes.assert_states_equal

    meta = {"format": "np", "lora_adapter_metadata": json.dumps(adapter_metadata(sdxl_state), indent=2,
                                                                sort_keys=True)}
    p = write(tmp_path / "pytorch_lora_weights.safetensors",
              keyed(sdxl_state, peft_name, "lora_A.weight", "lora_B.weight", alpha=False), meta)
    assert_states_equal(sdxl_state, read_lora(p))


def test_peft_model_prefix_with_adapter_config(tmp_path, sd1_state, sd_fakes):
    assert_states_equal, tiny_sd1 = sd_fakes.assert_states_equal, sd_fakes.tiny_sd1
    unet = LoraState(components={"unet": sd1_state.components["unet"]})
    folder = tmp_path / "adapter"
    folder.mkdir()
    tensors = keyed(unet, lambda c, p: f"base_model.model.{p}", "lora_A.weight", "lora_B.weight", alpha=False)
    p = write(folder / "adapter_model.safetensors", tensors)
    # no adapter_config.json: alpha = rank
    assert_states_equal(with_alpha(unet, lambda c, q, m: float(m.rank)), read_lora(p))
    ranks = {path: m.rank for path, m in unet.components["unet"].items()}
    alphas = {path: m.alpha for path, m in unet.components["unet"].items()}
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 4.0, "target_modules": sorted(ranks),
           "rank_pattern": {re.escape(k): v for k, v in ranks.items() if v != 4},
           "alpha_pattern": {re.escape(k): v for k, v in alphas.items() if v != 4.0}}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    assert_states_equal(unet, read_lora(p, base=tiny_sd1()))
    assert_states_equal(unet, read_lora(str(folder)))  # the folder: its only .safetensors file


def test_rslora_config(tmp_path):
    st = LoraState()
    rng = np.random.default_rng(0)
    st.add("unet", "down_blocks.1.attentions.0.proj_in", LoraModule(rng.standard_normal((4, 64, 1, 1)).astype(
        np.float32), rng.standard_normal((64, 4, 1, 1)).astype(np.float32), 8.0))
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True,
                                                 "unet.target_modules": ["down_blocks.1.attentions.0.proj_in"]})}
    p = write(tmp_path / "r.safetensors", keyed(st, peft_name, "lora_A.weight", "lora_B.weight", alpha=False), meta)
    got = read_lora(p).components["unet"]["down_blocks.1.attentions.0.proj_in"]
    assert got.scale == pytest.approx(8.0 / 2.0)  # peft: alpha / sqrt(r)


def test_two_namings_of_one_module_are_refused(tmp_path, sd1_state):
    tensors = keyed(sd1_state, kohya_name("sd1"))
    comp, path, mod = next(sd1_state.modules())
    tensors[f"{comp}.{path}.lora_A.weight"] = mod.down
    tensors[f"{comp}.{path}.lora_B.weight"] = mod.up
    with pytest.raises(LoraError, match="same module"):
        read_lora(write(tmp_path / "dup.safetensors", tensors))


def test_incomplete_module_is_refused(tmp_path, sd1_state):
    tensors = keyed(sd1_state, kohya_name("sd1"))
    del tensors[next(k for k in tensors if k.endswith("lora_up.weight"))]
    with pytest.raises(LoraError, match="no lora_up/lora_B weight"):
        read_lora(write(tmp_path / "inc.safetensors", tensors))
    tensors = keyed(sd1_state, kohya_name("sd1"))
    tensors["lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight"] = np.zeros((64, 9, 1, 1), np.float32)
    with pytest.raises(LoraError, match="not a LoRA pair"):
        read_lora(write(tmp_path / "pair.safetensors", tensors))


def test_stray_alpha_and_bad_alpha(tmp_path, sd1_state):
    tensors = keyed(sd1_state, kohya_name("sd1"))
    tensors["lora_unet_down_blocks_1_attentions_0_proj_in.alpha"] = np.ones(3, np.float32)
    with pytest.raises(LoraError, match="alpha is a single number"):
        read_lora(write(tmp_path / "a.safetensors", tensors))


def test_unparseable_names_listed(tmp_path, sd1_state, sd_fakes):
    tiny_sd1 = sd_fakes.tiny_sd1
    tensors = keyed(sd1_state, kohya_name("sd1"))
    tensors["lora_unet_down_blocks_1_wibble_0.lora_down.weight"] = np.zeros((2, 4), np.float32)
    tensors["lora_unet_down_blocks_1_wibble_0.lora_up.weight"] = np.zeros((4, 2), np.float32)
    with pytest.raises(LoraError, match="lora_unet_down_blocks_1_wibble_0"):
        read_lora(write(tmp_path / "u.safetensors", tensors))
    with pytest.raises(LoraError, match="match no module of the sd1 base model.*wibble"):
        read_lora(str(tmp_path / "u.safetensors"), base=tiny_sd1())


def test_layers_per_block_from_file(tmp_path):
    """An SGM file for a UNet with layers_per_block 3 (no base): the downsampler's index reveals L."""
    st = LoraState()
    z = np.zeros
    st.add("unet", "down_blocks.0.downsamplers.0.conv", LoraModule(z((2, 32, 3, 3), np.float32),
                                                                   z((32, 2, 1, 1), np.float32), 1.0))
    st.add("unet", "down_blocks.1.resnets.2.conv1", LoraModule(z((2, 32, 3, 3), np.float32),
                                                               z((64, 2, 1, 1), np.float32), 1.0))
    tensors = keyed(st, lambda c, p: "lora_unet_" + sgm.diffusers_to_sgm(p, 3).replace(".", "_"))
    got = read_lora(write(tmp_path / "l3.safetensors", tensors))
    assert got.base_config == {"layers_per_block": 3}
    assert sorted(got.components["unet"]) == sorted(st.components["unet"])
