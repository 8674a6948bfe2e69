"""Training features without a model: EMA formula, noise and loss weights, prompt files, save cadence, bad flags."""

from __future__ import annotations

import numpy as np
import pytest

from mindone_lora_plugin.cli import main
from mindone_lora_plugin.errors import LoraError


def test_ema_follows_the_formula_with_warm_up():
    import mindspore as ms

    from mindone_lora_plugin.train.features.ema import EMA, decay_at

    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(0)
    p = ms.Parameter(ms.Tensor(rng.standard_normal((3, 4)).astype(np.float32)), name="unet.x.lora_B.weight")
    expected = p.asnumpy().astype(np.float64)
    ema = EMA([p], 0.95)
    for step in range(1, 31):
        p.set_data(ms.Tensor(rng.standard_normal((3, 4)).astype(np.float32)))
        d = ema.update(step)
        assert d == min(0.95, step / (step + 9))  # (1 + n) / (10 + n) with n = step - 1 earlier updates
        expected = d * expected + (1 - d) * p.asnumpy()
    np.testing.assert_allclose(ema.state()["ema.unet.x.lora_B.weight"], expected, rtol=1e-5, atol=1e-6)
    assert decay_at(0.95, 0) == 0.1 and decay_at(0.95, 1000) == 0.95
    raw = p.asnumpy().copy()
    with ema.swapped():
        np.testing.assert_allclose(p.asnumpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(p.asnumpy(), raw)


def test_multires_noise_and_loss_weights():
    import argparse

    from mindone_lora_plugin.train.noise import draw_noise, loss_weights, upsample_bilinear

    args = argparse.Namespace(noise_offset=0, multires_noise_iterations=None, multires_noise_discount=0.3,
                              snr_gamma=None, debiased_estimation_loss=False)
    plain = draw_noise(np.random.default_rng(1), (2, 4, 16, 16), args)
    args.multires_noise_iterations, args.multires_noise_discount = 4, 0.8
    multi = draw_noise(np.random.default_rng(1), (2, 4, 16, 16), args)
    assert multi.shape == plain.shape and abs(float(multi.std()) - 1.0) < 1e-5
    np.testing.assert_array_equal(multi, draw_noise(np.random.default_rng(1), (2, 4, 16, 16), args))  # host, seeded
    # low-frequency content: neighbouring pixels correlate more than in white noise
    corr = lambda x: float(np.corrcoef(x[..., :-1].ravel(), x[..., 1:].ravel())[0, 1])  # noqa: E731
    assert corr(multi) > corr(plain) + 0.1
    # bilinear upsampling with half-pixel centres: a 2-pixel ramp to 4 pixels
    np.testing.assert_allclose(upsample_bilinear(np.array([[[[0.0, 1.0]]]]), 1, 4)[0, 0, 0], [0, 0.25, 0.75, 1])

    acp = np.array([0.99, 0.5, 0.01])
    snr = acp / (1 - acp)
    args.snr_gamma = 5.0
    np.testing.assert_allclose(loss_weights(acp, args, False), np.minimum(snr, 5) / snr, rtol=1e-6)
    args.snr_gamma, args.debiased_estimation_loss = None, True
    np.testing.assert_allclose(loss_weights(acp, args, False), 1 / np.sqrt(snr), rtol=1e-6)
    np.testing.assert_allclose(loss_weights(acp, args, True), 1 / (snr + 1), rtol=1e-6)


def test_prompt_file_syntax(tmp_path):
    from mindone_lora_plugin.train.features.sample_prompts import read_prompts

    f = tmp_path / "p.txt"
    f.write_text("# comment\n\na cat, photo --n blurry, bad --w 100 --h 64 --d 7 --l 5.5 --s 12\na dog\n")
    cat, dog = read_prompts(str(f))
    assert (cat.prompt, cat.negative_prompt, cat.width, cat.height, cat.seed, cat.guidance_scale, cat.steps) == \
        ("a cat, photo", "blurry, bad", 96, 64, 7, 5.5, 12)
    assert dog.prompt == "a dog" and dog.width is None and dog.seed is None
    f.write_text("a cat --x 3\n")
    with pytest.raises(LoraError, match=r"line 1: unknown option --x; prompt lines take --n, --w, --h, --d, --l, --s"):
        read_prompts(str(f))
    f.write_text("a cat\na dog --w big\n")
    with pytest.raises(LoraError, match="line 2: --w needs a whole number"):
        read_prompts(str(f))


def test_sample_cadence():
    import argparse

    from mindone_lora_plugin.train.features.sample_prompts import is_due

    args = argparse.Namespace(sample_prompts="p.txt", sample_every_n_steps=3, sample_every_n_epochs=None)
    assert [s for s in range(1, 10) if is_due(args, s, 4)] == [3, 6, 9]
    args.sample_every_n_steps, args.sample_every_n_epochs = None, 2  # 4 steps an epoch: every 8 steps
    assert [s for s in range(1, 17) if is_due(args, s, 4)] == [8, 16]


def test_save_cadence_names_and_pruning(tmp_path):
    from mindone_lora_plugin.train.features import save_cadence as cadence

    assert cadence.step_name("x", 200) == "x-step00000200" and cadence.epoch_name("x", 3) == "x-000003"
    assert [s for s in range(1, 11) if cadence.due(3, s, 10)] == [3, 6, 9]
    assert not cadence.due(5, 10, 10)  # the last step is the final file
    for n in ("x-step00000001.safetensors", "x-step00000002-ema.safetensors", "x-step00000003", "x-000001.safetensors",
              "x-000002_peft", "xy-step00000001.safetensors", "x.safetensors"):
        (tmp_path / n).mkdir() if "." not in n else (tmp_path / n).write_text("")
    removed = cadence.prune(str(tmp_path), "x", "step", lambda s: s > 2)
    assert sorted(p.rsplit("/", 1)[1] for p in removed) == ["x-step00000001.safetensors",
                                                            "x-step00000002-ema.safetensors"]
    cadence.prune(str(tmp_path), "x", "epoch", lambda e: e > 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000002_peft", "x-step00000003", "x.safetensors",
                                                          "xy-step00000001.safetensors"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("data") / "shapes"), size=40, repeats=1)


