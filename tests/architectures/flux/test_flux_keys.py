"""FLUX.1 LoRA files: the key grammar against a real FluxTransformer2DModel, exact fuse/split, every naming read,
detection and the one-line refusals."""

import json

import numpy as np
import pytest

from mindone_lora_plugin import safetensors_io
from mindone_lora_plugin.architectures.flux import files, fuse, keys
from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.diffusers import DiffusersFormat
from mindone_lora_plugin.formats.kohya import KohyaFormat
from mindone_lora_plugin.formats.reader import open_lora, read_lora
from mindone_lora_plugin.state import LoraModule, LoraState

RNG = np.random.default_rng(7)
pytestmark = pytest.mark.usefixtures("flux_installed")


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def shapes(flux_keys):
    linear_shapes, tiny_transformer = flux_keys.linear_shapes, flux_keys.tiny_transformer
    return linear_shapes(tiny_transformer())


def save(tmp_path, tensors, metadata=None, name="f.safetensors"):
    path = str(tmp_path / name)
    safetensors_io.save({k: np.asarray(v) for k, v in tensors.items()}, path, metadata or {})
    return path


# ----------------------------------------------------------------------------- grammar vs the real model


def test_every_linear_of_the_model_has_a_kohya_name_that_reads_back(shapes, flux_keys):
    N_LINEAR = flux_keys.N_LINEAR
    assert len(shapes) == N_LINEAR
    names = {}
    for path in shapes:
        assert keys.is_target_path("transformer", path), path
        name = keys.kohya_module_name("transformer", path)
        pk = keys.parse_key(name + ".lora_down.weight")
        assert pk is not None and pk.component == "transformer", name
        assert path in keys.bfl_parts(pk.name), (path, name)
        names.setdefault(name, []).append(path)
    # double blocks: img qkv and txt qkv fuse 3 modules each; single blocks: linear1 fuses 4
    assert len(names) == N_LINEAR - 2 * (2 + 2) - 2 * 3
    assert names["lora_unet_single_blocks_1_linear1"] == [f"single_transformer_blocks.1.{m}" for m in
                                                          ("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v")]
    assert keys.kohya_module_name("transformer", "transformer_blocks.0.norm1_context.linear") == \
        "lora_unet_double_blocks_0_txt_mod_lin"
    assert keys.kohya_module_name("transformer", "norm_out.linear") == "lora_unet_final_layer_adaLN_modulation_1"
    assert keys.kohya_module_name("text_encoder_2", "encoder.block.0.layer.1.DenseReluDense.wi_0") == \
        "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0"


def test_flattened_diffusers_names_unflatten(shapes):
    for path in shapes:
        assert keys.unflatten("transformer", path.replace(".", "_")) == path
    assert keys.unflatten("text_encoder", "text_model_encoder_layers_3_self_attn_out_proj") == \
        "text_model.encoder.layers.3.self_attn.out_proj"
    assert keys.unflatten("transformer", "down_blocks_0_resnets_0_conv1") is None


# ----------------------------------------------------------------------------- fuse / split maths


def _rows(delta, sizes):
    b = np.cumsum([0] + sizes)
    return [delta[b[i]:b[i + 1]] for i in range(len(sizes))]


def test_fuse_then_split_is_exact_with_ranks_summed():
    sizes = [16, 16, 16, 64]
    parts = [LoraModule(rand(r, 16), rand(s, r), a) for r, s, a in zip((2, 3, 1, 4), sizes, (4.0, 6.0, 2.0, 8.0))]
    fused = fuse.fuse(parts, sizes, "m")  # every part has scale 2: nothing folded
    assert fused.rank == 10 and fused.scale == pytest.approx(2.0)
    for got, part in zip(_rows(fused.delta(), sizes), parts):
        np.testing.assert_allclose(got, part.delta(), atol=1e-6)
    back = fuse.split(fused, sizes, "m")
    for got, part in zip(back, parts):
        assert got.rank == part.rank and got.alpha == pytest.approx(part.alpha)
        assert np.array_equal(got.down, part.down) and np.array_equal(got.up, part.up)


