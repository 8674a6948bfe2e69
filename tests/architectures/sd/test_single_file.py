"""Single-file SD checkpoints (the original LDM layout A1111/ComfyUI load) as base models (#28): the file, written by
a reference writer checked against Hugging Face diffusers' own converters, reads as the diffusers folder it came
from; dtypes are kept; bad files are one line each; training from the file equals training from the folder."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.model_files import detect_single_file, resolve_model
from tests.architectures.sd.ldm_reference import (
    CLIP_XL,
    OPENCLIP_XL,
    config,
    ldm_unet,
    ldm_vae,
    open_clip,
    weights,
    write_ldm_sd1,
    write_ldm_sdxl,
)

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model

    return ensure_tiny_model("sd1", str(tmp_path_factory.mktemp("models") / "tiny-sd1"))


@pytest.fixture(scope="module")
def ldm_file(tiny, tmp_path_factory) -> str:
    return write_ldm_sd1(tiny, str(tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors"))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDONE_LORA_CACHE", str(tmp_path / "cache"))


def test_the_reference_file_is_what_diffusers_reads_back(tiny, ldm_file):
    torch = pytest.importorskip("torch")
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    ckpt = {k: torch.from_numpy(v) for k, v in load_file(ldm_file).items()}
    read = {"unet": convert_ldm_unet_checkpoint(ckpt, config(tiny, "unet")),
            "vae": convert_ldm_vae_checkpoint(ckpt, config(tiny, "vae")),
            "text_encoder": convert_ldm_clip_checkpoint(ckpt)}
    for comp in COMPONENTS:
        ref = weights(tiny, comp)
        assert set(read[comp]) == set(ref), comp
        for k, v in ref.items():
            np.testing.assert_array_equal(read[comp][k].numpy(), v, err_msg=k)


@pytest.mark.parametrize("dtype", [None, np.float16])
def test_the_file_converts_to_the_folder_it_came_from(tiny, tmp_path, dtype):
    path = write_ldm_sd1(tiny, str(tmp_path / "model.safetensors"), dtype)
    arch, _ = detect_single_file(path)
    assert arch.name == "sd1"
    folder = resolve_model(path, config=tiny)
    assert resolve_model(path, config=tiny) == folder  # cached
    for comp in COMPONENTS:
        ref, got = weights(tiny, comp), weights(folder, comp)
        assert set(got) == set(ref), comp
        for k, v in ref.items():
            assert got[k].dtype == (dtype or v.dtype), k  # kept, no upcast
            np.testing.assert_array_equal(got[k], v.astype(got[k].dtype), err_msg=k)
    from mindone_lora_plugin.base_model_info import BaseModelInfo

    info, ref_info = BaseModelInfo.from_folder(folder), BaseModelInfo.from_folder(tiny)
    assert info.architecture == "sd1" and info.modules == ref_info.modules and info.base_config == ref_info.base_config


def test_vae_override(tiny, ldm_file, tmp_path):
    # another VAE, in the LDM layout with first_stage_model. keys: its weights replace the checkpoint's
    vae = {k: v * 2 for k, v in ldm_vae(weights(tiny, "vae"), config(tiny, "vae")).items()}
    save_file(vae, str(tmp_path / "vae.safetensors"))
    folder = resolve_model(ldm_file, vae=str(tmp_path / "vae.safetensors"), config=tiny)
    got, ref = weights(folder, "vae"), weights(tiny, "vae")
    assert set(got) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(got[k], v * 2, err_msg=k)
    np.testing.assert_array_equal(weights(folder, "unet")["conv_in.weight"], weights(tiny, "unet")["conv_in.weight"])


def _header_file(path, shapes: dict) -> str:
    save_file({k: np.zeros(s, np.float16) for k, s in shapes.items()}, path)
    return path


def test_bad_files_are_one_line_each(tiny, ldm_file, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(LoraError, match="pickle checkpoint.*convert it to .safetensors"):
        resolve_model(str(ckpt), config=tiny)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(ldm_file, "rb").read()[:-1000])
    with pytest.raises(LoraError, match="truncated"):
        resolve_model(str(cut), config=tiny)
    other = _header_file(str(tmp_path / "other.safetensors"), {"double_blocks.0.img_attn.qkv.weight": (6, 2)})
    with pytest.raises(LoraError, match="no single-file checkpoint of an installed model family"):
        resolve_model(other, config=tiny)
    inpaint = _header_file(str(tmp_path / "inpaint.safetensors"),
                           {"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)})
    with pytest.raises(LoraError, match="inpainting"):
        resolve_model(inpaint, config=tiny)
    refiner = _header_file(str(tmp_path / "refiner.safetensors"), {
        "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
        "conditioner.embedders.0.model.text_projection": (4, 4)})
    with pytest.raises(LoraError, match="refiner"):
        resolve_model(refiner, config=tiny)
    with pytest.raises(LoraError, match="--model_config"):
        resolve_model(ldm_file)
    for err in (LoraError,):
        with pytest.raises(err, match="does not exist"):
            resolve_model(str(tmp_path / "missing.safetensors"))


def test_families_are_told_apart_by_their_keys(tmp_path):
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 1, 1)}
    files = {"sd1": {**unet, "cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,)},
             "sd2": {**unet, "cond_stage_model.model.ln_final.weight": (4,)},
             "sdxl": {**unet, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (4,),
                      "conditioner.embedders.1.model.ln_final.weight": (4,)}}
    for name, shapes in files.items():
        arch, _ = detect_single_file(_header_file(str(tmp_path / f"{name}.safetensors"), shapes))
        assert arch.name == name


def test_unet_keys_map_to_the_folder_names(tiny):
    from mindone_lora_plugin.architectures.sd.single_file import unet_map

    ldm = ldm_unet(weights(tiny, "unet"), config(tiny, "unet"))
    mapping = unet_map(ldm, config(tiny, "unet")["layers_per_block"])
    assert set(mapping) == set(weights(tiny, "unet"))


def _train(model, data, out, *extra):
    from mindone_lora_plugin.cli import COMMANDS, build_parser
    from mindone_lora_plugin.train.trainer import Trainer

    argv = ["train", "--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--max_train_steps", "3", "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--seed", "5", "--report_to", "none", "--device_target", "CPU", "--checkpointing_steps", "0",
            "--output_name", "lora", "--save_formats", "kohya,diffusers", *extra]
    return Trainer(build_parser({"train": COMMANDS["train"]}).parse_args(argv)).run()


def test_training_from_the_file_equals_training_from_the_folder(tiny, ldm_file, tmp_path):
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    data = make_shapes_dataset(str(tmp_path / "shapes"), size=8, repeats=1)
    a = _train(tiny, data, str(tmp_path / "folder"))
    b = _train(ldm_file, data, str(tmp_path / "file"), "--model_config", tiny)
    assert len(a.losses) == 3 and a.losses == b.losses
    assert [os.path.basename(f) for f in a.files] == [os.path.basename(f) for f in b.files]
    for fa, fb in zip(a.files, b.files):
        ta, tb = load_file(fa), load_file(fb)
        assert set(ta) == set(tb) and ta
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def test_header_lengths_are_checked_before_anything_is_read(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**12) + json.dumps({}).encode())
    with pytest.raises(LoraError, match="not a safetensors file or is truncated"):
        detect_single_file(str(bad))


def test_sdxl_file_converts_as_diffusers_reads_it(tmp_path):
    torch = pytest.importorskip("torch")
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model
    from mindone_lora_plugin.base_model_info import BaseModelInfo

    tiny_xl = ensure_tiny_model("sdxl", str(tmp_path / "tiny-sdxl"))
    path = write_ldm_sdxl(tiny_xl, str(tmp_path / "xl.safetensors"))
    ckpt = {k: torch.from_numpy(v) for k, v in load_file(path).items()}
    read = {"unet": convert_ldm_unet_checkpoint(ckpt, config(tiny_xl, "unet")),
            "vae": convert_ldm_vae_checkpoint(ckpt, config(tiny_xl, "vae")),
            "text_encoder": convert_ldm_clip_checkpoint(ckpt, remove_prefix=CLIP_XL),
            "text_encoder_2": convert_open_clip_checkpoint(None, ckpt, prefix=OPENCLIP_XL)}
    assert detect_single_file(path)[0].name == "sdxl"
    folder = resolve_model(path, config=tiny_xl)
    for comp, by_diffusers in read.items():
        ref, got = weights(tiny_xl, comp), weights(folder, comp)
        assert set(by_diffusers) == set(ref) == set(got), comp
        for k, v in ref.items():
            np.testing.assert_array_equal(by_diffusers[k].numpy(), v, err_msg=k)  # the reference file is right
            np.testing.assert_array_equal(got[k], v, err_msg=k)  # and the package reads it as diffusers does
    assert BaseModelInfo.from_folder(folder).architecture == "sdxl"


def test_sd2_open_clip_text_encoder_converts(tiny, tmp_path):
    # SD2.x files hold OpenCLIP under cond_stage_model.model. (no projection); the tiny SD1 encoder stands in
    sd = ldm_unet(weights(tiny, "unet"), config(tiny, "unet"))
    sd.update(ldm_vae(weights(tiny, "vae"), config(tiny, "vae")))
    sd.update(open_clip(weights(tiny, "text_encoder"), "cond_stage_model.model."))
    save_file(sd, str(tmp_path / "sd2.safetensors"))
    assert detect_single_file(str(tmp_path / "sd2.safetensors"))[0].name == "sd2"
    folder = resolve_model(str(tmp_path / "sd2.safetensors"), config=tiny)
    ref, got = weights(tiny, "text_encoder"), weights(folder, "text_encoder")
    assert set(ref) == set(got)
    for k, v in ref.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_generate_and_convert_take_the_file(tiny, ldm_file, tmp_path):
    from PIL import Image

    from mindone_lora_plugin.cli import main

    images = {}
    for name, model in (("folder", [tiny]), ("file", [ldm_file, "--model_config", tiny])):
        out = tmp_path / name
        assert main(["generate", "--model", *model, "--prompt", "a red circle", "--steps", "2", "--seed", "4",
                     "--height", "32", "--width", "32", "--device_target", "CPU", "--out", str(out)]) == 0
        pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
        images[name] = [np.asarray(Image.open(out / p)) for p in pngs]
    assert len(images["file"]) == len(images["folder"]) >= 1
    for a, b in zip(images["file"], images["folder"]):
        np.testing.assert_array_equal(a, b)
    # a file name without an extension is a file too; a missing config is one line
    bare = tmp_path / "bare"
    bare.write_bytes(open(ldm_file, "rb").read())
    with pytest.raises(LoraError, match="--model_config"):
        resolve_model(str(bare))


def test_a_config_of_another_model_is_one_line(ldm_file, tmp_path):
    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model

    tiny_xl = ensure_tiny_model("sdxl", str(tmp_path / "tiny-sdxl"))
    with pytest.raises(LoraError, match="does not fit .*cross-attention width is 64, the file's 32"):
        resolve_model(ldm_file, config=tiny_xl)


def test_single_file_options_are_checked(tiny, ldm_file, tmp_path):
    with pytest.raises(LoraError, match="--vae applies to a single-file checkpoint"):
        resolve_model(tiny, vae=ldm_file)
    with pytest.raises(LoraError, match="--model_config .* is not a folder"):
        resolve_model(ldm_file, config=str(tmp_path / "missing"))
    with pytest.raises(LoraError, match="--vae .* is not a file"):
        resolve_model(ldm_file, vae=str(tmp_path / "missing.safetensors"), config=tiny)


def test_convert_checks_a_lora_against_the_file(tiny, ldm_file, tmp_path, capsys):
    from mindone_lora_plugin import compose
    from mindone_lora_plugin.cli import main
    from mindone_lora_plugin.state import LoraModule, LoraState

    state = LoraState(architecture="sd1")
    state.add("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
              LoraModule(np.ones((2, 64), np.float32), np.ones((64, 2), np.float32), 2.0))
    good = compose.write_lora(state, str(tmp_path / "good.safetensors"), format="kohya")
    assert main(["convert", good, "--to", "diffusers", "--base", ldm_file, "--model_config", tiny,
                 str(tmp_path / "out")]) == 0
    state = LoraState(architecture="sd1")
    state.add("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
              LoraModule(np.ones((2, 48), np.float32), np.ones((64, 2), np.float32), 2.0))
    bad = compose.write_lora(state, str(tmp_path / "bad.safetensors"), format="kohya")
    assert main(["convert", bad, "--to", "diffusers", "--base", ldm_file, "--model_config", tiny,
                 str(tmp_path / "out2")]) != 0
    assert "shape mismatch" in capsys.readouterr().err


def test_conversion_streams_tensor_by_tensor(tiny, ldm_file, tmp_path):
    """Memory allocated while converting stays well below the file's size: tensors are read from a memory map and
    written one at a time (numpy reports its allocations to tracemalloc; the memory map is the page cache)."""
    import tracemalloc

    resolve_model(ldm_file, config=tiny)  # imports and first-call allocations out of the way
    path = write_ldm_sd1(tiny, str(tmp_path / "model.safetensors"), np.float16)
    tracemalloc.start()
    try:
        resolve_model(path, config=tiny)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < os.path.getsize(path) // 3, (peak, os.path.getsize(path))
