"""The formats against the real tiny model folders (``mindone_lora_plugin.architectures.sd.tiny``, built once per test
session)."""

import numpy as np
import pytest

from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.cli import main
from mindone_lora_plugin.formats.diffusers import DiffusersFormat
from mindone_lora_plugin.formats.kohya import KohyaFormat
from mindone_lora_plugin.formats.reader import read_lora


@pytest.fixture(scope="module")
def folders(tiny_sd1, tiny_sdxl):
    return {"sd1": tiny_sd1, "sdxl": tiny_sdxl}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_synthetic_layout_matches_the_tiny_folder(folders, arch, sd_fakes):
    """The synthetic module lists the other format tests use are the tiny models' real ones."""
    tiny_sd1, tiny_sdxl = sd_fakes.tiny_sd1, sd_fakes.tiny_sdxl
    real = BaseModelInfo.from_folder(folders[arch])
    synthetic = tiny_sd1() if arch == "sd1" else tiny_sdxl()
    assert real.architecture == synthetic.architecture
    assert real.base_config == synthetic.base_config
    assert real.modules == synthetic.modules


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_convert_with_real_base(tmp_path, capsys, folders, arch, sd_fakes):
    assert_states_equal, random_state = sd_fakes.assert_states_equal, sd_fakes.random_state
    base = BaseModelInfo.from_folder(folders[arch])
    state = random_state(base, np.random.default_rng(0))
    src = DiffusersFormat().write(state, str(tmp_path / "d"))
    out = tmp_path / "k.safetensors"
    assert main(["convert", src, str(out), "--to", "kohya", "--base", folders[arch]]) == 0
    assert_states_equal(state, read_lora(str(out), base=base))
    other = folders["sdxl" if arch == "sd1" else "sd1"]
    assert main(["convert", str(out), str(tmp_path / "x"), "--to", "diffusers", "--base", other]) == 2
    assert "is a LoRA for" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bf16_files_with_mindspore_imported(tmp_path, sd_fakes):
    """MindSpore registers its own numpy bfloat16, which safetensors then returns; reading and casting still work."""
    import ml_dtypes

    random_state, tiny_sdxl = sd_fakes.random_state, sd_fakes.tiny_sdxl

    pytest.importorskip("mindspore")
    import mindspore  # noqa: F401

    from mindone_lora_plugin import safetensors_io

    state = random_state(tiny_sdxl(), np.random.default_rng(5), conv=False)
    src = KohyaFormat().write(state, str(tmp_path / "bf16.safetensors"), dtype="bf16")
    got = read_lora(src)
    assert got.dtype() == "bfloat16"
    for comp, p, m in got.modules():
        assert m.down.dtype == np.dtype(ml_dtypes.bfloat16)
    for dtype, fmt, out in (("bf16", KohyaFormat(), "k.safetensors"), ("fp16", KohyaFormat(), "h.safetensors"),
                            (None, DiffusersFormat(), "d"), ("fp32", DiffusersFormat(), "f")):
        path = fmt.write(got, str(tmp_path / out), dtype=dtype)
        tensors, _ = safetensors_io.load(path)
        want = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", None: "bfloat16"}[dtype]
        assert {t.dtype.name for k, t in tensors.items() if not k.endswith(".alpha")} == {want}
        assert {t.dtype.name for k, t in tensors.items() if k.endswith(".alpha")} <= {"float32"}  # kohya: float32
        back = read_lora(path)
        for comp, p, m in got.modules():
            np.testing.assert_allclose(back.components[comp][p].up.astype(np.float32), m.up.astype(np.float32))
