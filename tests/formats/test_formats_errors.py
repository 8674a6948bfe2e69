"""Bad input: each ends in one clear line (exit status 2 from the CLI) and nothing is written."""

import os
import pickle
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from mindone_lora_plugin.cli import main
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.diffusers import DiffusersFormat
from mindone_lora_plugin.formats.kohya import KohyaFormat
from mindone_lora_plugin.formats.reader import read_lora


@pytest.fixture(scope="module")
def models(tmp_path_factory, sd_fakes):
    fake_model_folder, tiny_sd1, tiny_sdxl = sd_fakes.fake_model_folder, sd_fakes.tiny_sd1, sd_fakes.tiny_sdxl
    root = tmp_path_factory.mktemp("models")
    return {"sd1": fake_model_folder(tiny_sd1(), root / "sd1"), "sdxl": fake_model_folder(tiny_sdxl(), root / "sdxl")}


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd_fakes):
    random_state, tiny_sd1, tiny_sdxl = sd_fakes.random_state, sd_fakes.tiny_sd1, sd_fakes.tiny_sdxl
    root = tmp_path_factory.mktemp("loras")
    sd1 = random_state(tiny_sd1(), np.random.default_rng(0))
    sdxl = random_state(tiny_sdxl(), np.random.default_rng(1))
    return {"sd1_kohya": KohyaFormat().write(sd1, str(root / "sd1.safetensors")),
            "sdxl_kohya": KohyaFormat().write(sdxl, str(root / "sdxl.safetensors")),
            "sd1_diffusers": DiffusersFormat().write(sd1, str(root / "sd1_d")),
            "sdxl_diffusers": DiffusersFormat().write(sdxl, str(root / "sdxl_d"))}


def convert_fails(capsys, tmp_path, *argv, match):
    """Run ``mindone-lora convert`` expecting exit 2, one stderr line matching ``match``, and no output written."""
    out = tmp_path / "out"
    before = set(os.listdir(tmp_path))
    rc = main(["convert", *[str(a) for a in argv], str(out / "x.safetensors"), "--to", "kohya"]
              if "--to" not in argv else ["convert", *[str(a) for a in argv]])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mindone-lora: error: ")
    assert re.search(match, lines[0]), lines[0]
    assert set(os.listdir(tmp_path)) == before
    return lines[0]


def test_empty_file(tmp_path, capsys):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    convert_fails(capsys, tmp_path, p, match="empty")


