"""End-to-end training on CPU with the tiny models: outputs, files loading back, exact resume, recovery, SDXL."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from mindone_lora_plugin.errors import LoraError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("data") / "shapes"), size=40, repeats=1)


def base_args(model, data, out, steps=4, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--max_train_steps", str(steps), "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--lr_warmup_steps", "0", "--seed", "3", "--report_to", "none", "--device_target", "CPU",
            "--random_flip", *extra]


def lora_params(models):
    from mindone_lora_plugin.models import lora_layers

    out = {}
    for comp, cell in models.items():
        for path, layer in lora_layers(cell):
            out[f"{comp}.{path}.A"] = layer.lora_A["default"].weight.asnumpy().copy()
            out[f"{comp}.{path}.B"] = layer.lora_B["default"].weight.asnumpy().copy()
    return out


@pytest.fixture(scope="module")
def sd1_run(tiny_sd1, shapes, tmp_path_factory, training):
    train = training.train
    out = str(tmp_path_factory.mktemp("runs") / "sd1")
    args = [a for a in base_args(tiny_sd1, shapes, out, 4) if a not in ("--report_to", "none")]  # tensorboard on
    result = train(args + ["--checkpointing_steps", "2", "--lora_alpha", "8",
                             "--lora_targets", "kohya", "--output_name", "shapes_lora",
                             "--validation_prompt", "a red circle", "--num_validation_images", "2",
                             "--num_inference_steps", "2", "--validation_epochs", "100"])
    return result, lora_params(result.models)


@pytest.mark.smoke
def test_sd1_outputs_and_layout(sd1_run):
    result, _ = sd1_run
    out = result.output_dir
    assert result.global_step == 4 and len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "hparams.yml", "logs", "loss_curve.png",
                                       "pytorch_lora_weights.safetensors", "shapes_lora.safetensors", "train_log.jsonl",
                                       "validation"]
    ckpt = os.path.join(out, "checkpoint-2")
    assert {"pytorch_lora_weights.safetensors", "optimizer.safetensors", "trainer_state.json"} <= set(os.listdir(ckpt))
    assert not any(n.startswith(".checkpoint") for n in os.listdir(out))
    state = json.load(open(os.path.join(ckpt, "trainer_state.json")))
    assert state["global_step"] == 2 and state["lora"]["rank"] == 4 and state["lora"]["alpha"] == 8.0
    # no full UNet copy in a checkpoint: it is small
    assert sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt)) < 2_000_000
    from PIL import Image

    assert Image.open(os.path.join(out, "loss_curve.png")).format == "PNG"
    assert os.path.isfile(os.path.join(out, "validation", "final.png"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "logs")))
    import yaml

    hp = yaml.safe_load(open(os.path.join(out, "hparams.yml")))
    assert hp["lora_rank"] == 4 and hp["lora_alpha"] == 8.0


def test_sd1_files_load_back_to_the_same_outputs(sd1_run, tiny_sd1, training):
    base_outputs_differ, load_back = training.base_outputs_differ, training.load_back
    result, _ = sd1_run
    for state, diffs in load_back(tiny_sd1, result.files, "unet", result.models):
        assert len(state) == 72 and set(state.alphas("unet")) == {8.0}
        assert diffs["unet"] <= 1e-4 and diffs["text_encoder"] == 0.0, diffs
    assert base_outputs_differ(tiny_sd1, result.models) > 1e-4  # the LoRA is not a no-op


@pytest.mark.smoke
def test_resume_is_exact(sd1_run, tiny_sd1, shapes, tmp_path, training):
    train = training.train
    result, final = sd1_run
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    shutil.copytree(os.path.join(result.output_dir, "checkpoint-2"), os.path.join(out, "checkpoint-2"))
    resumed = train(base_args(tiny_sd1, shapes, out, 4, "--checkpointing_steps", "2", "--lora_alpha", "8",
                              "--lora_targets", "kohya", "--resume_from_checkpoint", "latest"))
    assert resumed.global_step == 4
    np.testing.assert_allclose(resumed.losses, result.losses, rtol=1e-5, atol=1e-6)
    after = lora_params(resumed.models)
    assert after.keys() == final.keys()
    for k in final:
        np.testing.assert_allclose(after[k], final[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_resume_refuses_other_settings(sd1_run, tiny_sd1, shapes, tmp_path, training):
    train = training.train
    result, _ = sd1_run
    out = str(tmp_path / "other")
    shutil.copytree(os.path.join(result.output_dir, "checkpoint-2"), os.path.join(out, "checkpoint-2"))
    with pytest.raises(LoraError, match="other LoRA settings.*rank 4 → 8"):
        train(base_args(tiny_sd1, shapes, out, 4, "--lora_rank", "8", "--lora_alpha", "8", "--lora_targets", "kohya",
                        "--resume_from_checkpoint", "latest", "--mode", "pynative"))


def test_latest_skips_incomplete_checkpoints(sd1_run, tmp_path):
    from mindone_lora_plugin.train import checkpoint

    result, _ = sd1_run
    out = str(tmp_path / "crashed")
    shutil.copytree(os.path.join(result.output_dir, "checkpoint-2"), os.path.join(out, "checkpoint-2"))
    os.makedirs(os.path.join(out, ".checkpoint-4.tmp"))  # killed while writing
    os.makedirs(os.path.join(out, "checkpoint-6"))  # a folder without its state file is not complete
    assert checkpoint.resolve("latest", out) == os.path.join(out, "checkpoint-2")

    def dies(tmp):
        open(os.path.join(tmp, "half"), "w").close()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.write(out, 8, dies)
    assert not os.path.exists(os.path.join(out, "checkpoint-8"))
    assert checkpoint.resolve("latest", out) == os.path.join(out, "checkpoint-2")


def test_checkpoints_total_limit_prunes_oldest(tmp_path):
    from mindone_lora_plugin.train import checkpoint

    for step in (1, 2, 3):
        checkpoint.write(str(tmp_path), step, lambda d: checkpoint.write_state(d, {"global_step": 0}), total_limit=2)
    assert [s for s, _ in checkpoint.complete_checkpoints(str(tmp_path))] == [2, 3]


def test_sdxl_trains_and_files_load_back(tiny_sdxl, shapes, tmp_path, training):
    # PyNative: SDXL's GRAPH_MODE step is test_cpu_backend's (a 2-step run would spend a minute compiling)
    load_back, train = training.load_back, training.train
    result = train(base_args(tiny_sdxl, shapes, str(tmp_path / "xl"), 2, "--checkpointing_steps", "0",
                             "--lora_alpha", "2", "--mode", "pynative"))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    names = sorted(os.path.basename(p) for p in result.files)
    assert names == ["pytorch_lora_weights.safetensors", "xl.safetensors"]
    for state, diffs in load_back(tiny_sdxl, result.files, "sdxl", result.models):
        assert state.architecture == "sdxl" and len(state) == 96
        assert diffs["unet"] <= 1e-4, diffs


def test_nan_loss_stops_and_keeps_the_checkpoint(tiny_sd1, shapes, tmp_path, training):
    train = training.train
    out = str(tmp_path / "nan")
    with pytest.raises(LoraError, match=r"loss became (nan|inf) at step \d+.*checkpoint-1"):
        train(base_args(tiny_sd1, shapes, out, 6, "--learning_rate", "1e30", "--max_grad_norm", "0",
                        "--checkpointing_steps", "1", "--mode", "pynative", "--lora_init", "default"))
    assert os.path.isfile(os.path.join(out, "checkpoint-1", "trainer_state.json"))
    assert not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))


def test_fp16_accumulation_snr_v_prediction_text_encoder(tiny_sd1, shapes, tmp_path, training):
    import mindspore as ms

    train = training.train

    result = train(base_args(tiny_sd1, shapes, str(tmp_path / "fp16"), 1, "--mixed_precision", "fp16",
                             "--mode", "pynative", "--checkpointing_steps", "0", "--save_formats", "kohya",
                             "--save_dtype", "fp16", "--gradient_accumulation_steps", "2", "--snr_gamma", "5",
                             "--prediction_type", "v_prediction", "--noise_offset", "0.05", "--train_text_encoder",
                             "--text_encoder_lr", "5e-4"))
    assert np.isfinite(result.losses[0])
    assert {"unet", "text_encoder"} <= set(result.models)
    unet = result.models["unet"]
    dtypes = {("lora_" in p.name): p.dtype for p in unet.get_parameters()}
    assert dtypes == {True: ms.float32, False: ms.float16}
    from mindone_lora_plugin.formats.reader import read_lora

    state = read_lora(result.files[0])
    assert state.dtype() == "float16"


def test_third_party_strategy_and_format_through_the_train_cli(tiny_sd1, shapes, tmp_path, training):
    """The example plugin (installed with pip by the set-up) trains and saves through `mindone-lora train`."""
    from mindone_lora_plugin.plugins import get_plugin_manager

    load_back, train = training.load_back, training.train

    if "lora-fa" not in get_plugin_manager().strategies():
        pytest.skip("the example plugin examples/plugins/mindone-lora-fa is not installed (make setup installs it)")
    out = str(tmp_path / "fa")
    result = train(base_args(tiny_sd1, shapes, out, 1, "--lora_strategy", "lora-fa", "--lora_fa_init", "orthogonal",
                             "--save_formats", "peft,kohya", "--mode", "pynative", "--checkpointing_steps", "0"))
    names = sorted(os.path.basename(p) for p in result.files)
    assert names == ["fa.safetensors", "fa_peft"]
    assert sorted(os.listdir(os.path.join(out, "fa_peft", "unet"))) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    from mindone_lora_plugin.models import lora_layers

    frozen = [layer.lora_A["default"].weight.requires_grad for _, layer in lora_layers(result.models["unet"])]
    assert frozen and not any(frozen)
    for state, diffs in load_back(tiny_sd1, result.files, "lora-fa", result.models):
        assert len(state) == 48 and diffs["unet"] <= 1e-4, diffs
