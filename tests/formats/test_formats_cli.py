"""``mindone-lora convert`` and ``mindone-lora inspect``: behaviour, exit codes and output."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from mindone_lora_plugin import safetensors_io
from mindone_lora_plugin.cli import main
from mindone_lora_plugin.commands import convert, inspect
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.diffusers import DiffusersFormat
from mindone_lora_plugin.formats.kohya import KohyaFormat
from mindone_lora_plugin.formats.reader import read_lora

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(*argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    convert.add_parser(sub)
    inspect.add_parser(sub)
    return parser.parse_args([str(a) for a in argv])


@pytest.fixture(scope="module")
def sdxl_state(sd_fakes):
    random_state, tiny_sdxl = sd_fakes.random_state, sd_fakes.tiny_sdxl
    return random_state(tiny_sdxl(), np.random.default_rng(11))


@pytest.fixture(scope="module")
def sdxl_kohya(tmp_path_factory, sdxl_state):
    return KohyaFormat().write(sdxl_state, str(tmp_path_factory.mktemp("k") / "style.safetensors"),
                               metadata={"ss_learning_rate": "0.0001"}, output_name="style")


@pytest.mark.smoke
def test_convert_kohya_to_diffusers_folder(tmp_path, capsys, sdxl_state, sdxl_kohya, sd_fakes):
    assert_states_equal = sd_fakes.assert_states_equal
    assert convert.run(parse("convert", sdxl_kohya, tmp_path / "out", "--to", "diffusers")) == 0
    written = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    assert str(written) in capsys.readouterr().out
    assert_states_equal(sdxl_state, read_lora(str(written)))
    meta = safetensors_io.read_metadata(str(written))
    assert meta["ss_learning_rate"] == "0.0001" and "sshs_model_hash" not in meta


def test_convert_diffusers_to_kohya_file_with_base_and_dtype(tmp_path, sdxl_state, sd_fakes):
    assert_states_equal = sd_fakes.assert_states_equal
    fake_model_folder = sd_fakes.fake_model_folder
    tiny_sdxl = sd_fakes.tiny_sdxl
    DiffusersFormat().write(sdxl_state, str(tmp_path / "d"))
    model = fake_model_folder(tiny_sdxl(), tmp_path / "model")
    out = tmp_path / "converted.safetensors"
    assert convert.run(parse("convert", tmp_path / "d", out, "--to", "kohya", "--base", model, "--dtype",
                             "fp16")) == 0
    tensors, meta = safetensors_io.load(str(out))
    assert {t.dtype.name for k, t in tensors.items() if not k.endswith(".alpha")} == {"float16"}
    assert {t.dtype.name for k, t in tensors.items() if k.endswith(".alpha")} == {"float32"}  # exact alphas
    assert meta["ss_output_name"] == "converted" and meta["modelspec.title"] == "converted"
    got = read_lora(str(out), base=tiny_sdxl())
    assert_states_equal(sdxl_state.astype(np.float16), got, exact=False)
    for comp, p, m in sdxl_state.modules():
        assert got.components[comp][p].rank == m.rank
        assert got.components[comp][p].alpha == float(np.float32(m.alpha))


def test_convert_into_existing_folder_uses_input_name(tmp_path, sdxl_kohya):
    (tmp_path / "dest").mkdir()
    assert convert.run(parse("convert", sdxl_kohya, tmp_path / "dest", "--to", "kohya")) == 0
    assert os.listdir(tmp_path / "dest") == ["style.safetensors"]


def test_convert_unknown_architecture_needs_base(tmp_path, sd_fakes):
    """Attention-only tiny SD1 LoRA without metadata: nothing tells SD1 from SDXL."""
    fake_model_folder, random_state, tiny_sd1 = sd_fakes.fake_model_folder, sd_fakes.random_state, sd_fakes.tiny_sd1
    base = tiny_sd1()
    st = random_state(base, conv=False, components=("unet",))
    tensors = {}
    for comp, p, m in st.modules():
        if ".transformer_blocks." in p:
            tensors[f"unet.{p}.lora_A.weight"] = m.down
            tensors[f"unet.{p}.lora_B.weight"] = m.up
    src = tmp_path / "bare.safetensors"
    save_file(tensors, str(src))
    assert read_lora(str(src)).architecture is None
    with pytest.raises(LoraError, match="SD1.x, SD2.x or SDXL.*--base MODEL_DIR"):
        convert.run(parse("convert", src, tmp_path / "k.safetensors", "--to", "kohya"))
    assert not (tmp_path / "k.safetensors").exists()
    # the diffusers format does not depend on it
    assert convert.run(parse("convert", src, tmp_path / "d", "--to", "diffusers")) == 0
    model = fake_model_folder(base, tmp_path / "model")
    assert convert.run(parse("convert", src, tmp_path / "k.safetensors", "--to", "kohya", "--base", model)) == 0
    assert safetensors_io.read_metadata(str(tmp_path / "k.safetensors"))["ss_base_model_version"] == "sd_v1"


@pytest.mark.smoke
def test_inspect_json(capsys, sdxl_kohya, sdxl_state):
    assert inspect.run(parse("inspect", sdxl_kohya, "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["format", "architecture", "components", "dtype", "metadata"]
    assert out["format"] == "kohya" and out["architecture"] == "sdxl" and out["dtype"] == "float32"
    assert list(out["components"]) == ["unet", "text_encoder", "text_encoder_2"]
    for comp, info in out["components"].items():
        mods = sdxl_state.components[comp]
        assert set(info) == {"modules", "algorithms", "ranks", "alphas"}
        assert info["modules"] == len(mods)
        assert info["ranks"] == sorted({m.rank for m in mods.values()})
        assert info["alphas"] == sorted({float(m.alpha) for m in mods.values()})
    assert out["metadata"]["ss_output_name"] == "style"


def test_inspect_text(capsys, sdxl_kohya):
    assert inspect.run(parse("inspect", sdxl_kohya)) == 0
    text = capsys.readouterr().out
    assert "format:        kohya" in text and "SGM" in text
    assert "architecture:  SDXL" in text
    assert "vary" in text and "conv3x3" in text and "attn" in text and "ff" in text
    assert "ss_output_name: style" in text


def test_inspect_uniform(tmp_path, capsys, sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    st = random_state(tiny_sd1(), vary=False, conv=False, ranks=(4,), alphas=(1.0,))
    p = KohyaFormat().write(st, str(tmp_path / "u.safetensors"))
    assert main(["inspect", p]) == 0
    text = capsys.readouterr().out
    assert "rank 4  alpha 1  kinds" in text and "vary" not in text


def test_cli_exit_codes(tmp_path, capsys, sdxl_kohya):
    assert main(["inspect", sdxl_kohya, "--json"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    try:  # an argparse error
        rc = main(["convert", sdxl_kohya, str(tmp_path / "x.safetensors"), "--to", "kohya", "--dtype", "fp8"])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_subprocess(tmp_path, sdxl_kohya):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "mindone_lora_plugin", "inspect", sdxl_kohya, "--json"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["architecture"] == "sdxl"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    r = subprocess.run([sys.executable, "-m", "mindone_lora_plugin", "convert", str(bad), str(tmp_path / "o"), "--to",
                        "diffusers"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "too short" in r.stderr
    assert not (tmp_path / "o").exists()
