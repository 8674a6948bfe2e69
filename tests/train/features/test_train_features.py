"""Training features end to end on the tiny SD1 model (one GRAPH_MODE run and its resume share the assertions):
EMA, LoRA+, validation loss, a non-AdamW optimizer, loss/noise options, sample prompts and save cadence."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PROMPTS = ("# two prompts in kohya's syntax\na red circle --w 32 --h 48 --d 5 --l 3 --s 1\n\n"
           "a blue square --n ugly --s 1\n")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("data") / "shapes"), size=40, repeats=1)


def feature_args(model, data, out, prompts, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--max_train_steps", "6", "--train_batch_size", "2", "--max_train_samples", "7", "--learning_rate", "1e-3",
            "--lr_warmup_steps", "0",
            "--seed", "3", "--device_target", "CPU", "--random_flip", "--lora_targets", "to_q,to_v",
            "--output_name", "feat", "--checkpointing_steps", "2",
            "--optimizer_type", "Lion", "--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99",
            "--use_ema", "--ema_decay", "0.9", "--loraplus_lr_ratio", "4",
            "--validation_split", "0.25", "--validate_every_n_steps", "1",
            "--multires_noise_iterations", "3", "--multires_noise_discount", "0.3", "--debiased_estimation_loss",
            "--min_snr_gamma", "5", *extra]


def weights(path):
    from mindone_lora_plugin import safetensors_io

    return safetensors_io.load(path)


@pytest.fixture(scope="module")
def run(tiny_sd1, shapes, tmp_path_factory, training):
    train = training.train
    root = tmp_path_factory.mktemp("features")
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = str(root / "run")
    result = train(feature_args(tiny_sd1, shapes, out, str(prompts), "--sample_prompts", str(prompts),
                                "--sample_every_n_steps", "2", "--save_every_n_steps", "1",
                                "--save_last_n_steps", "2", "--save_every_n_epochs", "1",
                                "--save_last_n_epochs", "1"))
    return result, str(prompts)


def test_files_samples_and_cadence(run):
    result, _ = run
    out = result.output_dir
    names = sorted(os.listdir(out))
    # 5 training images, batch 2: 2 steps an epoch, 3 epochs. Step files every step but the last (the final files
    # are that one), pruned to the last 2 steps; epoch files every epoch but the last, pruned to the last one
    assert [n for n in names if "-step" in n] == ["feat-step00000004", "feat-step00000004-ema",
                                                  "feat-step00000004-ema.safetensors", "feat-step00000004.safetensors",
                                                  "feat-step00000005", "feat-step00000005-ema",
                                                  "feat-step00000005-ema.safetensors", "feat-step00000005.safetensors"]
    assert [n for n in names if n.startswith("feat-0")] == ["feat-000002", "feat-000002-ema",
                                                           "feat-000002-ema.safetensors", "feat-000002.safetensors"]
    # EMA beside the raw weights in every format
    assert {"feat.safetensors", "pytorch_lora_weights.safetensors", "feat-ema.safetensors", "feat-ema"} <= set(names)
    assert os.path.isfile(os.path.join(out, "feat-ema", "pytorch_lora_weights.safetensors"))
    from PIL import Image

    assert sorted(os.listdir(os.path.join(out, "samples"))) == [f"feat_{s:06d}_{i:02d}.png" for s in (2, 4, 6)
                                                                for i in (0, 1)]
    im = Image.open(os.path.join(out, "samples", "feat_000004_00.png"))
    assert im.format == "PNG" and im.size == (32, 48) and im.text["prompt"] == "a red circle"
    assert im.text["seed"] == "5" and im.text["guidance_scale"] == "3.0"
    assert Image.open(os.path.join(out, "samples", "feat_000002_01.png")).size == (32, 32)


def test_metadata_and_hparams_record_the_features(run):
    import yaml

    result, _ = run
    _, meta = weights(os.path.join(result.output_dir, "feat.safetensors"))
    assert meta["ss_optimizer"] == "mindone_lora_plugin.train.optimizers.Lion(weight_decay=0.1,betas=0.9,0.99)"
    assert meta["ss_min_snr_gamma"] == "5.0" and meta["ss_debiased_estimation"] == "True"
    assert meta["ss_multires_noise_iterations"] == "3" and meta["ss_multires_noise_discount"] == "0.3"
    assert meta["ss_loraplus_lr_ratio"] == "4.0" and meta["ss_ema_decay"] == "0.9"
    assert meta["ss_validation_split"] == "0.25" and meta["ss_save_every_n_steps"] == "1"
    hp = yaml.safe_load(open(os.path.join(result.output_dir, "hparams.yml")))
    assert hp["optimizer_type"] == "Lion" and hp["use_ema"] and hp["snr_gamma"] == 5.0
    assert hp["loraplus_lr_ratio"] == 4.0 and hp["multires_noise_iterations"] == 3


def test_validation_loss_every_step_and_on_the_curve(run):
    result, _ = run
    steps = [s for s, _ in result.validation_losses]
    assert steps == [1, 2, 3, 4, 5, 6] and all(np.isfinite(v) for _, v in result.validation_losses)
    assert len({round(v, 9) for _, v in result.validation_losses}) > 1  # it follows the weights
    state = json.load(open(os.path.join(result.output_dir, "checkpoint-2", "trainer_state.json")))
    assert state["validation_losses"] == [list(x) for x in result.validation_losses[:2]]
    from PIL import Image

    curve = np.asarray(Image.open(os.path.join(result.output_dir, "loss_curve.png")).convert("RGB"))
    assert ((curve == (230, 120, 20)).all(axis=-1)).sum() > 20  # the validation points are drawn


def test_ema_file_differs_from_the_raw_weights(run):
    result, _ = run
    raw, _ = weights(os.path.join(result.output_dir, "feat.safetensors"))
    ema, meta = weights(os.path.join(result.output_dir, "feat-ema.safetensors"))
    assert raw.keys() == ema.keys() and meta["ss_ema_weights"] == "True"
    ups = [k for k in raw if k.endswith("lora_up.weight")]
    assert ups and max(float(np.abs(raw[k] - ema[k]).max()) for k in ups) > 1e-6


def test_resume_is_exact_with_lion_ema_and_validation(run, tiny_sd1, shapes, tmp_path, training):
    train = training.train
    result, prompts = run
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    shutil.copytree(os.path.join(result.output_dir, "checkpoint-2"), os.path.join(out, "checkpoint-2"))
    resumed = train(feature_args(tiny_sd1, shapes, out, prompts, "--resume_from_checkpoint", "latest"))
    assert resumed.global_step == 6
    np.testing.assert_allclose(resumed.losses, result.losses, rtol=1e-5, atol=1e-6)
    assert [s for s, _ in resumed.validation_losses] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in resumed.validation_losses], [v for _, v in result.validation_losses],
                               rtol=1e-6, atol=1e-7)  # the same figure across two runs, one of them resumed
    for name in ("feat.safetensors", "feat-ema.safetensors"):
        a, _ = weights(os.path.join(result.output_dir, name))
        b, _ = weights(os.path.join(out, name))
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
    with pytest.raises(Exception, match="no EMA weights"):
        no_ema = str(tmp_path / "no-ema")
        shutil.copytree(os.path.join(result.output_dir, "checkpoint-2"), os.path.join(no_ema, "checkpoint-2"))
        os.remove(os.path.join(no_ema, "checkpoint-2", "ema.safetensors"))
        train(feature_args(tiny_sd1, shapes, no_ema, prompts, "--resume_from_checkpoint", "latest",
                           "--mode", "pynative"))
