"""``mindone-lora merge`` of DoRA files gives the weights the reference tools give (issue #25), on the tiny SD1.x and
SDXL model folders.

Files made by the reference tools on torch, with random non-zero tensors:

* peft/diffusers DoRA (``use_dora=True`` on the UNet and text-encoder attention Linears, per-module ranks and alphas),
  saved with ``save_lora_weights``; its reference weights are diffusers' own merge (``load_lora_weights`` +
  ``fuse_lora``);
* LyCORIS DoRA (``dora_wd``) normalising output rows (``wd_on_output=True``, ``dora_scale [out, 1]``) and input
  columns (``wd_on_output=False``, ``[1, in]``); reference: the forward of the LyCORIS network that made the file, on
  each adapted Linear with the identity matrix as input, which gives ``W'ᵀ`` plus the bias;
* a plain peft LoRA (convs included) used at weight 0.7 (``fuse_lora(lora_scale=0.7)``) and a LyCORIS LoHa used at
  weight -0.4 (LyCORIS's forward at multiplier -0.4), both overlapping the DoRA modules.

All five are merged at once by the CLI; every UNet/text-encoder weight must equal ``W + Σ (W'_i − W)`` over the
files' reference weights to 1e-4 (each file's change taken from the base model's own weight, as LyCORIS's and peft's
forwards do with several adapters), and every other tensor must be unchanged. ``merge --to-lora --rank N`` of a DoRA
file reports the SVD error of the reference change. This package's own ``train --lora_dora`` files are checked in
``test_interop_dora.py``, from the DoRA training run in the tests' ``conftest.py``.

The existing merge tests built their LoRAs from plain LoRA only, and the DoRA tests used DoRA on live models
(``apply_loras``/``merge_into_models``, which read the base weights from the models), so no test ever sent a DoRA
module through the folder merge or ``--to-lora --rank``, the two callers that gave no base weights.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("torch_runtime")]

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("lycoris")

from mindone_lora_plugin.cli import main  # noqa: E402

TOL = 1e-4
UNET_DORA = ["to_q", "to_k", "to_v", "to_out.0"]
TE_DORA = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_PLAIN = ["to_q", "ff.net.2", "conv1", "proj_in"]  # to_q overlaps the DoRA files: the changes add
TE_PLAIN = ["q_proj", "fc1"]
# LyCORIS's networks on Linear layers only (the transformer blocks' attention and feed-forward, CLIP's attention and
# MLP), so that every adapted module's forward on the identity gives its weight
LYCORIS_PRESET = {"unet_target_module": ["BasicTransformerBlock"], "unet_target_name": [],
                  "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"], "text_encoder_target_name": []}
PLAIN_WEIGHT, LOHA_WEIGHT = 0.7, -0.4
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
                "text_encoder_2": "model.safetensors"}


@pytest.fixture(scope="module", autouse=True)
def lycoris_preset(tmp_path_factory):
    """LYCORIS_PRESET for ``create_network_from_weights`` (the class's) and as a file for ``create_network``."""
    from lycoris.kohya import LycorisNetworkKohya as N

    saved = (N.UNET_TARGET_REPLACE_MODULE, N.UNET_TARGET_REPLACE_NAME, N.TEXT_ENCODER_TARGET_REPLACE_MODULE,
             N.TEXT_ENCODER_TARGET_REPLACE_NAME)
    N.apply_preset(LYCORIS_PRESET)
    path = tmp_path_factory.mktemp("lycoris") / "preset.toml"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in LYCORIS_PRESET.items()))
    yield str(path)
    (N.UNET_TARGET_REPLACE_MODULE, N.UNET_TARGET_REPLACE_NAME, N.TEXT_ENCODER_TARGET_REPLACE_MODULE,
     N.TEXT_ENCODER_TARGET_REPLACE_NAME) = saved


# ------------------------------------------------------------------------------------------------ the reference tools


def text_encoders(pipe):
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) is not None else [])


