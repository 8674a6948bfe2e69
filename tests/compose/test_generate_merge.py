"""Using trained LoRAs: several weighted LoRAs at once, merged into a model folder, concatenated into one LoRA.

On the tiny SD1.x and SDXL models (PyNative, CPU): two LoRAs applied together add exactly the sum of their weighted
deltas; the merged model folder gives the same outputs as the base model with the LoRAs applied; the concatenated LoRA
adds the same deltas as the two together; ``generate`` writes images and a grid with the prompt, seed and LoRAs in the
PNG metadata. The LoRA fixtures are random, with different ranks and alphas per LoRA (and per module), 3×3 and 1×1
convs, and text-encoder modules, written as kohya and diffusers files.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mindone_lora_plugin import compose
from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.cli import main
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.state import LoraModule, LoraState

WEIGHTS = (0.7, -0.4)


# ---------------------------------------------------------------------------------------------------- fixtures


def random_lora(info: BaseModelInfo, rng, pick, rank_alpha) -> LoraState:
    """Random LoRA over the modules of ``info`` that ``pick(comp, path)`` selects; ``rank_alpha(path)`` → (r, alpha)."""
    state = LoraState(architecture=info.architecture, base_config=info.base_config)
    for comp, modules in info.modules.items():
        for path, shape in sorted(modules.items()):
            if not pick(comp, path):
                continue
            r, alpha = rank_alpha(path)
            if len(shape) == 4:
                down = rng.standard_normal((r, shape[1]) + tuple(shape[2:]))
                up = rng.standard_normal((shape[0], r, 1, 1))
            else:
                down = rng.standard_normal((r, shape[1]))
                up = rng.standard_normal((shape[0], r))
            state.add(comp, path, LoraModule((down * 0.3).astype(np.float32), (up * 0.3).astype(np.float32), alpha))
    return state


def _pick_a(comp, path):
    return path.endswith(("to_q", "to_v", "proj_in", "q_proj", "fc1")) or path.endswith("resnets.0.conv1")


def _pick_b(comp, path):
    return path.endswith(("to_q", "to_k", "ff.net.2", "v_proj", "out_proj", "time_emb_proj"))


@pytest.fixture(scope="module")
def folders(tiny_sd1, tiny_sdxl):
    return {"sd1": tiny_sd1, "sdxl": tiny_sdxl}


@pytest.fixture(scope="module")
def loras(folders, tmp_path_factory):
    """Per architecture: LoRA A (kohya file, rank 4, alpha 2) and B (diffusers folder, rank 2 alpha 8, and rank 3
    alpha 1.5 for the feed-forward and time-embedding modules), with their states."""
    from mindone_lora_plugin.formats.diffusers import DiffusersFormat
    from mindone_lora_plugin.formats.kohya import KohyaFormat

    out = {}
    for i, (arch, folder) in enumerate(sorted(folders.items())):
        info = BaseModelInfo.from_folder(folder)
        rng = np.random.default_rng(10 + i)
        a = random_lora(info, rng, _pick_a, lambda p: (4, 2.0))
        b = random_lora(info, rng, _pick_b, lambda p: (3, 1.5) if p.endswith(("ff.net.2", "time_emb_proj"))
                        else (2, 8.0))
        d = tmp_path_factory.mktemp(f"loras-{arch}")
        pa = KohyaFormat().write(a, str(d / "style_a.safetensors"))
        pb = os.path.dirname(DiffusersFormat().write(b, str(d / "subject_b")))
        out[arch] = {"a": a, "b": b, "paths": (pa, pb), "specs": [f"{pa}:{WEIGHTS[0]}", f"{pb}:{WEIGHTS[1]}"],
                     "dir": str(d), "info": info}
    return out


@pytest.fixture(scope="module")
def runtime():
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)


def _assert_deltas_equal(got: dict, want: dict, rtol=1e-5):
    assert set(got) == set(want)
    for key in want:
        scale = max(1.0, float(np.abs(want[key]).max()))
        np.testing.assert_allclose(got[key].reshape(want[key].shape), want[key], rtol=0, atol=rtol * scale,
                                   err_msg=str(key))


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


# ---------------------------------------------------------------------------------------------------- specs (no model)


def test_parse_lora_spec(tmp_path):
    assert compose.parse_lora_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert compose.parse_lora_spec("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert compose.parse_lora_spec("dir/style.safetensors:-1.25") == ("dir/style.safetensors", -1.25)
    assert compose.parse_lora_spec("a:b:2") == ("a:b", 2.0)  # only the last colon separates a weight
    odd = tmp_path / "with:colon:0.5"  # an existing path is taken whole, colons and all
    odd.write_bytes(b"")
    assert compose.parse_lora_spec(str(odd)) == (str(odd), 1.0)
    with pytest.raises(LoraError, match="weight 'abc' is not a number"):
        compose.parse_lora_spec("file.safetensors:abc")
    with pytest.raises(LoraError, match="weight '' is not a number"):
        compose.parse_lora_spec("file.safetensors:")
    with pytest.raises(LoraError, match="not a finite number"):
        compose.parse_lora_spec("file.safetensors:nan")
    with pytest.raises(LoraError, match="does not exist"):
        compose.parse_lora_spec("missing:dir/file.safetensors")


# ---------------------------------------------------------------------------------------------------- numpy maths


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_concatenated_lora_equals_the_weighted_sum(loras, arch, tmp_path):
    from mindone_lora_plugin.formats.reader import read_lora

    lo = loras[arch]
    pairs = [(lo["a"], WEIGHTS[0]), (lo["b"], WEIGHTS[1])]
    want = compose.combined_deltas(pairs)
    # the combination really is a sum: modules both LoRAs adapt get both deltas
    both = set(lo["a"].components["unet"]) & set(lo["b"].components["unet"])
    assert both
    for path in both:
        expected = (WEIGHTS[0] * compose.module_delta(lo["a"].components["unet"][path])
                    + WEIGHTS[1] * compose.module_delta(lo["b"].components["unet"][path]))
        np.testing.assert_allclose(want[("unet", path)], expected, rtol=1e-12, atol=1e-12)
    one = compose.concat_loras(pairs)
    assert one.architecture == arch
    for comp, path, mod in one.modules():
        assert mod.alpha == mod.rank  # scale 1: every weight and scale is in the up matrices
        ranks = [s.components[comp][path].rank for s, _ in pairs if path in s.components.get(comp, {})]
        assert mod.rank == sum(ranks)
    _assert_deltas_equal({(c, p): compose.module_delta(m) for c, p, m in one.modules()}, want)
    # and through the files, read back by the readers (kohya and diffusers)
    for name, out in (("kohya", str(tmp_path / "one.safetensors")), ("diffusers", str(tmp_path / "one-d"))):
        path = compose.write_concatenated(compose.load_loras(lo["specs"], base=lo["info"]), out)
        back = read_lora(path, base=lo["info"])
        _assert_deltas_equal({(c, p): compose.module_delta(m) for c, p, m in back.modules()}, want)
        assert json.loads(back.metadata["mindone_lora_concatenated_from"])[1]["weight"] == WEIGHTS[1]


def test_load_loras_reads_both_formats_with_weights(loras):
    lo = loras["sd1"]
    got = compose.load_loras(lo["specs"], base=lo["info"])
    assert [(g.format, g.weight, g.name) for g in got] == [("kohya", 0.7, "style_a"), ("diffusers", -0.4, "subject_b")]
    assert {c for g in got for c in g.state.components} == {"unet", "text_encoder"}


# ---------------------------------------------------------------------------------------------------- merge folder


@pytest.fixture(scope="module")
def merged(folders, loras, tmp_path_factory):
    """Per architecture: the model folder ``mindone-lora merge`` writes with both LoRAs."""
    out = {}
    for arch, folder in folders.items():
        dest = str(tmp_path_factory.mktemp(f"merged-{arch}") / "model")
        argv = ["merge", "--model", folder, "--out", dest]
        for spec in loras[arch]["specs"]:
            argv += ["--lora", spec]
        assert main(argv) == 0
        out[arch] = dest
    return out


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_merged_folder_weights_and_files(folders, loras, merged, arch):
    from mindone_lora_plugin import safetensors_io

    folder, dest, lo = folders[arch], merged[arch], loras[arch]
    want = compose.combined_deltas([(lo["a"], WEIGHTS[0]), (lo["b"], WEIGHTS[1])])
    comps = {c for c, _ in want}
    assert comps == ({"unet", "text_encoder", "text_encoder_2"} if arch == "sdxl" else {"unet", "text_encoder"})
    for comp in comps:
        name = "diffusion_pytorch_model.safetensors" if comp == "unet" else "model.safetensors"
        base, meta = safetensors_io.load(os.path.join(folder, comp, name))
        new, new_meta = safetensors_io.load(os.path.join(dest, comp, name))
        assert new_meta == meta and set(new) == set(base)
        for key in base:
            path = key[: -len(".weight")]
            if (comp, path) in want:
                expected = base[key].astype(np.float64) + want[(comp, path)].reshape(base[key].shape)
                np.testing.assert_allclose(new[key], expected, rtol=1e-6, atol=1e-6)
                assert np.abs(new[key] - base[key]).max() > 1e-3
            else:
                assert np.array_equal(new[key], base[key]), key
    for rel in ("model_index.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                "tokenizer/vocab.json", "unet/config.json", "text_encoder/config.json"):
        with open(os.path.join(folder, rel), "rb") as a, open(os.path.join(dest, rel), "rb") as b:
            assert a.read() == b.read(), rel
    record = json.load(open(os.path.join(dest, compose.MERGE_RECORD)))
    assert [d["weight"] for d in record["loras"]] == list(WEIGHTS)
    assert not [n for n in os.listdir(os.path.dirname(dest)) if n.startswith(".")]  # no temporary folder left


def test_merge_dtype_and_overwrite(folders, loras, tmp_path, capsys):
    from mindone_lora_plugin.safetensors_io import read_header

    folder, lo = folders["sd1"], loras["sd1"]
    dest = str(tmp_path / "fp16")
    assert main(["merge", "--model", folder, "--lora", lo["specs"][0], "--out", dest, "--dtype", "fp16"]) == 0
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "vae/diffusion_pytorch_model.safetensors"):
        header, _ = read_header(os.path.join(dest, rel))
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} <= {"F16", "I64", "I32"}
    assert json.load(open(os.path.join(dest, "text_encoder", "config.json")))["dtype"] == "float16"
    capsys.readouterr()
    # an existing output is refused, and left alone
    assert main(["merge", "--model", folder, "--lora", lo["specs"][0], "--out", dest]) == 2
    err = _err_line(capsys)
    assert "already exists" in err and "--overwrite" in err
    header, _ = read_header(os.path.join(dest, "unet/diffusion_pytorch_model.safetensors"))
    assert header["conv_in.weight"]["dtype"] == "F16"
    assert main(["merge", "--model", folder, "--lora", lo["specs"][0], "--out", dest, "--overwrite"]) == 0
    header, _ = read_header(os.path.join(dest, "unet/diffusion_pytorch_model.safetensors"))
    assert header["conv_in.weight"]["dtype"] == "F32"
    assert sorted(os.listdir(tmp_path)) == ["fp16"]
    # the output must not be (inside) the model folder
    assert main(["merge", "--model", folder, "--lora", lo["specs"][0], "--out", os.path.join(folder, "x"),
                 "--overwrite"]) == 2
    assert "outside the model folder" in _err_line(capsys)


def test_to_lora_cli(loras, tmp_path, capsys):
    from mindone_lora_plugin.formats.reader import open_lora

    lo = loras["sdxl"]
    want = compose.combined_deltas([(lo["a"], WEIGHTS[0]), (lo["b"], WEIGHTS[1])])
    out = str(tmp_path / "combined.safetensors")
    argv = ["merge", "--to-lora", "--out", out, "--lora", lo["specs"][0], "--lora", lo["specs"][1]]
    assert main(argv) == 0
    lf = open_lora(out, base=lo["info"])
    assert lf.format.name == "kohya" and lf.state.architecture == "sdxl"
    _assert_deltas_equal({(c, p): compose.module_delta(m) for c, p, m in lf.state.modules()}, want)
    capsys.readouterr()
    assert main(argv) == 2
    assert "already exists" in _err_line(capsys)
    assert main(argv + ["--overwrite", "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert open_lora(str(tmp_path / "d"), base=lo["info"]).format.name == "diffusers"


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_input_one_line_each(folders, loras, tmp_path, capsys):
    sd1, sdxl = folders["sd1"], folders["sdxl"]
    a_sd1, a_sdxl = loras["sd1"]["paths"][0], loras["sdxl"]["paths"][0]
    gen = ["generate", "--prompt", "x", "--steps", "1"]
    cases = [
        # a LoRA for another architecture
        (gen + ["--model", sd1, "--lora", a_sdxl, "--out", str(tmp_path / "g1")], "is a LoRA for SDXL"),
        (["merge", "--model", sdxl, "--lora", a_sd1, "--out", str(tmp_path / "m1")], "is a LoRA for SD1"),
        (["merge", "--to-lora", "--lora", a_sd1, "--lora", a_sdxl, "--out", str(tmp_path / "c.safetensors")],
         "different architectures"),
        # a weight that is not a number
        (gen + ["--model", sd1, "--lora", f"{a_sd1}:abc", "--out", str(tmp_path / "g2")], "weight 'abc' is not a"),
        (["merge", "--model", sd1, "--lora", f"{a_sd1}:1e", "--out", str(tmp_path / "m2")], "weight '1e' is not a"),
        # a model folder that is not diffusers layout
        (gen + ["--model", str(tmp_path), "--lora", a_sd1, "--out", str(tmp_path / "g3")],
         "not a diffusers-layout model folder"),
        (["merge", "--model", loras["sd1"]["dir"], "--lora", a_sd1, "--out", str(tmp_path / "m3")],
         "not a diffusers-layout model folder"),
        (["merge", "--lora", a_sd1, "--out", str(tmp_path / "m4")], "--model MODEL_DIR is required"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = _err_line(capsys)
        assert err.startswith("mindone-lora: error:") and fragment in err, (argv, err)
    # an output folder that exists: refused before anything is loaded
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(gen + ["--model", sd1, "--lora", a_sd1, "--out", str(taken)]) == 2
    assert "already exists" in _err_line(capsys)
    assert main(["merge", "--model", sd1, "--lora", a_sd1, "--out", str(taken)]) == 2
    assert "already exists" in _err_line(capsys)
    assert sorted(os.listdir(taken)) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # nothing else was written


# ---------------------------------------------------------------------------------------------------- live models


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_applied_merged_and_concatenated_agree(runtime, folders, loras, merged, arch):
    """Applied together = sum of the weighted deltas (weights); merged folder = applied (outputs); the concatenated
    LoRA applied = the two applied (weights); merge_into_models = the merged folder (weights). That the LoRAs change
    the weights substantially is checked in test_merged_folder_weights_and_files."""
    from mindone_lora_plugin import safetensors_io
    from mindone_lora_plugin.demo.training import model_outputs
    from mindone_lora_plugin.models import base_layer_of, load_models, lora_layers

    folder, lo = folders[arch], loras[arch]
    specs = compose.load_loras(lo["specs"], base=lo["info"])
    want = compose.combined_deltas(specs)

    applied = load_models(folder)
    names = compose.apply_loras(applied, specs)
    assert names == ["lora0", "lora1"]
    _assert_deltas_equal(compose.active_deltas(applied), want)
    for comp, cell in applied.items():  # every LoRA is applied where it has modules, text encoders included
        adapters = {n for _, layer in lora_layers(cell) for n in layer.active_adapters}
        expected = {n for n, s in zip(names, (lo["a"], lo["b"])) if comp in s.components}
        assert adapters == expected, comp
    out_applied = model_outputs(applied)

    fused = load_models(merged[arch])
    out_merged = model_outputs(fused)
    for k in out_applied:
        scale = max(1.0, float(np.abs(out_applied[k]).max()))
        np.testing.assert_allclose(out_merged[k], out_applied[k], rtol=0, atol=1e-4 * scale, err_msg=k)

    one = compose.concat_loras(specs)  # onto the merged model: active_deltas looks at the adapters only
    assert compose.apply_loras(fused, [one]) == ["lora0"]
    _assert_deltas_equal(compose.active_deltas(fused), want)
    compose.set_lora_weights(fused, {"lora0": 0.0})
    assert all(float(np.abs(d).max()) == 0.0 for d in compose.active_deltas(fused).values())

    compose.merge_into_models(applied, specs)  # changes the base weights under the adapters
    cells = {c: dict(cell.cells_and_names()) for c, cell in applied.items()}
    for comp in {c for c, _ in want}:
        name = "diffusion_pytorch_model.safetensors" if comp == "unet" else "model.safetensors"
        on_disk, _ = safetensors_io.load(os.path.join(merged[arch], comp, name))
        for c, path in want:
            if c == comp:
                live = base_layer_of(cells[comp][path]).weight.asnumpy()
                np.testing.assert_allclose(live, on_disk[path + ".weight"], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("arch", [pytest.param("sd1", marks=pytest.mark.smoke), "sdxl"])
def test_generate_writes_images_with_metadata(runtime, folders, loras, tmp_path, monkeypatch, arch):
    from PIL import Image

    folder, lo = folders[arch], loras[arch]
    pipes = []
    real = compose.load_pipeline

    def spy(*args, **kwargs):
        pipes.append(real(*args, **kwargs))
        return pipes[-1]

    monkeypatch.setattr(compose, "load_pipeline", spy)
    out = tmp_path / "images"
    n = 2 if arch == "sd1" else 1
    argv = ["generate", "--model", folder, "--prompt", "a red circle", "--negative_prompt", "blue",
            "--num_images", str(n), "--steps", "2", "--guidance_scale", "5", "--seed", "7", "--height", "32",
            "--width", "32", "--out", str(out)]
    for spec in lo["specs"]:
        argv += ["--lora", spec]
    assert main(argv) == 0
    # the pipeline that generated had both LoRAs applied, with their weights
    models = compose.pipeline_models(pipes[0])
    _assert_deltas_equal(compose.active_deltas(models), compose.combined_deltas(
        [(lo["a"], WEIGHTS[0]), (lo["b"], WEIGHTS[1])]))
    files = sorted(os.listdir(out))
    assert files == [f"{i:04d}-{7 + i}.png" for i in range(n)] + ["grid.png"]
    for i in range(n):
        im = Image.open(out / files[i])
        assert im.size == (32, 32)
        meta = im.text
        assert meta["prompt"] == "a red circle" and meta["negative_prompt"] == "blue"
        assert meta["seed"] == str(7 + i) and meta["steps"] == "2" and meta["guidance_scale"] == "5"
        listed = json.loads(meta["loras"])
        assert [(d["name"], d["weight"], d["format"]) for d in listed] == [("style_a", 0.7, "kohya"),
                                                                          ("subject_b", -0.4, "diffusers")]
        assert meta["parameters"].startswith("a red circle <lora:style_a:0.7> <lora:subject_b:-0.4>\n")
        assert f"Seed: {7 + i}" in meta["parameters"]
        assert np.asarray(im).std() > 0
    grid = Image.open(out / "grid.png")
    assert grid.text["seeds"] == ",".join(str(7 + i) for i in range(n))
    assert json.loads(grid.text["loras"])[0]["file"] == lo["paths"][0]


def test_merged_unet_loads_in_hugging_face_diffusers(folders, loras, merged):
    """The merged folder is a plain diffusers folder: Hugging Face diffusers' ``from_pretrained`` loads the fused
    UNet."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from mindone_lora_plugin import safetensors_io

    lo = loras["sd1"]
    unet = diffusers.UNet2DConditionModel.from_pretrained(merged["sd1"], subfolder="unet")
    params = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
    base, _ = safetensors_io.load(os.path.join(folders["sd1"], "unet", "diffusion_pytorch_model.safetensors"))
    for (comp, path), delta in compose.combined_deltas([(lo["a"], WEIGHTS[0]), (lo["b"], WEIGHTS[1])]).items():
        if comp == "unet":
            want = base[path + ".weight"] + delta.reshape(base[path + ".weight"].shape)
            np.testing.assert_allclose(params[path + ".weight"], want, rtol=1e-6, atol=1e-6)


def test_folder_weights_reads_single_files_and_shards(folders, tmp_path):
    """``compose.FolderWeights`` (DoRA's base weights for ``merge --to-lora --rank``) reads one tensor at a time, from a
    component's weights file or from the shards its index lists."""
    import shutil

    from mindone_lora_plugin import safetensors_io

    src = folders["sd1"]
    want, _ = safetensors_io.load(os.path.join(src, "unet", "diffusion_pytorch_model.safetensors"))
    sharded = tmp_path / "sharded"
    shutil.copytree(src, sharded)
    os.remove(sharded / "unet" / "diffusion_pytorch_model.safetensors")
    names = sorted(want)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        safetensors_io.save({k: want[k] for k in keys}, str(sharded / "unet" / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    for folder in (src, str(sharded)):
        weights = compose.FolderWeights(folder)
        for key in [k for k in names if k.endswith(".weight")][::40]:
            assert np.array_equal(weights.get(("unet", key[: -len(".weight")])), want[key].astype(np.float64))
        assert weights.get(("unet", "no.such.module")) is None
        assert weights.get(("text_encoder", "text_model.encoder.layers.0.mlp.fc1")).shape == (37, 32)