def test_fuse_folds_differing_scales_into_up_and_stays_exact():
    sizes = [8, 8, 8]
    parts = [LoraModule(rand(2, 8), rand(8, 2), 2.0), LoraModule(rand(4, 8), rand(8, 4), 1.0),
             LoraModule(rand(2, 8), rand(8, 2), 2.0)]  # scales 1, 0.25, 1
    fused = fuse.fuse(parts, sizes, "m")
    assert fused.rank == 8 and fused.scale == pytest.approx(1.0)  # the most common scale
    for got, part in zip(_rows(fused.delta(), sizes), parts):
        np.testing.assert_allclose(got, part.delta(), atol=1e-6)
    for got, part in zip(fuse.split(fused, sizes, "m"), parts):
        assert got.rank == part.rank
        np.testing.assert_allclose(got.delta(), part.delta(), atol=1e-6)


def test_dense_fused_split_keeps_the_shared_down_and_fuses_back_identically():
    fused = LoraModule(rand(4, 16), rand(48, 4), 1.0)  # a kohya-trained qkv LoRA: dense up
    parts = fuse.split(fused, [16, 16, 16], "m")
    assert [p.rank for p in parts] == [4, 4, 4] and all(p.alpha == 1.0 for p in parts)
    np.testing.assert_allclose(np.concatenate([p.delta() for p in parts]), fused.delta(), atol=1e-6)
    again = fuse.fuse(parts, [16, 16, 16], "m")
    assert np.array_equal(again.down, fused.down) and np.array_equal(again.up, fused.up) and again.alpha == 1.0


def test_missing_part_and_zero_up():
    q, v = LoraModule(rand(2, 8), rand(8, 2), 2.0), LoraModule(rand(2, 8), rand(8, 2), 2.0)
    fused = fuse.fuse([q, None, v], [8, 8, 8], "m")
    assert fused.rank == 4 and not fused.delta()[8:16].any()
    got = fuse.split(fused, [8, 8, 8], "m")
    assert got[1] is None and np.array_equal(got[0].up, q.up) and np.array_equal(got[2].down, v.down)
    untrained = LoraModule(rand(6, 8), np.zeros((24, 6), np.float32), 6.0)
    assert [p.rank for p in fuse.split(untrained, [8, 8, 8], "m")] == [2, 2, 2]


def test_kohya_split_qkv_layout_reads_with_the_files_scale():
    # sd-scripts' split_qkv saves cat(downs) and a block-diagonal up with the per-part alpha; every reader applies
    # alpha / (3 r), and so does the split here
    downs, ups = [rand(2, 8) for _ in range(3)], [rand(8, 2) for _ in range(3)]
    up = np.zeros((24, 6), np.float32)
    for i in range(3):
        up[8 * i:8 * i + 8, 2 * i:2 * i + 2] = ups[i]
    fused = LoraModule(np.concatenate(downs), up, 4.0)
    parts = fuse.split(fused, [8, 8, 8], "m")
    for i, p in enumerate(parts):
        assert p.rank == 2 and np.array_equal(p.down, downs[i])
        np.testing.assert_allclose(p.delta(), ups[i] @ downs[i] * 4.0 / 6, atol=1e-6)


def _dora(down, up, magnitude):
    return LoraModule(algorithm="lora", tensors={"down": down, "up": up, "magnitude": magnitude}, alpha=2.0)


def test_output_row_dora_splits_and_fuses_exactly():
    base = rand(24, 8)
    fused = _dora(rand(2, 8), rand(24, 2), np.abs(rand(24)) + 0.5)
    parts = fuse.split(fused, [8, 8, 8], "qkv")
    for i, part in enumerate(parts):
        assert part.tensors["magnitude"].shape == (8,)
        np.testing.assert_allclose(part.delta(base[8 * i:8 * i + 8]), fused.delta(base)[8 * i:8 * i + 8], atol=1e-5)
    again = fuse.fuse(parts, [8, 8, 8], "qkv")
    np.testing.assert_allclose(again.delta(base), fused.delta(base), atol=1e-5)
    with pytest.raises(LoraError, match="qkv: a part is missing.*DoRA"):
        fuse.fuse([parts[0], None, parts[2]], [8, 8, 8], "qkv")


