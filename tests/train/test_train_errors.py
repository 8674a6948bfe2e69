"""Bad input to ``mindone-lora train``: each ends in one clear line on stderr and exit status 2, before training."""

from __future__ import annotations

import json
import os

import pytest

from mindone_lora_plugin.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("data") / "shapes"), size=40, repeats=1)


def run(capsys, *argv):
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def args(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--max_train_steps", "1", "--train_batch_size", "2", "--report_to", "none", "--mode", "pynative",
            "--device_target", "CPU", *extra]


def one_error_line(code, err, *words):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("mindone-lora: error: "), err
    for w in words:
        assert w in err[0], err[0]


def test_missing_model_folder(capsys, data, tmp_path):
    code, err = run(capsys, *args(str(tmp_path / "nope"), data, str(tmp_path / "o")))
    one_error_line(code, err, "does not exist")


def test_not_a_model_folder(capsys, data, tmp_path):
    code, err = run(capsys, *args(str(tmp_path), data, str(tmp_path / "o")))
    one_error_line(code, err, "model_index.json")


def test_missing_dataset_folder(capsys, tiny_sd1, tmp_path):
    code, err = run(capsys, *args(tiny_sd1, str(tmp_path / "nodata"), str(tmp_path / "o")))
    one_error_line(code, err, "--train_data_dir", "does not exist")


def test_unknown_caption_column_lists_the_columns(capsys, tiny_sd1, data, tmp_path):
    code, err = run(capsys, *args(tiny_sd1, data, str(tmp_path / "o"), "--caption_column", "prompt"))
    one_error_line(code, err, "'prompt'", "available columns", "text", "image")


def test_resolution_not_divisible_by_8(capsys, tiny_sd1, data, tmp_path):
    code, err = run(capsys, *args(tiny_sd1, data, str(tmp_path / "o"), "--resolution", "30"))
    one_error_line(code, err, "divisible by 8")


def test_unwritable_output(capsys, tiny_sd1, data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run(capsys, *args(tiny_sd1, data, str(blocker / "out")))
    one_error_line(code, err, "cannot write", "--output_dir")


def test_strategy_that_does_not_fit(capsys, tiny_sd1, data, tmp_path):
    code, err = run(capsys, *args(tiny_sd1, data, str(tmp_path / "o"), "--lora_strategy", "sdxl"))
    one_error_line(code, err, "sdxl", "sd1")


def test_unknown_strategy_and_format_list_choices(capsys, tiny_sd1, data, tmp_path):
    code, err = run(capsys, *args(tiny_sd1, data, str(tmp_path / "o"), "--lora_strategy", "nope"))
    one_error_line(code, err, "unknown LoRA strategy 'nope'", "unet", "sdxl", "text_encoder")
    code, err = run(capsys, *args(tiny_sd1, data, str(tmp_path / "o"), "--save_formats", "diffusers,nope"))
    one_error_line(code, err, "unknown LoRA format 'nope'", "diffusers", "kohya")


@pytest.mark.parametrize("flag", ["--push_to_hub", "--use_8bit_adam", "--allow_tf32",
                                  "--enable_xformers_memory_efficient_attention"])
def test_flags_that_cannot_be_honoured_are_refused(capsys, flag):
    code, err = run(capsys, flag)
    one_error_line(code, err, flag, "not supported")


def test_bad_flag_value_is_one_line(capsys):
    code, err = run(capsys, "--lora_rank", "four")
    one_error_line(code, err, "--lora_rank")


def test_unreadable_images_skip_or_stop(capsys, tiny_sd1, data, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(data, folder)
    (folder / "broken.png").write_bytes(b"not a png at all")
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "a broken image"}) + "\n")
    code, err = run(capsys, *args(tiny_sd1, str(folder), str(tmp_path / "o"), "--on_bad_image", "stop"))
    one_error_line(code, err, "cannot read image", "broken.png", "--on_bad_image skip")

    from mindone_lora_plugin.cli import COMMANDS, build_parser
    from mindone_lora_plugin.train.data.loader import load_examples

    ns = build_parser({"train": COMMANDS["train"]}).parse_args(["train", *args(tiny_sd1, str(folder), "o")])
    examples, skipped = load_examples(ns, 32)
    assert skipped == 1 and len(examples) == len(os.listdir(data)) - 1


def test_empty_dataset_folder(capsys, tiny_sd1, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run(capsys, *args(tiny_sd1, str(empty), str(tmp_path / "o")))
    one_error_line(code, err)


def test_resume_from_a_folder_that_is_not_a_checkpoint(capsys, tiny_sd1, data, tmp_path):
    code, err = run(capsys, *args(tiny_sd1, data, str(tmp_path / "o"), "--resume_from_checkpoint", str(tmp_path)))
    one_error_line(code, err, "not a complete checkpoint")


def test_distributed_without_a_launcher(capsys, tiny_sd1, data, tmp_path, monkeypatch):
    for var in ("MS_ROLE", "MS_WORKER_NUM", "RANK_TABLE_FILE"):
        monkeypatch.delenv(var, raising=False)
    code, err = run(capsys, *args(tiny_sd1, data, str(tmp_path / "o"), "--distributed"))
    one_error_line(code, err, "msrun")


@pytest.mark.parametrize("extra", [["--snr_gamma", "5"], ["--prediction_type", "epsilon"],
                                   ["--debiased_estimation_loss", "--min_snr_gamma", "5"]])
def test_flags_flux_training_does_not_use_are_refused(capsys, data, tmp_path_factory, extra):
    """FLUX declares the SD-only flags it does not use (Architecture.unused_flags); given, they end the run in one line
    before any model loads instead of being silently ignored."""
    from mindone_lora_plugin.architectures.flux.tiny import ensure_tiny_model

    model = ensure_tiny_model("dev", str(tmp_path_factory.getbasetemp() / "tiny-flux-unused"))
    code, err = run(capsys, *args(model, data, str(tmp_path_factory.mktemp("out")), *extra))
    flags = [f for f in extra if f.startswith("--")]
    one_error_line(code, err, "not apply to FLUX.1 training", *(f.replace("min_", "") for f in flags))
