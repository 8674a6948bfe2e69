"""FLUX.1 kohya files written from half-precision diffusers files are exact where modules are fused (issue #33), the
FLUX reader takes peft's ``….lora_magnitude_vector.weight`` DoRA keys, and ``inspect`` says when a diffusers file
will load at the wrong strength in ComfyUI.

A fused kohya module (``…_attn_qkv``, ``single_blocks_N_linear1``) has one alpha for parts whose scales differ: the
writer folds the ratios into the fused ``up`` and the fused alpha is ``scale × total rank``. In float16/bfloat16 both
round (alpha 70.21875 was written as 70.25; folds were off by ~2e-4): here the effective weight change of every
module of the kohya file, computed from its tensors as ComfyUI and kohya do (``alpha / rank × up @ down``), must equal
the source's parts to 1e-6 relative.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mindone_lora_plugin import safetensors_io
from mindone_lora_plugin.architectures.flux import keys
from mindone_lora_plugin.cli import main
from mindone_lora_plugin.dtypes import as_dtype
from mindone_lora_plugin.formats.diffusers import DiffusersFormat
from mindone_lora_plugin.formats.reader import read_lora
from mindone_lora_plugin.state import LoraModule, LoraState

pytestmark = pytest.mark.usefixtures("flux_installed")
FUSED = ("_attn_qkv", "_linear1")


@pytest.fixture(scope="module")
def shapes(flux_keys):
    linear_shapes, tiny_transformer = flux_keys.linear_shapes, flux_keys.tiny_transformer
    return linear_shapes(tiny_transformer())


def per_module_state(shapes, seed: int) -> LoraState:
    """Every transformer Linear, ranks 2 or 4, an alpha of its own per module (fractions no 16-bit float holds)."""
    rng = np.random.default_rng(seed)
    state = LoraState(architecture="flux")
    for path, (out, inp) in sorted(shapes.items()):
        r = int(rng.choice([2, 4]))
        alpha = float(np.float32(rng.uniform(0.5, 40.0)))
        state.add("transformer", path, LoraModule((0.3 * rng.standard_normal((r, inp))).astype(np.float32),
                                                  (0.3 * rng.standard_normal((out, r))).astype(np.float32), alpha))
    return state


def f64(a) -> np.ndarray:
    return as_dtype(np.asarray(a), np.float64)


def kohya_deltas(path: str) -> dict[str, np.ndarray]:
    """Module name → ``alpha / rank × up @ down`` from the file's raw tensors (what ComfyUI and kohya compute)."""
    tensors, _ = safetensors_io.load(path)
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = f64(tensors[key]), f64(tensors[f"{name}.lora_up.weight"])
            out[name] = float(f64(tensors[f"{name}.alpha"])) / down.shape[0] * (up @ down)
    return out


@pytest.mark.parametrize("src_dtype", ["fp16", "bf16"])
def test_fused_kohya_modules_from_half_precision_diffusers_files_are_exact(tmp_path, shapes, src_dtype):
    src = DiffusersFormat().write(per_module_state(shapes, seed=11), str(tmp_path / "d"), dtype=src_dtype)
    parts = read_lora(src)  # the source as diffusers reads it: each module's own alpha from lora_adapter_metadata
    assert parts.dtype() == {"fp16": "float16", "bf16": "bfloat16"}[src_dtype]
    want = {p: m.algo.lora_delta(m) for _, p, m in parts.modules()}
    for extra in ([], ["--dtype", src_dtype]):
        out = str(tmp_path / f"k{len(extra)}.safetensors")
        assert main(["convert", src, out, "--to", "kohya", *extra]) == 0
        got = kohya_deltas(out)
        folded = 0
        for name, delta in got.items():
            bfl = name[len("lora_unet_"):]
            paths = keys.bfl_parts(bfl)
            expected = np.concatenate([want[p] for p in paths], axis=0)
            if keys.is_swapped(bfl):
                half = expected.shape[0] // 2
                expected = np.concatenate([expected[half:], expected[:half]], axis=0)
            err = float(np.abs(delta - expected).max()) / float(np.abs(expected).max())
            assert err <= 1e-6, f"{name}: relative error {err:.1e}"
            folded += name.endswith(FUSED) and len({parts.components["transformer"][p].scale for p in paths}) > 1
        assert folded == 6  # every fused module of the tiny model (2 × 2 qkv, 2 linear1) has parts of mixed scales
        tensors, _ = safetensors_io.load(out)
        dtypes = {k: t.dtype.name for k, t in tensors.items()}
        half = {"fp16": "float16", "bf16": "bfloat16"}[src_dtype]
        assert {d for k, d in dtypes.items() if k.endswith(".alpha")} == {"float32"}
        assert {d for k, d in dtypes.items() if k.endswith(".lora_up.weight") and k.split(".")[0].endswith(FUSED)} \
            == {"float32"}  # the folded ups: float32 keeps the fold exact
        assert {d for k, d in dtypes.items() if not k.endswith(".alpha") and not (
            k.endswith(".lora_up.weight") and k.split(".")[0].endswith(FUSED))} == {half}


def test_flux_reader_takes_peft_magnitude_vector_weight_keys(tmp_path, shapes):
    """``….lora_magnitude_vector.weight`` (peft's module naming of DoRA's magnitude) reads as the SD reader reads it."""
    rng = np.random.default_rng(2)
    state = LoraState(architecture="flux")
    for path in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_out"):
        out, inp = shapes[path]
        state.add("transformer", path, LoraModule(
            algorithm="lora", alpha=2.0, settings={"dora_axis": "out"},
            tensors={"down": rng.standard_normal((2, inp)).astype(np.float32),
                     "up": rng.standard_normal((out, 2)).astype(np.float32),
                     "magnitude": rng.uniform(0.5, 2.0, out).astype(np.float32)}))
    src = DiffusersFormat().write(state, str(tmp_path / "d"))
    tensors, meta = safetensors_io.load(src)
    renamed = {k + ".weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in tensors.items()}
    assert sum(k.endswith(".lora_magnitude_vector.weight") for k in renamed) == 2
    path = safetensors_io.save(renamed, str(tmp_path / "peft_names.safetensors"), meta)
    got = read_lora(path)
    assert set(got.labels()) == {"lora+dora"}
    for _, p, m in state.modules():
        np.testing.assert_array_equal(got.components["transformer"][p].tensors["magnitude"], m.tensors["magnitude"])


def test_inspect_warns_once_when_comfyui_would_take_alpha_as_rank(tmp_path, shapes, capsys):
    state = per_module_state(shapes, seed=3)
    src = DiffusersFormat().write(state, str(tmp_path / "d"))
    assert json.loads(safetensors_io.read_metadata(src)["lora_adapter_metadata"])  # alphas live there only
    assert main(["inspect", src]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "ComfyUI" in warnings[0] and "kohya" in warnings[0], warnings
    assert f"{len(state)} module(s)" in warnings[0]
    same = LoraState(architecture="flux")  # alpha = rank everywhere: nothing to warn about
    for c, p, m in state.modules():
        same.add(c, p, LoraModule(m.down, m.up, float(m.rank)))
    kohya = str(tmp_path / "k.safetensors")
    assert main(["convert", src, kohya, "--to", "kohya"]) == 0
    for path in (DiffusersFormat().write(same, str(tmp_path / "same")), kohya):
        capsys.readouterr()
        assert main(["inspect", path]) == 0
        assert "warning:" not in capsys.readouterr().out