@pytest.mark.parametrize("extra,words", [
    (["--optimizer_type", "Adam8"], ["--optimizer_type 'Adam8'", "AdamW, Lion, Adafactor, Prodigy"]),
    (["--optimizer_type", "Lion", "--optimizer_args", "eps=1"], ["Lion does not take 'eps'", "betas, weight_decay"]),
    (["--min_snr_gamma", "0"], ["--min_snr_gamma", "positive"]),
    (["--multires_noise_iterations", "0"], ["--multires_noise_iterations", "at least 1"]),
    (["--multires_noise_iterations", "6", "--multires_noise_discount", "2"], ["--multires_noise_discount"]),
    (["--loraplus_lr_ratio", "-1"], ["--loraplus_lr_ratio", "positive"]),
    (["--ema_decay", "0.9"], ["--ema_decay needs --use_ema"]),
    (["--use_ema", "--ema_decay", "1.5"], ["--ema_decay", "between 0 and 1"]),
    (["--validation_split", "1.2"], ["--validation_split"]),
    (["--validate_every_n_steps", "5"], ["--validation_split or --validation_data_dir"]),
    (["--validation_data_dir", "/nonexistent"], ["--validation_data_dir", "does not exist"]),
    (["--validation_split", "0.01"], ["--validation_split", "at least one image"]),
    (["--sample_every_n_steps", "5"], ["--sample_prompts"]),
    (["--sample_prompts", "/nonexistent.txt", "--sample_every_n_steps", "1"], ["--sample_prompts", "cannot read"]),
    (["--save_last_n_steps", "2"], ["--save_last_n_steps needs --save_every_n_steps"]),
    (["--save_every_n_epochs", "0"], ["--save_every_n_epochs", "at least 1"]),
])
def test_bad_feature_flags_are_one_line(capsys, tiny_sd1, data, tmp_path, extra, words):
    code = main(["train", "--pretrained_model_name_or_path", tiny_sd1, "--train_data_dir", data, "--output_dir",
                 str(tmp_path / "o"), "--max_train_steps", "1", "--train_batch_size", "2", "--report_to", "none",
                 "--mode", "pynative", "--device_target", "CPU", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mindone-lora: error: "), err
    for w in words:
        assert w in err[0], err[0]


def test_help_documents_the_flags(capsys):
    try:
        assert main(["train", "--help"]) == 0
    except SystemExit as e:
        assert e.code == 0
    text = capsys.readouterr().out
    for flag in ("--min_snr_gamma", "--multires_noise_iterations", "--debiased_estimation_loss", "--loraplus_lr_ratio",
                 "--loraplus_unet_lr_ratio", "--use_ema", "--ema_decay", "--validation_split", "--validation_data_dir",
                 "--validate_every_n_steps", "--optimizer_type", "--optimizer_args", "--sample_prompts",
                 "--sample_every_n_steps", "--sample_every_n_epochs", "--save_every_n_steps", "--save_last_n_epochs"):
        assert flag in text, flag