def test_non_separable_modules_cannot_be_split_or_fused():
    column_dora = _dora(rand(2, 8), rand(24, 2), np.abs(rand(1, 8)) + 0.5)  # LyCORIS wd_on_out=False
    with pytest.raises(LoraError, match="fused qkv.*lora\\+dora \\(input-column magnitude\\).*cannot be split"):
        fuse.split(column_dora, [8, 8, 8], "fused qkv")
    with pytest.raises(LoraError, match="part 1 of 3"):
        fuse.fuse([_dora(rand(2, 8), rand(8, 2), np.abs(rand(1, 8))), None, None], [8, 8, 8], "qkv")
    with pytest.raises(LoraError, match="24 rows"):
        fuse.split(LoraModule(rand(2, 8), rand(24, 2), 1.0), [8, 8, 4], "m")


# ----------------------------------------------------------------------------- files: every naming


def _kohya_tensors(rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    t = {}
    for name, (r, out, inp) in {"double_blocks_0_img_attn_qkv": (4, 48, 16),
                                "double_blocks_1_txt_attn_proj": (2, 16, 16),
                                "single_blocks_0_linear1": (3, 112, 16), "single_blocks_1_modulation_lin": (2, 48, 16),
                                "final_layer_adaLN_modulation_1": (2, 32, 16)}.items():
        t[f"lora_unet_{name}.lora_down.weight"] = rng.standard_normal((r, inp)).astype(np.float32)
        t[f"lora_unet_{name}.lora_up.weight"] = rng.standard_normal((out, r)).astype(np.float32)
        t[f"lora_unet_{name}.alpha"] = np.asarray(1.0 * r / 2, np.float32)
    for stem in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te3_encoder_block_0_layer_0_SelfAttention_q"):
        t[f"{stem}.lora_down.weight"] = rng.standard_normal((2, 8)).astype(np.float32)
        t[f"{stem}.lora_up.weight"] = rng.standard_normal((8, 2)).astype(np.float32)
    return t


def test_kohya_file_reads_split_and_writes_back_fused(tmp_path, shapes, flux_keys):
    assert_same_deltas = flux_keys.assert_same_deltas
    t = _kohya_tensors()
    path = save(tmp_path, t, {"ss_base_model_version": "flux1"})
    lf = open_lora(path)
    assert lf.format.name == "kohya" and lf.state.architecture == "flux"
    tr = lf.state.components["transformer"]
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
            "norm_out.linear", "transformer_blocks.1.attn.to_add_out"} <= set(tr)
    assert tr["single_transformer_blocks.0.proj_mlp"].base_shape() == (64, 16)
    assert "text_model.encoder.layers.0.self_attn.q_proj" in lf.state.components["text_encoder"]
    assert "encoder.block.0.layer.0.SelfAttention.q" in lf.state.components["text_encoder_2"]
    # the delta of each split part is the fused module's rows; norm_out.linear is the final layer with halves swapped
    fused = LoraModule(t["lora_unet_single_blocks_0_linear1.lora_down.weight"],
                       t["lora_unet_single_blocks_0_linear1.lora_up.weight"], 1.5)
    np.testing.assert_allclose(tr["single_transformer_blocks.0.attn.to_k"].delta(), fused.delta()[16:32], atol=1e-6)
    final = LoraModule(t["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"],
                       t["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"], 1.0).delta()
    np.testing.assert_allclose(tr["norm_out.linear"].delta(), np.concatenate([final[16:], final[:16]]), atol=1e-6)
    # with the base model: same result, shapes checked
    assert_same_deltas(read_lora(path, base=BaseModelInfo("flux", {}, {
        "transformer": shapes, "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": (8, 8)},
        "text_encoder_2": {"encoder.block.0.layer.0.SelfAttention.q": (8, 8)}})), lf.state)
    # kohya again: the same tensors, bit for bit (dense fused modules fuse back to themselves)
    out = KohyaFormat().write(lf.state, str(tmp_path / "again.safetensors"))
    again, meta = safetensors_io.load(out)
    extra = sorted(set(again) - set(t))  # the text encoders' alphas (rank, as read) are written out
    assert set(t) <= set(again) and extra == [n for n in extra if n.startswith("lora_te") and n.endswith(".alpha")]
    assert len(extra) == 2 and all(float(again[n]) == 2.0 for n in extra)
    for k in t:
        np.testing.assert_array_equal(np.asarray(again[k], np.float32), t[k], err_msg=k)
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_module"] == "networks.lora_flux"