def test_truncated_file(tmp_path, capsys, files):
    data = open(files["sd1_kohya"], "rb").read()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[: len(data) // 2])
    convert_fails(capsys, tmp_path, p, match="truncated")
    p.write_bytes(data[:20])
    convert_fails(capsys, tmp_path, p, match="truncated|not a safetensors")


def test_not_safetensors(tmp_path, capsys):
    p = tmp_path / "notes.safetensors"
    p.write_text("this is a text file, not a LoRA at all\n" * 3)
    convert_fails(capsys, tmp_path, p, match="not a safetensors file")


def test_garbage_header(tmp_path, capsys):
    p = tmp_path / "garbage.safetensors"
    body = b"{this is not json}"
    p.write_bytes(len(body).to_bytes(8, "little") + body)
    convert_fails(capsys, tmp_path, p, match="garbage")


def test_folder_without_weights(tmp_path, capsys):
    d = tmp_path / "empty_dir"
    d.mkdir()
    (d / "README.txt").write_text("hi")
    convert_fails(capsys, tmp_path, d, match="no LoRA weights file")


def test_pickle_files(tmp_path, capsys):
    p = tmp_path / "lora.ckpt"
    p.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    convert_fails(capsys, tmp_path, p, match="pickle")
    disguised = tmp_path / "lora_pickle.safetensors"
    disguised.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": [1.0]}, protocol=2))
    convert_fails(capsys, tmp_path, disguised, match="pickle")
    d = tmp_path / "bin_dir"
    d.mkdir()
    (d / "pytorch_lora_weights.bin").write_bytes(pickle.dumps({}))
    convert_fails(capsys, tmp_path, d, match="pickle")


@pytest.mark.parametrize("lora,base,match", [
    ("sd1_kohya", "sdxl", r"is a LoRA for SD1\.x .* base model .* is SDXL"),
    ("sdxl_kohya", "sd1", r"is a LoRA for SDXL .* base model .* is SD1\.x"),
    ("sd1_diffusers", "sdxl", r"is a LoRA for SD1\.x .* is SDXL"),
    ("sdxl_diffusers", "sd1", r"is a LoRA for SDXL .* is SD1\.x"),
])
def test_other_architecture(tmp_path, capsys, files, models, lora, base, match):
    convert_fails(capsys, tmp_path, files[lora], "--base", models[base], match=match)


def test_other_architecture_without_metadata(tmp_path, files, sd_fakes):
    """No metadata at all: the keys and shapes still refuse the wrong base."""
    from mindone_lora_plugin import safetensors_io

    tiny_sd1, tiny_sdxl = sd_fakes.tiny_sd1, sd_fakes.tiny_sdxl

    for lora, base, match in (("sdxl_kohya", tiny_sd1(), "SDXL"), ("sd1_kohya", tiny_sdxl(), "shape mismatch")):
        tensors, _ = safetensors_io.load(files[lora])
        p = tmp_path / f"{lora}_nometa.safetensors"
        save_file(tensors, str(p))
        with pytest.raises(LoraError, match=match):
            read_lora(str(p), base=base)
    tensors, _ = safetensors_io.load(files["sdxl_diffusers"])
    unet_only = {k: v for k, v in tensors.items() if k.startswith("unet.")}
    save_file(unet_only, str(tmp_path / "xl_unet.safetensors"))
    with pytest.raises(LoraError, match="match no module of the sd1 base model"):
        read_lora(str(tmp_path / "xl_unet.safetensors"), base=tiny_sd1())


def test_shape_mismatch(tmp_path, capsys, models, sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    state = random_state(tiny_sd1(), np.random.default_rng(2), conv=False)
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    m = state.components["unet"][path]
    m.down = np.zeros((m.rank, 48), np.float32)
    p = KohyaFormat().write(state, str(tmp_path / "bad_shape.safetensors"))
    line = convert_fails(capsys, tmp_path, p, "--base", models["sd1"], match="shape mismatch")
    assert f"unet.{path}" in line and "[64, 32]" in line and "[64, 48]" in line


def _variant_file(tmp_path, name, tensors):
    p = tmp_path / f"{name}.safetensors"
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(p))
    return p


VARIANTS = {
    "loha": ({"lora_unet_a.hada_w1_a": np.ones((4, 2)), "lora_unet_a.hada_w1_b": np.ones((2, 4)),
              "lora_unet_a.hada_w2_a": np.ones((4, 2)), "lora_unet_a.hada_w2_b": np.ones((2, 4)),
              "lora_unet_a.alpha": np.array(1.0)}, "LoHa"),
    "lokr": ({"lora_unet_a.lokr_w1": np.ones((2, 2)), "lora_unet_a.lokr_w2": np.ones((2, 2))}, "LoKr"),
    "locon_cp": ({"lora_unet_a.lora_down.weight": np.ones((4, 8, 1, 1)), "lora_unet_a.lora_mid.weight":
                  np.ones((4, 4, 3, 3)), "lora_unet_a.lora_up.weight": np.ones((8, 4, 1, 1))}, "lora_mid"),
    "ia3": ({"lora_unet_a.weight": np.ones(4), "lora_unet_a.on_input": np.array(1.0)}, r"\(IA\)\^3"),
    "glora": ({"lora_unet_a.a1.weight": np.ones((2, 2)), "lora_unet_a.a2.weight": np.ones((2, 2)),
               "lora_unet_a.b1.weight": np.ones((2, 2)), "lora_unet_a.b2.weight": np.ones((2, 2))}, "GLoRA"),
    "full": ({"lora_unet_a.diff": np.ones((4, 4)), "lora_unet_a.diff_b": np.ones(4)}, "full weight difference"),
    "norm": ({"lora_unet_a_norm1.w_norm": np.ones(4), "lora_unet_a_norm1.b_norm": np.ones(4)}, "norm"),
    "oft": ({"oft_unet_a.oft_blocks": np.ones((4, 2, 2))}, "OFT"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lycoris_variants_refused(tmp_path, capsys, monkeypatch, variant):
    """Algorithms no installed plugin reads are refused by name (LoHa/LoKr: without the lycoris plugin; DoRA is read
    by the built-in lora algorithm, see test_dora.py)."""
    from mindone_lora_plugin.plugins import reset_plugin_manager

    monkeypatch.setenv("MINDONE_LORA_PLUGINS", "none")
    reset_plugin_manager()
    monkeypatch.setattr("mindone_lora_plugin.plugins._MANAGER", None)
    tensors, name = VARIANTS[variant]
    p = _variant_file(tmp_path, variant, tensors)
    line = convert_fails(capsys, tmp_path, p, match=name)
    assert "no installed plugin" in line
    assert main(["inspect", str(p)]) == 2
    assert "no installed plugin" in capsys.readouterr().err


def test_unknown_key_prefixes(tmp_path, capsys):
    p = _variant_file(tmp_path, "alien", {"model.layers.0.q.lora_A.weight": np.ones((2, 4)),
                                          "model.layers.0.q.lora_B.weight": np.ones((4, 2))})
    convert_fails(capsys, tmp_path, p, match=r"no known LoRA format.*'model\.layers\.0\.q\.lora_A\.weight'")
    p = _variant_file(tmp_path, "mixed", {
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": np.ones((2, 64)),
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": np.ones((64, 2)),
        "vae.encoder.conv.lora_down.weight": np.ones((2, 4)), "something_else": np.ones(2)})
    line = convert_fails(capsys, tmp_path, p, match=r"2 key\(s\) are not plain-LoRA weights")
    assert "vae.encoder.conv.lora_down.weight" in line and "something_else" in line


def test_no_tensors(tmp_path, capsys):
    p = tmp_path / "meta_only.safetensors"
    save_file({}, str(p), metadata={"ss_output_name": "x"})
    convert_fails(capsys, tmp_path, p, match="holds no tensors")


@pytest.mark.parametrize("out", ["blocker/x.safetensors", "lora.ckpt"])
def test_unwritable_out(tmp_path, capsys, files, out):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    before = sorted(os.listdir(tmp_path))
    rc = main(["convert", files["sd1_kohya"], str(tmp_path / out), "--to", "diffusers"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "cannot write" in err[0] or "must be a .safetensors file or a folder" in err[0]
    assert sorted(os.listdir(tmp_path)) == before


def test_missing_input_and_bad_base(tmp_path, capsys, files):
    convert_fails(capsys, tmp_path, tmp_path / "nope.safetensors", match="does not exist")
    convert_fails(capsys, tmp_path, files["sd1_kohya"], "--base", tmp_path, match="model_index.json")


def test_unknown_target_format(tmp_path, capsys, files):
    rc = main(["convert", files["sd1_kohya"], str(tmp_path / "o.safetensors"), "--to", "ckpt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "diffusers" in err[0] and "kohya" in err[0]
    assert not (tmp_path / "o.safetensors").exists()