def peft_file(pipe, out: str, dora: bool, seed: int, interop) -> str:
    """A diffusers LoRA file made by peft on ``pipe``: DoRA on the attention Linears, or plain LoRA on a mix of
    Linears and convs; random A/B (and magnitudes around the base norms)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    if dora:
        configs = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_DORA, use_dora=True,
                                      rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3}),
                   "text_encoder": LoraConfig(r=4, lora_alpha=2, target_modules=TE_DORA, use_dora=True)}
    else:
        configs = {"unet": LoraConfig(r=3, lora_alpha=6, target_modules=UNET_PLAIN),
                   "text_encoder": LoraConfig(r=2, lora_alpha=3, target_modules=TE_PLAIN)}
    comps = {"unet": pipe.unet, **{n: te for n, te in zip(("text_encoder", "text_encoder_2"), text_encoders(pipe))}}
    gen = torch.Generator().manual_seed(seed)
    kwargs = {}
    for name, model in comps.items():
        config = configs["unet" if name == "unet" else "text_encoder"]
        model.add_adapter(config, adapter_name="default")
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoraLayer):
                    for w in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                        w.copy_(interop.STD * torch.randn(w.shape, generator=gen))
                    if dora:
                        mag = m.lora_magnitude_vector["default"].weight
                        mag.mul_(0.5 + torch.rand(mag.shape, generator=gen))
        kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        kwargs[f"{name}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(os.path.dirname(out), weight_name=os.path.basename(out), **kwargs)
    return out


def lycoris_file(pipe, out: str, seed: int, preset: str, interop, multiplier: float = 1.0, std: float | None = None,
                 **kwargs):
    """A kohya file made by LyCORIS's kohya network on ``pipe`` (``kwargs``: ``algo``, ``dora_wd``, ...; random
    factors, DoRA scales around LyCORIS's own initial ones), and the weights LyCORIS's forward gives at
    ``multiplier``: that network's, as applied to ``pipe`` (LyCORIS cannot reload an input-side ``dora_scale``:
    ``make_module_from_state_dict`` builds every DoRA module on the output side); ``std``: the factors' (default:
    the folder's ``STD``)."""
    from lycoris.kohya import create_network

    std = interop.STD if std is None else std
    tes = text_encoders(pipe)
    te = tes if len(tes) > 1 else tes[0]
    network = create_network(multiplier, 4, 2.0, None, te, pipe.unet, preset=preset, **kwargs)
    network.apply_to(te, pipe.unet, apply_text_encoder=True, apply_unet=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith("dora_scale"):
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    network.save_weights(out, torch.float32, {})
    loras = list(network.unet_loras) + list(network.text_encoder_loras)
    assert len(loras) == interop.file_modules(out)
    for lo in loras:
        assert isinstance(lo.org_module[0], torch.nn.Linear)
        lo.org_module[0]._lycoris = True
    return out, interop.weights_of(pipe)


# ------------------------------------------------------------------------------------------------ the files, merged


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def case(request, tmp_path_factory, lycoris_preset, interop):
    """Per architecture: the five files, each file's reference weights, and the folder the CLI merged them into."""
    arch = request.param
    folder = request.getfixturevalue(f"tiny_{arch}")
    d = tmp_path_factory.mktemp(f"dora-merge-{arch}")
    files, refs = {}, {}  # name → (path, weight); name → reference weights
    for name, dora, seed, weight in (("peft_dora", True, 1, 1.0), ("peft_plain", False, 4, PLAIN_WEIGHT)):
        path = peft_file(interop.torch_pipeline(arch, folder), str(d / f"{name}.safetensors"), dora, seed, interop)
        files[name] = (path, weight)
        refs[name] = interop.peft_reference(arch, folder, files[name][0], weight)
    for name, seed, weight, kwargs in (("lycoris_dora_out", 2, 1.0, {"dora_wd": True, "wd_on_output": True}),
                                       ("lycoris_dora_in", 3, 1.0, {"dora_wd": True, "wd_on_output": False}),
                                       ("lycoris_loha", 5, LOHA_WEIGHT, {"algo": "loha", "std": 0.5})):
        path, refs[name] = lycoris_file(interop.torch_pipeline(arch, folder), str(d / f"{name}.safetensors"), seed,
                                        lycoris_preset, interop, weight, **kwargs)
        files[name] = (path, weight)
    base = interop.weights_of(interop.torch_pipeline(arch, folder))
    out = str(d / "merged")
    argv = ["merge", "--model", folder, "--out", out]
    for path, weight in files.values():
        argv += ["--lora", f"{path}:{weight:g}"]
    assert main(argv) == 0
    return {"arch": arch, "folder": folder, "files": files, "base": base, "refs": refs, "out": out, "dir": d}


def test_the_files_are_what_they_claim(case, interop):
    from mindone_lora_plugin.formats.reader import read_lora

    want = {"peft_dora": ({"lora+dora"}, {"out"}), "lycoris_dora_out": ({"lora+dora"}, {"out"}),
            "lycoris_dora_in": ({"lora+dora"}, {"in"}), "peft_plain": ({"lora"}, {None}),
            "lycoris_loha": ({"loha"}, {None})}
    for name, (path, _) in case["files"].items():
        state = read_lora(path, base=case["folder"])
        axes = {m.settings.get("dora_axis") for _, _, m in state.modules()}
        assert (set(state.labels()), axes) == want[name], name
        assert len(state) == interop.file_modules(path)
        assert {c for c, _, _ in state.modules()} >= {"unet", "text_encoder"}
        if case["arch"] == "sdxl":
            assert "text_encoder_2" in state.components, name
        moved = max(float(np.abs(case["refs"][name][k] - case["base"][k]).max()) for k in case["base"])
        assert moved > 100 * TOL, f"{name} does not change the reference weights; the check would be void"


def test_merged_folder_equals_the_reference_merges(case):
    from mindone_lora_plugin import safetensors_io

    base, refs = case["base"], case["refs"]
    changed = 0
    for comp in {c for c, _ in base}:
        merged, _ = safetensors_io.load(os.path.join(case["out"], comp, WEIGHT_FILES[comp]))
        original, _ = safetensors_io.load(os.path.join(case["folder"], comp, WEIGHT_FILES[comp]))
        for key, value in merged.items():
            if (comp, key) not in base:
                assert np.array_equal(value, original[key]), (comp, key)
                continue
            want = base[(comp, key)] + sum(r[(comp, key)] - base[(comp, key)] for r in refs.values())
            got = value.astype(np.float64).reshape(want.shape)
            scale = max(1.0, float(np.abs(want).max()))
            assert float(np.abs(got - want).max()) <= TOL * scale, (comp, key, float(np.abs(got - want).max()))
            changed += not np.array_equal(value, original[key])
    assert changed > 100  # DoRA, plain and LoHa modules of every component


def test_to_lora_rank_reports_the_svd_error_of_a_dora_file(case, tmp_path, capsys):
    path, _ = case["files"]["lycoris_dora_in"]
    base, ref = case["base"], case["refs"]["lycoris_dora_in"]
    tail = total = 0.0
    for key in base:
        change = ref[key] - base[key]
        if np.abs(change).max() > 0:
            sv = np.linalg.svd(change.reshape(change.shape[0], -1), compute_uv=False)
            tail, total = tail + float(np.sum(sv[2:] ** 2)), total + float(np.sum(sv ** 2))
    out = str(tmp_path / "r2.safetensors")
    capsys.readouterr()
    assert main(["merge", "--to-lora", "--rank", "2", "--model", case["folder"], "--lora", path, "--out", out]) == 0
    reported = float(re.search(r"relative approximation error ([0-9.e+-]+)", capsys.readouterr().out).group(1))
    assert reported == pytest.approx((tail / total) ** 0.5, rel=2e-3) and reported > 0.01

    # without the base model, and without --rank: one line each, naming what to pass
    for argv, fragment in ((["--rank", "2"], "--model MODEL_DIR"), (["--model", case["folder"]], "--rank N")):
        assert main(["merge", "--to-lora", "--lora", path, "--out", str(tmp_path / "x.safetensors"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "lora+dora" in err and fragment in err, err
    assert sorted(os.listdir(tmp_path)) == ["r2.safetensors"]