def test_split_state_round_trips_through_both_formats(tmp_path, shapes, flux_keys):
    assert_same_deltas = flux_keys.assert_same_deltas
    flux_base = flux_keys.flux_base
    random_state = flux_keys.random_state
    state = random_state(shapes, seed=3)
    for fmt in (KohyaFormat(), DiffusersFormat()):
        path = fmt.write(state, str(tmp_path / fmt.name))
        lf = open_lora(path)
        assert lf.format.name == fmt.name
        assert_same_deltas(lf.state, state, atol=1e-5)
        assert_same_deltas(read_lora(path, base=flux_base(shapes)), state, atol=1e-5)
    # kohya → diffusers → kohya (convert): the kohya tensors are unchanged
    k1 = KohyaFormat().write(state, str(tmp_path / "k1.safetensors"))
    d = DiffusersFormat().write(read_lora(k1), str(tmp_path / "d"))
    k2 = KohyaFormat().write(read_lora(d), str(tmp_path / "k2.safetensors"))
    a, b = safetensors_io.load(k1)[0], safetensors_io.load(k2)[0]
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), atol=1e-6, err_msg=k)


def _renamed(t, fn):
    return {fn(k): v for k, v in t.items()}


@pytest.mark.parametrize("naming", ["comfyui", "comfyui_peft", "bare"])
def test_comfyui_namings_read_like_kohya(tmp_path, naming, flux_keys):
    assert_same_deltas = flux_keys.assert_same_deltas
    t = {k: v for k, v in _kohya_tensors().items() if k.startswith("lora_unet_")}
    want = read_lora(save(tmp_path, t, name="k.safetensors"))

    def rename(k):
        stem, _, suffix = k.partition(".")
        name = stem[len("lora_unet_"):]
        for bfl in ("double_blocks_0_img_attn_qkv", "double_blocks_1_txt_attn_proj", "single_blocks_0_linear1",
                    "single_blocks_1_modulation_lin", "final_layer_adaLN_modulation_1"):
            if name == bfl:
                dotted = (bfl.replace("double_blocks_", "double_blocks.").replace("single_blocks_", "single_blocks.")
                          .replace("_img_attn_", ".img_attn.").replace("_txt_attn_", ".txt_attn.")
                          .replace("_linear1", ".linear1").replace("_modulation_lin", ".modulation.lin")
                          .replace("final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1"))
        if naming == "comfyui_peft":
            suffix = suffix.replace("lora_down", "lora_A").replace("lora_up", "lora_B")
        prefix = "" if naming == "bare" else "diffusion_model."
        return f"{prefix}{dotted}.{suffix}"

    got = read_lora(save(tmp_path, _renamed(t, rename)))
    assert_same_deltas(got, want)


def test_xlabs_and_flat_diffusers_namings(tmp_path):
    down, up = rand(4, 16), rand(48, 4)
    xlabs = read_lora(save(tmp_path, {"double_blocks.0.processor.qkv_lora2.down.weight": down,
                                      "double_blocks.0.processor.qkv_lora2.up.weight": up,
                                      "single_blocks.1.processor.qkv_lora.down.weight": down,
                                      "single_blocks.1.processor.qkv_lora.up.weight": up}))
    tr = xlabs.components["transformer"]
    np.testing.assert_allclose(tr["transformer_blocks.0.attn.add_v_proj"].delta(), up[32:] @ down, atol=1e-6)
    np.testing.assert_allclose(tr["single_transformer_blocks.1.attn.to_q"].delta(), up[:16] @ down, atol=1e-6)
    assert "single_transformer_blocks.1.proj_mlp" not in tr
    flat = read_lora(save(tmp_path, {"lora_transformer_single_transformer_blocks_0_attn_to_k.lora_down.weight": down,
                                     "lora_transformer_single_transformer_blocks_0_attn_to_k.lora_up.weight": up[:16],
                                     "lora_transformer_single_transformer_blocks_0_attn_to_k.alpha": np.float32(2.0)},
                          name="flat.safetensors"))
    mod = flat.components["transformer"]["single_transformer_blocks.0.attn.to_k"]
    assert mod.scale == pytest.approx(0.5)


