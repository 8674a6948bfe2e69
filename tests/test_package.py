"""The package itself: metadata, a light CLI start, and deterministic tiny models."""

from __future__ import annotations

import configparser
import hashlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_requirements_and_entry_points_in_setup_cfg():
    """The console script; the built-in plugins are listed in code (builtin_plugins.py), not as entry points, so
    setup.cfg has no ``mindone_lora`` group of its own. (The MindSpore/mindone/transformers/numpy ranges and the
    pinned stack: tests/runtime/test_environment.py.)"""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    requires = cfg["options"]["install_requires"]
    for pin in ("mindspore>=", "mindone>=", "transformers>=", "numpy>=1.26,<2", "pyarrow>=21,<22",
                "datasets", "safetensors", "pluggy", "ml_dtypes", "tqdm", "pillow", "packaging"):
        assert pin in requires, pin
    assert "torch==2.13.0" in cfg["options.extras_require"]["interop"]
    eps = cfg["options.entry_points"]
    assert "mindone-lora = mindone_lora_plugin.cli:entry" in eps["console_scripts"]
    assert "mindone_lora" not in eps


def test_cli_help_does_not_import_mindspore():
    code = ("import sys\nfrom mindone_lora_plugin.cli import main\n"
            "rc = main(['--help'])\nassert 'mindspore' not in sys.modules and 'mindone' not in sys.modules, rc\n"
            "print('light', rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "light 0" in out.stdout, out.stderr
    assert "train" in out.stdout and "convert" in out.stdout


def test_the_command_keeps_transformers_from_importing_torch():
    """``mindone-lora`` sets USE_TORCH=0 unless the environment sets it (transformers would import an installed torch
    at start-up: seconds and hundreds of MiB that nothing the command runs uses)."""
    pytest.importorskip("torch")
    code = ("import sys\nfrom mindone_lora_plugin.cli import entry\nentry(['--version'])\nimport transformers.utils\n"
            "print('torch' in sys.modules)")
    base = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    for extra, imported in (({}, "False"), ({"USE_TORCH": "1"}, "True")):  # the user's own setting wins
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env=dict(base, **extra))
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-1] == imported, (extra, out.stdout)


def _digest(folder: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_building_the_tiny_model_twice_gives_identical_files(tiny_sd1, tmp_path):
    from mindone_lora_plugin.architectures.sd.tiny import save_tiny_model

    again = save_tiny_model("sd1", str(tmp_path / "again"))
    first, second = _digest(tiny_sd1), _digest(again)
    assert "unet/diffusion_pytorch_model.safetensors" in first
    assert first == second


def test_generated_tokenizer_knows_the_demo_words(tmp_path):
    from mindone_lora_plugin.demo.tiny import build_tokenizer

    tok = build_tokenizer(str(tmp_path / "tok"))
    ids = tok("a red circle")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 5  # bos, three whole-word tokens, eos
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red circle"


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_tiny_folders_load_in_hugging_face_libraries(kind, tiny_sd1, tiny_sdxl):
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    folder = tiny_sd1 if kind == "sd1" else tiny_sdxl
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    te = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    assert unet.config.block_out_channels == [32, 64] or tuple(unet.config.block_out_channels) == (32, 64)
    assert te.config.hidden_size == 32
