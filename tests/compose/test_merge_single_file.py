"""``mindone-lora merge`` with a single-file checkpoint (#28): ``--out FILE.safetensors`` writes the merged model as
one file in the checkpoint's own (LDM) layout, fp16 by default, which Hugging Face diffusers' converters read back as
the hand merge; ``--out DIR`` writes the diffusers folder a folder merge writes. The base file is made by the
reference writer of ``tests/architectures/sd/ldm_reference.py`` (checked there against diffusers)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from mindone_lora_plugin import compose
from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.cli import main
from mindone_lora_plugin.state import LoraModule, LoraState
from tests.architectures.sd import ldm_reference as ref

WEIGHT = 0.8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model

    return ensure_tiny_model("sd1", str(tmp_path_factory.mktemp("models") / "tiny-sd1"))


@pytest.fixture(scope="module")
def ldm_file(tiny, tmp_path_factory) -> str:
    return ref.write_ldm_sd1(tiny, str(tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors"))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDONE_LORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    """A random LoRA on attention, a 3×3 conv, a 1×1 proj_in and the text encoder; saved as a kohya file."""
    info = BaseModelInfo.from_folder(tiny)
    rng = np.random.default_rng(7)
    state = LoraState(architecture=info.architecture, base_config=info.base_config)
    mods = {}
    for comp, modules in info.modules.items():
        for path, shape in sorted(modules.items()):
            if not (path.endswith(("to_q", "to_v", "proj_in", "q_proj", "fc1")) or path.endswith("resnets.0.conv1")):
                continue
            r = 2
            down = rng.standard_normal((r, shape[1]) + tuple(shape[2:])) * 0.3
            up = rng.standard_normal((shape[0], r) + ((1, 1) if len(shape) == 4 else ())) * 0.3
            mods[(comp, path)] = (down.astype(np.float32), up.astype(np.float32), 4.0)
            state.add(comp, path, LoraModule(*mods[(comp, path)]))
    path = str(tmp_path_factory.mktemp("lora") / "a.safetensors")
    compose.write_lora(state, path, format="kohya")
    return path, mods


def hand_merge(tiny, mods, comp) -> dict:
    """The folder's weights with ``WEIGHT`` × each module's ``alpha/r · up @ down`` added, in float64."""
    out = {k: v.astype(np.float64) for k, v in ref.weights(tiny, comp).items()}
    for (c, path), (down, up, alpha) in mods.items():
        if c != comp:
            continue
        r = down.shape[0]
        delta = (up.reshape(up.shape[0], r).astype(np.float64) @ down.reshape(r, -1)) * (alpha / r)
        out[path + ".weight"] += WEIGHT * delta.reshape(out[path + ".weight"].shape)
    return out


def test_merged_single_file_reads_back_as_the_hand_merge(tiny, ldm_file, lora, tmp_path):
    torch = pytest.importorskip("torch")
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    path, mods = lora
    out = str(tmp_path / "merged.safetensors")
    assert main(["merge", "--model", ldm_file, "--model_config", tiny, "--lora", f"{path}:{WEIGHT}",
                 "--out", out]) == 0
    merged = load_file(out)
    assert set(merged) == set(load_file(ldm_file)) and {v.dtype for v in merged.values()} == {np.dtype(np.float16)}
    ckpt = {k: torch.from_numpy(v) for k, v in merged.items()}
    read = {"unet": convert_ldm_unet_checkpoint(ckpt, ref.config(tiny, "unet")),
            "vae": convert_ldm_vae_checkpoint(ckpt, ref.config(tiny, "vae")),
            "text_encoder": convert_ldm_clip_checkpoint(ckpt)}
    changed = 0
    for comp, got in read.items():
        want = hand_merge(tiny, mods, comp)
        base = ref.weights(tiny, comp)
        assert set(got) == set(want), comp
        for k, v in want.items():
            g = got[k].numpy()
            np.testing.assert_allclose(g.astype(np.float64), v.astype(np.float16).astype(np.float64), rtol=2e-3,
                                       atol=2e-4, err_msg=k)
            changed += not np.array_equal(g, base[k].astype(np.float16))
    assert changed == len(mods)  # exactly the adapted weights changed
    from safetensors import safe_open

    with safe_open(out, "np") as f:
        record = json.loads(f.metadata()["mindone_lora.merged"])
    assert record[0]["weight"] == WEIGHT


def test_save_dtype_and_folder_output(tiny, ldm_file, lora, tmp_path):
    path, mods = lora
    out = str(tmp_path / "merged32.safetensors")
    assert main(["merge", "--model", ldm_file, "--model_config", tiny, "--lora", f"{path}:{WEIGHT}", "--out", out,
                 "--save_dtype", "fp32"]) == 0
    assert {v.dtype for v in load_file(out).values()} == {np.dtype(np.float32)}
    # --out DIR: the diffusers folder, as merging the equivalent folder writes it
    a, b = str(tmp_path / "from-file"), str(tmp_path / "from-folder")
    assert main(["merge", "--model", ldm_file, "--model_config", tiny, "--lora", f"{path}:{WEIGHT}", "--out", a]) == 0
    assert main(["merge", "--model", tiny, "--lora", f"{path}:{WEIGHT}", "--out", b]) == 0
    for comp in ("unet", "vae", "text_encoder"):
        wa, wb = ref.weights(a, comp), ref.weights(b, comp)
        assert set(wa) == set(wb)
        for k in wa:
            np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_single_file_merge_errors(tiny, ldm_file, lora, tmp_path, capsys):
    path, _ = lora
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"x")
    cases = [(["--model", tiny, "--out", str(tmp_path / "x.safetensors")], "single-file --model"),
             (["--model", ldm_file, "--model_config", tiny, "--out", str(taken)], "already exists"),
             (["--model", ldm_file, "--model_config", tiny, "--out", ldm_file, "--overwrite"], "base model itself")]
    for argv, message in cases:
        assert main(["merge", "--lora", path, *argv]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err
    assert taken.read_bytes() == b"x"


def test_single_file_merge_streams(tiny, ldm_file, lora, tmp_path):
    """Memory allocated while merging stays well below the model's size (one tensor and its change at a time)."""
    import tracemalloc

    from mindone_lora_plugin.compose.single_file import merge_into_file

    path, _ = lora
    loras = compose.load_loras([f"{path}:{WEIGHT}"], base=BaseModelInfo.from_folder(tiny))
    merge_into_file(ldm_file, loras, str(tmp_path / "warm.safetensors"), config=tiny)  # first-call allocations
    tracemalloc.start()
    try:
        merge_into_file(ldm_file, loras, str(tmp_path / "merged.safetensors"), config=tiny)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < os.path.getsize(ldm_file) // 3, (peak, os.path.getsize(ldm_file))  # a full read: > the size