def test_diffusers_alpha_keys_and_adapter_metadata(tmp_path):
    down, up = rand(4, 16), rand(16, 4)
    with_alpha = read_lora(save(tmp_path, {"transformer.proj_out.lora_A.weight": down,
                                           "transformer.proj_out.lora_B.weight": up,
                                           "transformer.proj_out.alpha": np.float32(8.0)}))
    assert with_alpha.components["transformer"]["proj_out"].scale == pytest.approx(2.0)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 2,
                                                 "transformer.alpha_pattern": {"^proj_out": 12}})}
    t = {"transformer.proj_out.lora_A.weight": down, "transformer.proj_out.lora_B.weight": up,
         "transformer.single_transformer_blocks.0.proj_out.lora_A.weight": rand(4, 80),
         "transformer.single_transformer_blocks.0.proj_out.lora_B.weight": up}
    st = read_lora(save(tmp_path, t, meta, name="m.safetensors")).components["transformer"]
    assert st["proj_out"].scale == pytest.approx(3.0)
    assert st["single_transformer_blocks.0.proj_out"].scale == pytest.approx(0.5)


# ----------------------------------------------------------------------------- detection and refusals


def test_detection_from_keys_and_metadata():
    assert "double_blocks" in keys.detect(["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], {})
    assert keys.detect(["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"],
                       {"ss_base_model_version": "flux1"}) == "ss_base_model_version=flux1"
    assert keys.detect(["x.lora_up.weight"], {"modelspec.architecture": "flux-1-schnell/lora"}).startswith("modelspec")
    assert keys.detect(["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"],
                       {"ss_base_model_version": "sd_v1"}) == ""
    assert keys.variant_from_metadata({"modelspec.architecture": "flux-1-schnell/lora"}) == "schnell"


def test_schnell_is_kept_when_converting(tmp_path, shapes, flux_keys):
    random_state = flux_keys.random_state
    state = random_state(shapes, paths=["proj_out"])
    state.metadata["modelspec.architecture"] = "flux-1-schnell/lora"
    path = KohyaFormat().write(state, str(tmp_path / "s.safetensors"))
    d = DiffusersFormat().write(read_lora(path), str(tmp_path / "d"))
    assert safetensors_io.read_header(d)[0]["__metadata__"]["modelspec.architecture"] == "flux-1-schnell/lora"


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_flux_file_for_sd_base_and_sd_file_for_flux_base(tmp_path, shapes, flux_keys):
    flux_base = flux_keys.flux_base
    flux_path = save(tmp_path, _kohya_tensors(), name="flux.safetensors")
    sd1 = BaseModelInfo("sd1", {"layers_per_block": 2},
                        {"unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768)}},
                        source="/models/sd15")
    with pytest.raises(LoraError) as e:
        read_lora(flux_path, base=sd1)
    assert "FLUX.1" in one_line(e) and "SD1.x" in one_line(e) and "/models/sd15" in one_line(e)
    sd_path = save(tmp_path, {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                              rand(2, 768),
                              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
                              rand(320, 2)}, name="sd.safetensors")
    with pytest.raises(LoraError) as e:
        read_lora(sd_path, base=flux_base(shapes))
    assert "SD1.x" in one_line(e) and "FLUX.1" in one_line(e)


@pytest.mark.parametrize("key,shape,what", [
    ("lora_unet_img_in.lora_down.weight", (4, 384), "Fill"),
    ("diffusion_model.img_in.lora_A.weight", (4, 128), "Canny/Depth"),
    ("transformer.transformer_blocks.0.attn.norm_q.weight", (8,), "Canny/Depth"),
    ("lora_unet_redux_up.lora_down.weight", (4, 16), "Redux"),
])
def test_flux_variants_are_refused_by_name(tmp_path, key, shape, what):
    t = {key: rand(*shape), "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": rand(2, 16),
         "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": rand(64, 2)}
    with pytest.raises(LoraError) as e:
        read_lora(save(tmp_path, t))
    assert what in one_line(e) and key in one_line(e)


def test_unknown_keys_are_named_not_dropped(tmp_path):
    t = {"lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": rand(2, 16),
         "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": rand(64, 2),
         "lora_unet_double_blocks_0_img_attn_norm_query_norm.lora_down.weight": rand(2, 16)}
    with pytest.raises(LoraError) as e:
        read_lora(save(tmp_path, t))
    assert "img_attn_norm_query_norm" in one_line(e) and "1 key(s)" in one_line(e)


def test_shape_mismatch_with_base_is_one_line(tmp_path, shapes, flux_keys):
    flux_base = flux_keys.flux_base
    t = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": rand(2, 16),
         "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": rand(3 * 24, 2)}
    with pytest.raises(LoraError) as e:
        read_lora(save(tmp_path, t), base=flux_base(shapes))
    assert "double_blocks_0_img_attn_qkv" in one_line(e) and "72 rows" in one_line(e)


def test_lycoris_module_on_a_fused_module_is_refused(tmp_path):
    from mindone_lora_plugin.algorithms import installed_algorithms

    if "loha" not in installed_algorithms():
        pytest.skip("mindone-lora-lycoris is not installed")
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    t = {f"{stem}.hada_w1_a": rand(48, 2), f"{stem}.hada_w1_b": rand(2, 16), f"{stem}.hada_w2_a": rand(48, 2),
         f"{stem}.hada_w2_b": rand(2, 16), f"{stem}.alpha": np.float32(2.0)}
    with pytest.raises(LoraError) as e:
        read_lora(save(tmp_path, t))
    assert stem in one_line(e) and "loha" in one_line(e) and "cannot be split" in one_line(e)
    # and the other way: a LoHa module on to_q cannot be fused into the kohya qkv module
    q = "lora_transformer_transformer_blocks_0_attn_to_q"
    state = read_lora(save(tmp_path, {f"{q}.hada_w1_a": rand(16, 2), f"{q}.hada_w1_b": rand(2, 16),
                                      f"{q}.hada_w2_a": rand(16, 2), f"{q}.hada_w2_b": rand(2, 16)},
                          name="loha.safetensors"))
    with pytest.raises(LoraError) as e:
        KohyaFormat().write(state, str(tmp_path / "out.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv" in one_line(e) and "transformer_blocks.0.attn.to_q" in one_line(e)


def test_hidden_width_is_taken_from_the_down_matrix_without_a_base(flux_keys):
    HIDDEN = flux_keys.HIDDEN
    assert files.part_sizes(keys.bfl_parts("single_blocks_0_linear1"), LoraModule(rand(2, HIDDEN), rand(112, 2), 1.0),
                             None) == [16, 16, 16, 64]
    with pytest.raises(LoraError, match="--base"):
        files.part_sizes(keys.bfl_parts("double_blocks_0_img_attn_qkv"), LoraModule(rand(2, 16), rand(50, 2), 1.0),
                          None)


# ----------------------------------------------------------------------------- as an installed architecture


def test_the_flux_architecture_is_asked_by_the_formats_and_the_reader(tmp_path, shapes, capsys, flux_keys):
    from mindone_lora_plugin.architectures import detect_lora, label
    from mindone_lora_plugin.cli import main
    from mindone_lora_plugin.formats.names import parse_key as sd_parse_key

    random_state = flux_keys.random_state

    assert label("flux") == "FLUX.1"
    state = random_state(shapes, seed=5, paths=[p for p in shapes if p.startswith("single_transformer_blocks.0.")])
    state.architecture = None  # the writers tell FLUX from the components alone
    kohya = KohyaFormat().write(state, str(tmp_path / "k.safetensors"))
    tensors, meta = safetensors_io.load(kohya)
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in tensors
    assert (meta["ss_network_module"], meta["ss_base_model_version"]) == ("networks.lora_flux", "flux1")
    assert meta["modelspec.implementation"] == files.KOHYA_IMPLEMENTATION and "modelspec.prediction_type" not in meta
    tensors["text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"] = rand(2, 8)  # a T5 LoRA too
    found = detect_lora([p for p in map(sd_parse_key, tensors) if p is not None], tensors, {})
    assert found.architecture == "flux" and found.strong
    back = read_lora(kohya)
    assert back.architecture == "flux" and len(back) == 6
    with pytest.raises(LoraError, match=r"is a LoRA for FLUX.1 .* but the base model /sd15 is SD1.x"):
        read_lora(kohya, base=BaseModelInfo("sd1", {"layers_per_block": 2}, {"unet": {}}, source="/sd15"))
    assert main(["inspect", kohya]) == 0
    assert "architecture:  FLUX.1" in capsys.readouterr().out


def test_dora_qkv_round_trips_through_the_kohya_layout(tmp_path):
    parts = ("to_q", "to_k", "to_v")
    state = LoraState(architecture="flux")
    for p in parts:
        state.add("transformer", f"transformer_blocks.0.attn.{p}",
                  _dora(rand(2, 16), rand(16, 2), np.abs(rand(16)) + 1))
    path = KohyaFormat().write(state, str(tmp_path / "dora.safetensors"))
    tensors = safetensors_io.load(path)[0]
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"].shape == (48, 1)  # LyCORIS's output-row shape
    back = read_lora(path).components["transformer"]
    for p in parts:
        base = rand(16, 16)
        want = state.components["transformer"][f"transformer_blocks.0.attn.{p}"].delta(base)
        np.testing.assert_allclose(back[f"transformer_blocks.0.attn.{p}"].delta(base), want, atol=1e-5, err_msg=p)


def test_comfyui_text_encoder_prefixes_and_ai_toolkit_lora_down_under_transformer(tmp_path):
    down, up = rand(2, 8), rand(8, 2)
    got = read_lora(save(tmp_path, {
        "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc2.lora_down.weight": down,
        "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc2.lora_up.weight": up,
        "text_encoders.t5xxl.transformer.encoder.block.2.layer.1.DenseReluDense.wo.lora_down.weight": down,
        "text_encoders.t5xxl.transformer.encoder.block.2.layer.1.DenseReluDense.wo.lora_up.weight": up,
        "transformer.single_transformer_blocks.0.norm.linear.lora_down.weight": rand(2, 16),
        "transformer.single_transformer_blocks.0.norm.linear.lora_up.weight": rand(48, 2),
    }, {"ss_base_model_version": "flux1"}))
    assert sorted((c, p) for c, p, _ in got.modules()) == sorted([
        ("transformer", "single_transformer_blocks.0.norm.linear"),
        ("text_encoder", "text_model.encoder.layers.1.mlp.fc2"),
        ("text_encoder_2", "encoder.block.2.layer.1.DenseReluDense.wo")])


def test_a_comfyui_fused_module_that_does_not_split_is_named(tmp_path):
    t = {"diffusion_model.single_blocks.2.linear1.lora_A.weight": rand(2, 16),
         "diffusion_model.single_blocks.2.linear1.lora_B.weight": rand(40, 2)}  # 3 × 16 rows do not even fit
    with pytest.raises(LoraError) as e:
        read_lora(save(tmp_path, t))
    assert "fused module 'single_blocks_2_linear1'" in one_line(e) and "--base" in one_line(e)


def test_inspect_names_the_kind_of_every_flux_module(shapes):
    """`inspect`'s kinds cover the whole FLUX transformer (no module left as "other")."""
    from collections import Counter

    from mindone_lora_plugin.commands.inspect import module_kind

    kinds = Counter(module_kind("transformer", p, LoraModule(np.zeros((1, s[1]), np.float32),
                                                             np.zeros((s[0], 1), np.float32), 1.0))
                    for p, s in shapes.items())
    assert "other" not in kinds, kinds
    assert {"attn", "ff", "modulation", "embedding", "mlp", "proj"} <= set(kinds)
    assert kinds["attn"] > kinds["ff"]
