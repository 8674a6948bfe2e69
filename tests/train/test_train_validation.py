"""Every flag of ``mindone-lora train`` is checked before any model loads: one line, exit 2, naming the flag."""

from __future__ import annotations

import pytest

from mindone_lora_plugin.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An existing folder that stands in for the model and the data: validation fails before either is read."""
    return str(tmp_path_factory.mktemp("anything"))


def run(capsys, *argv):
    code = main(["train", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


def one_error_line(code, err, *words):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("mindone-lora: error: "), err
    for w in words:
        assert w in err[0], err[0]


BAD = [
    (["--train_batch_size", "0"], ["--train_batch_size", "at least 1"]),
    (["--num_train_epochs", "0"], ["--num_train_epochs", "at least 1"]),
    (["--lr_warmup_steps", "-1"], ["--lr_warmup_steps", "0 or more"]),
    (["--learning_rate", "0"], ["--learning_rate", "greater than 0"]),
    (["--adam_beta1", "1.0"], ["--adam_beta1", "value <"]),
    (["--caption_dropout_rate", "1.5"], ["--caption_dropout_rate", "≤ 1.0"]),
    (["--seed", "-3"], ["--seed", "0 or more"]),
    (["--lora_alpha", "0"], ["--lora_alpha", "greater than 0"]),
    (["--output_dir", " "], ["--output_dir", "empty"]),
    (["--save_formats", ","], ["--save_formats", "comma-separated"]),
    (["--output_name", "a/b"], ["--output_name", "path separator"]),
    (["--caption_extension", "txt"], ["--caption_extension", "dot"]),
    (["--reg_data_dir", "/no/such/folder"], ["--reg_data_dir", "does not exist"]),
    (["--resume_from_checkpoint", "/no/such/ckpt"], ["--resume_from_checkpoint", "'latest'"]),
    (["--min_bucket_reso", "64"], ["--min_bucket_reso", "--enable_bucket"]),
    (["--keep_tokens", "2"], ["--keep_tokens", "--shuffle_caption"]),
    (["--validation_steps", "5"], ["--validation_steps", "--validation_prompt"]),
    (["--cache_text_encoder_outputs", "--train_text_encoder"], ["--cache_text_encoder_outputs", "frozen"]),
    (["--cache_text_encoder_outputs", "--shuffle_caption"], ["--shuffle_caption", "cannot be cached"]),
    (["--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "32"], ["larger than"]),
    (["--enable_bucket", "--bucket_reso_steps", "12"], ["--bucket_reso_steps", "multiple of 8"]),
]


@pytest.mark.parametrize("flags, words", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_values_end_in_one_line_before_any_model_loads(capsys, folder, flags, words):
    # the "model" is an empty folder: had validation let the value through, loading would fail differently
    code, err = run(capsys, "--pretrained_model_name_or_path", folder, "--train_data_dir", folder, *flags)
    one_error_line(code, err, *words)
    assert "model_index.json" not in err[0]


def test_unknown_config_key_names_the_closest(capsys, tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text("[training]\nlearnig_rate = 1e-4\n")
    code, err = run(capsys, "--config_file", str(cfg))
    one_error_line(code, err, "'learnig_rate'", "did you mean learning_rate")
    cfg.write_text("lora_rank = \"four\"\n")
    code, err = run(capsys, "--config_file", str(cfg))
    one_error_line(code, err, "lora_rank", "whole number")
    cfg.write_text("network_module = \"lycoris.kohya\"\n")
    code, err = run(capsys, "--config_file", str(cfg))
    one_error_line(code, err, "network_module", "networks.lora")
    cfg.write_text("push_to_hub = true\n")
    code, err = run(capsys, "--config_file", str(cfg))
    one_error_line(code, err, "push_to_hub", "not supported")
    code, err = run(capsys, "--config_file", str(tmp_path / "missing.toml"))
    one_error_line(code, err, "--config_file", "does not exist")


def test_random_crop_with_a_latent_cache_is_refused(capsys, tiny_sd1, tmp_path):
    from PIL import Image

    sub = tmp_path / "data" / "1_thing"
    sub.mkdir(parents=True)
    Image.new("RGB", (48, 32)).save(sub / "a.png")
    Image.new("RGB", (48, 32)).save(sub / "b.png")
    code, err = run(capsys, "--pretrained_model_name_or_path", tiny_sd1, "--train_data_dir", str(tmp_path / "data"),
                    "--output_dir", str(tmp_path / "o"), "--train_batch_size", "2", "--cache_latents",
                    "--mode", "pynative", "--device_target", "CPU", "--report_to", "none")
    one_error_line(code, err, "--cache_latents", "random crops", "--center_crop")
