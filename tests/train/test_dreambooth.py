"""DreamBooth LoRA through `mindone-lora train`: prior preservation on SD1.x, plain on SDXL (with LoHa), and bad
input."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mindone_lora_plugin.cli import main
from mindone_lora_plugin.demo.training import make_instance_images

pytestmark = pytest.mark.slow


def common(model, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--output_dir", out, "--max_train_steps", "2",
            "--train_batch_size", "1", "--mode", "pynative", "--report_to", "none", "--device_target", "CPU",
            "--seed", "0", "--learning_rate", "1e-3", "--num_inference_steps", "2", *extra]


def assert_loads_back(training, model, files, strategy, trained_models):
    for _, diffs in training.load_back(model, files, strategy, trained_models):
        assert max(diffs.values()) <= 1e-4, diffs


def test_sd1_with_prior_preservation(tiny_sd1, tmp_path, training):
    train = training.train
    inst = make_instance_images(str(tmp_path / "inst"), size=40, count=2)
    cls = str(tmp_path / "class")
    argv = common(tiny_sd1, str(tmp_path / "out"), "--instance_data_dir", inst, "--instance_prompt",
                  "a photo of sks toy", "--with_prior_preservation", "--class_data_dir", cls, "--class_prompt",
                  "a photo of a toy", "--num_class_images", "3", "--sample_batch_size", "2",
                  "--prior_loss_weight", "0.5", "--train_text_encoder", "--checkpointing_steps", "1")
    result = train(argv)
    made = sorted(os.listdir(cls))
    assert len(made) == 3 and all(f.endswith(".png") for f in made)
    mtimes = {f: os.path.getmtime(os.path.join(cls, f)) for f in made}
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert {"unet", "text_encoder"} <= set(result.models)
    assert_loads_back(training, tiny_sd1, result.files, "unet", result.models)
    # a second run reuses the class images; resuming works in DreamBooth mode too
    again = train(argv[:argv.index("--max_train_steps") + 1] + ["3"] + argv[argv.index("--max_train_steps") + 2:]
                  + ["--resume_from_checkpoint", "latest"])
    assert {f: os.path.getmtime(os.path.join(cls, f)) for f in sorted(os.listdir(cls))} == mtimes
    assert again.global_step == 3 and len(again.losses) == 3
    np.testing.assert_allclose(again.losses[:2], result.losses, rtol=1e-6)


def test_sdxl_without_prior_preservation_with_loha(tiny_sdxl, tmp_path, training):
    """DreamBooth on SDXL with another adapter algorithm (LoHa, kohya file)."""
    from mindone_lora_plugin.formats.reader import read_lora

    train = training.train

    inst = make_instance_images(str(tmp_path / "inst"), size=40, count=2)
    result = train(common(tiny_sdxl, str(tmp_path / "out"), "--instance_data_dir", inst, "--instance_prompt",
                          "a photo of sks toy", "--checkpointing_steps", "0", "--lora_algo", "loha",
                          "--save_formats", "kohya"))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    [path] = result.files
    assert set(read_lora(path).algorithms()) == {"loha"}
    assert_loads_back(training, tiny_sdxl, result.files, "sdxl", result.models)


@pytest.mark.parametrize("case,expect", [
    ("missing", "does not exist"),
    ("empty", "holds no image files"),
    ("unreadable", "could be read"),
    ("no_class_prompt", "--class_prompt"),
    ("no_instance_prompt", "--instance_prompt is required"),
])
def test_bad_dreambooth_input(case, expect, tiny_sd1, tmp_path, capsys):
    inst = tmp_path / "inst"
    extra = ["--instance_prompt", "a photo of sks toy"]
    if case == "empty":
        inst.mkdir()
    elif case == "unreadable":
        inst.mkdir()
        (inst / "a.png").write_bytes(b"broken")
        (inst / "b.jpg").write_bytes(b"")
    elif case in ("no_class_prompt", "no_instance_prompt"):
        make_instance_images(str(inst), size=40, count=1)
        if case == "no_class_prompt":
            extra += ["--with_prior_preservation", "--class_data_dir", str(tmp_path / "cls")]
        else:
            extra = []
    code = main(["train", *common(tiny_sd1, str(tmp_path / "out"), "--instance_data_dir", str(inst), *extra)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expect in err[0], err
