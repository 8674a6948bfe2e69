"""The reader's format choice: built-ins, third-party formats, folders, explicit formats."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.base import LoraFormat
from mindone_lora_plugin.formats.kohya import KohyaFormat
from mindone_lora_plugin.formats.reader import builtin_formats, detect_format, get_format, open_lora, read_lora
from mindone_lora_plugin.state import LoraModule, LoraState


def one_module_state():
    st = LoraState(architecture="sd1")
    st.add("unet", "down_blocks.1.attentions.0.proj_in",
           LoraModule(np.ones((2, 64, 1, 1), np.float32), np.ones((64, 2, 1, 1), np.float32), 1.0))
    return st


class WeirdFormat(LoraFormat):
    """A third-party single-file format with its own key naming."""

    name = "weird"
    description = "test"

    def sniff(self, keys, metadata):
        return all(k.startswith("weird/") for k in keys)

    def read(self, path, base=None):
        return one_module_state()


class FolderFormat(LoraFormat):
    name = "folder"
    description = "test"

    def sniff(self, keys, metadata):
        return False

    def sniff_folder(self, path):
        import os

        return os.path.isfile(os.path.join(path, "folder.json"))

    def read(self, path, base=None):
        return one_module_state()


class GreedyBrokenFormat(LoraFormat):
    name = "greedy"
    description = "test"

    def sniff(self, keys, metadata):
        raise RuntimeError("bug in a plugin")


def test_third_party_file_format(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file({"weird/a": np.ones(2, np.float32)}, str(p))
    formats = builtin_formats() + [WeirdFormat(), GreedyBrokenFormat()]
    lf = open_lora(str(p), formats=formats)
    assert lf.format.name == "weird" and len(lf.state) == 1
    with pytest.raises(LoraError, match="no known LoRA format"):
        read_lora(str(p))  # built-ins only


def test_builtins_first_and_broken_sniff_ignored(tmp_path, sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    p = KohyaFormat().write(random_state(tiny_sd1(), conv=False), str(tmp_path / "k.safetensors"))
    lf = open_lora(p, formats={"greedy": GreedyBrokenFormat(), **{f.name: f for f in builtin_formats()}})
    assert lf.format.name == "kohya"


def test_folder_format(tmp_path):
    (tmp_path / "folder.json").write_text("{}")
    lf = open_lora(str(tmp_path), formats=builtin_formats() + [FolderFormat()])
    assert lf.format.name == "folder"
    lf = open_lora(str(tmp_path), format="folder", formats=builtin_formats() + [FolderFormat()])
    assert lf.format.name == "folder"


def test_explicit_format_and_lookup(tmp_path, sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    p = KohyaFormat().write(random_state(tiny_sd1(), conv=False), str(tmp_path / "k.safetensors"))
    assert open_lora(p, format="diffusers").format.name == "diffusers"  # any plain naming reads
    with pytest.raises(LoraError, match="unknown LoRA format 'npz'; choose one of: diffusers, kohya"):
        get_format("npz")


def test_detect_format():
    kohya, diffusers = ["lora_unet_a_b.lora_down.weight"], ["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"]
    assert detect_format(kohya, {}).name == "kohya"
    assert detect_format(diffusers, {}).name == "diffusers"
    assert detect_format(["diffusion_model.input_blocks.4.1.proj_in.lora_up.weight"], {}).name == "kohya"
    assert detect_format(["x.y"], {"lora_adapter_metadata": "{}"}).name == "diffusers"
    assert detect_format(["x.y"], {}) is None
