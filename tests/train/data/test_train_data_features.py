"""Buckets, caches, kohya folders, caption augmentation and config files, mostly at the data level (no compile)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from mindone_lora_plugin.errors import LoraError


def pynative_cpu():
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)


def write_image(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def kohya(tmp_path):
    """``3_red thing/`` (3 images, one with a caption file) and ``2_blue thing/`` (2 images), mixed aspect ratios."""
    root = tmp_path / "kohya"
    for sub, sizes in (("3_red thing", [(48, 32), (32, 48), (40, 40)]), ("2_blue thing", [(64, 32), (32, 32)])):
        d = root / sub
        d.mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            write_image(d / f"im{i}.png", w, h, seed=len(sub) + i)
        (d / "im0.txt").write_text("first, second, third, fourth\n")
    return str(root)


# ---------------------------------------------------------------------------------------------------- buckets

def test_bucket_set_follows_the_settings():
    from mindone_lora_plugin.train.data.buckets import make_buckets

    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    for h, w in buckets:
        assert h * w <= 512 * 512 and h % 64 == 0 and w % 64 == 0 and 256 <= min(h, w) and max(h, w) <= 1024


def test_every_bucketed_batch_has_one_shape_and_plans_repeat(kohya, training):
    from mindone_lora_plugin.train.data.kohya_folders import load_kohya_examples
    from mindone_lora_plugin.train.data.loader import BatchPlan
    from mindone_lora_plugin.train.features.buckets import Buckets

    parse = training.parse

    args = parse(["--train_data_dir", kohya, "--enable_bucket", "--resolution", "32"])
    sizer = Buckets(args).image_sizer(32)
    examples, bad, distinct = load_kohya_examples(kohya, "--train_data_dir", args, 32, sizer)
    assert (bad, distinct, len(examples)) == (0, 5, 3 * 3 + 2 * 2)
    assert len({ex.target for ex in examples}) >= 3  # wide, tall and square images get their own buckets

    def plan():
        return BatchPlan(examples, 2, 32, seed=5, center_crop=False, random_flip=True, bucketed=True)

    a, b = plan(), plan()
    for epoch in range(3):
        for i in range(a.batches_per_epoch):
            batch = a.batch(epoch, i)
            assert batch.pixels.shape[0] == 2 and len({p.shape for p in batch.pixels}) == 1
            assert (batch.pixels.shape[2], batch.pixels.shape[3]) in {ex.target for ex in examples}
            again = b.batch(epoch, i)  # a fresh plan (a resumed run) draws the same batch
            assert np.array_equal(batch.pixels, again.pixels) and batch.crops_top_left == again.crops_top_left


def test_bucket_no_upscale_skips_and_counts_small_images():
    from mindone_lora_plugin.train.data.buckets import BucketSizer, make_buckets

    sizer = BucketSizer(make_buckets(32, 16, 64, 8), no_upscale=True)
    assert sizer(Image.new("RGB", (8, 40))) is None and sizer.too_small == 1
    arr, target = sizer(Image.new("RGB", (50, 30)))
    assert target[0] <= 30 and target[1] <= 50 and arr.shape[0] >= target[0] and arr.shape[1] >= target[1]


@pytest.mark.parametrize("flags, words", [(["--min_bucket_reso", "64", "--max_bucket_reso", "32"], "larger than"),
                                          (["--bucket_reso_steps", "12"], "multiple of 8"),
                                          (["--min_bucket_reso", "20"], "multiple of --bucket_reso_steps")])
def test_impossible_bucket_settings(flags, words, training):
    from mindone_lora_plugin.train.features.buckets import Buckets

    parse = training.parse

    with pytest.raises(LoraError, match=words):
        Buckets(parse(["--enable_bucket", *flags])).image_sizer(32)


# ---------------------------------------------------------------------------------------------------- kohya folders

def test_kohya_folders_captions_repeats_and_regularisation(kohya, tmp_path):
    from mindone_lora_plugin.train.data.kohya_folders import balance_regularisation, is_kohya_folder, scan

    assert is_kohya_folder(kohya)
    items = scan(kohya, "--train_data_dir", ".txt")
    by_name = {os.path.relpath(p, kohya): (c, r) for p, c, r in items}
    assert by_name["3_red thing/im0.png"] == ("first, second, third, fourth", 3)
    assert by_name["3_red thing/im1.png"] == ("red thing", 3)  # no caption file: the folder's name
    assert by_name["2_blue thing/im1.png"] == ("blue thing", 2)
    assert scan(kohya, "--train_data_dir", ".caption")[0][1] in ("red thing", "blue thing")
    assert balance_regularisation([1, 2], 5) == [1, 2, 1, 2, 1] and balance_regularisation([1, 2, 3], 2) == [1, 2]


def test_reg_images_are_balanced_and_weighted(kohya, tmp_path, training):
    from mindone_lora_plugin.train.data.setup import load_text_to_image

    parse = training.parse

    reg = tmp_path / "reg" / "1_thing"
    reg.mkdir(parents=True)
    write_image(reg / "r.png", 32, 32)

    class T:  # the attributes load_text_to_image reads from a Trainer
        args = parse(["--train_data_dir", kohya, "--reg_data_dir", str(tmp_path / "reg"), "--prior_loss_weight",
                      "0.5"])
        sizer, resolution, say = None, 32, staticmethod(lambda m: None)

    examples, bad = load_text_to_image(T)
    weights = [ex.loss_weight for ex in examples]
    assert len(examples) == 26 and weights.count(0.5) == 13 and weights.count(1.0) == 13
    assert T.dataset_info == {"train": (5, 13), "reg": (1, 13)}


def test_caption_shuffle_keep_tokens_and_dropout_are_deterministic():
    from mindone_lora_plugin.train.data.captions import CaptionAugment

    caption = "sks, one, two, three, four, five"
    aug = CaptionAugment(shuffle=True, keep_tokens=1)
    outs = {aug(caption, np.random.default_rng([1, e])) for e in range(20)}
    assert len(outs) > 1 and all(o.startswith("sks, ") and sorted(o.split(", ")) == sorted(caption.split(", "))
                                 for o in outs)
    assert aug(caption, np.random.default_rng([1, 3])) == aug(caption, np.random.default_rng([1, 3]))
    assert CaptionAugment(dropout_rate=1.0)(caption, np.random.default_rng(0)) == ""
    assert CaptionAugment(dropout_rate=0.0)(caption, np.random.default_rng(0)) == caption


# ---------------------------------------------------------------------------------------------------- latent cache

def test_latent_cache_rebuilds_changed_corrupt_and_foreign_entries(tiny_sd1, tmp_path):
    import mindspore as ms
    from mindone.diffusers import AutoencoderKL

    from mindone_lora_plugin.train.data.cache import LatentCache
    from mindone_lora_plugin.train.data.loader import prepare
    from mindone_lora_plugin.train.step import VaeEncode

    pynative_cpu()
    encode_cell = VaeEncode(AutoencoderKL.from_pretrained(tiny_sd1, subfolder="vae"))
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        return encode_cell(ms.Tensor(pixels)).asnumpy()

    folder = str(tmp_path / "cache")
    os.makedirs(folder)
    a = prepare(Image.fromarray(np.full((32, 32, 3), 40, np.uint8)), 32)
    b = prepare(Image.fromarray(np.full((32, 32, 3), 200, np.uint8)), 32)
    first = LatentCache(encode, "vae-1", folder, batch_size=2)
    first.fill([a, b], flips=True)
    assert first.stats == {"encoded": 4, "read": 0, "rebuilt": 0} and len(os.listdir(folder)) == 4

    again = LatentCache(encode, "vae-1", folder, batch_size=2)
    again.fill([a, b], flips=True)
    assert again.stats == {"encoded": 0, "read": 4, "rebuilt": 0}
    assert np.array_equal(again.moments([(a.key, True)]), first.moments([(a.key, True)]))

    changed = prepare(Image.fromarray(np.full((32, 32, 3), 41, np.uint8)), 32)  # one pixel value changed
    assert changed.key != a.key
    with open(os.path.join(folder, f"{b.key}-plain.safetensors"), "r+b") as f:  # a truncated, garbled entry
        f.truncate(20)
    third = LatentCache(encode, "vae-1", folder, batch_size=2)
    third.fill([changed, b], flips=False)
    assert third.stats == {"encoded": 2, "read": 0, "rebuilt": 1}
    assert np.allclose(third.moments([(b.key, False)]), first.moments([(b.key, False)]), atol=1e-6)

    other_vae = LatentCache(encode, "vae-2", folder, batch_size=2)
    other_vae.fill([a], flips=False)
    assert other_vae.stats == {"encoded": 1, "read": 0, "rebuilt": 1}


# ---------------------------------------------------------------------------------------------------- config files

def test_config_file_values_are_defaults_and_the_command_line_wins(tmp_path, training):
    parse = training.parse
    cfg = tmp_path / "train.toml"
    cfg.write_text('[model]\npretrained_model_name_or_path = "m"\n[training]\nnetwork_dim = 16\n'
                   'learning_rate = 0.0005\nenable_bucket = true\nsave_precision = "float"\n'
                   'network_module = "networks.lora"\nresolution = "48,48"\n')
    args = parse(["--config_file", str(cfg), "--learning_rate", "1e-3"])
    assert args.lora_rank == 16 and args.learning_rate == 1e-3 and args.enable_bucket and args.save_dtype == "fp32"
    assert args.pretrained_model_name_or_path == "m" and args.resolution == 48
    assert parse([]).lora_rank == 4  # the file's values do not stick to the parser


def test_output_config_round_trips(tmp_path, capsys, training):
    from mindone_lora_plugin.cli import main

    parse = training.parse

    out = tmp_path / "effective.toml"
    assert main(["train", "--config_file", str(out), "--output_config", "--lora_rank", "8", "--enable_bucket",
                 "--caption_extension", ".caption"]) == 0
    args = parse(["--config_file", str(out)])
    assert args.lora_rank == 8 and args.enable_bucket and args.caption_extension == ".caption"
    assert main(["train", "--config_file", str(out), "--output_config"]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_cached_moments_equal_encoding_the_batch(tiny_sd1, kohya, training):
    """A cached run trains the same numbers: the cache's moments of a batch equal encoding its pixels now."""
    import mindspore as ms
    from mindone.diffusers import AutoencoderKL

    from mindone_lora_plugin.train.data.cache import LatentCache
    from mindone_lora_plugin.train.data.kohya_folders import load_kohya_examples
    from mindone_lora_plugin.train.data.loader import BatchPlan
    from mindone_lora_plugin.train.features.buckets import Buckets
    from mindone_lora_plugin.train.step import VaeEncode

    parse = training.parse

    pynative_cpu()
    encode_cell = VaeEncode(AutoencoderKL.from_pretrained(tiny_sd1, subfolder="vae"))
    args = parse(["--train_data_dir", kohya, "--enable_bucket"])
    examples, _, _ = load_kohya_examples(kohya, "--train_data_dir", args, 32, Buckets(args).image_sizer(32))
    plan = BatchPlan(examples, 2, 32, seed=1, center_crop=True, random_flip=True, bucketed=True)
    cache = LatentCache(lambda p: encode_cell(ms.Tensor(p)).asnumpy(), "v", None, batch_size=2)
    cache.fill(examples, flips=True)
    for i in range(plan.batches_per_epoch):
        batch = plan.batch(0, i)
        assert np.allclose(cache.moments(batch.keys), encode_cell(ms.Tensor(batch.pixels)).asnumpy(), atol=1e-5)


def test_kohya_bucketed_cached_run_records_its_settings(tiny_sd1, kohya, tmp_path, training):
    import json

    from safetensors import safe_open

    train = training.train


    reg = tmp_path / "reg" / "1_thing"
    reg.mkdir(parents=True)
    write_image(reg / "r.png", 32, 32)
    out = str(tmp_path / "out")
    result = train(["--pretrained_model_name_or_path", tiny_sd1, "--train_data_dir", kohya, "--output_dir", out,
                    "--reg_data_dir", str(tmp_path / "reg"), "--max_train_steps", "2", "--train_batch_size", "2",
                    "--report_to", "none", "--mode", "pynative", "--device_target", "CPU", "--enable_bucket",
                    "--center_crop", "--random_flip", "--cache_latents_to_disk", "--cache_text_encoder_outputs",
                    "--seed", "2", "--save_formats", "kohya"])
    assert result.global_step == 2 and all(np.isfinite(result.losses))
    assert len(os.listdir(os.path.join(kohya, ".latent_cache"))) == 2 * 6  # 5 images + 1 reg image, both flips
    with safe_open(result.files[0], framework="numpy") as f:
        meta = f.metadata()
    assert meta["ss_enable_bucket"] == "True" and meta["ss_cache_latents"] == "True"
    assert meta["ss_cache_text_encoder_outputs"] == "True"
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_blue thing": {"n_repeats": 2, "img_count": 2},
                                                   "3_red thing": {"n_repeats": 3, "img_count": 3}}
    info = json.loads(meta["ss_bucket_info"])
    assert sum(b["count"] for b in info["buckets"].values()) == 26 and len(info["buckets"]) >= 3
    import yaml

    hp = yaml.safe_load(open(os.path.join(out, "hparams.yml")))
    assert hp["enable_bucket"] is True and hp["reg_data_dir"] == str(tmp_path / "reg")


# ---------------------------------------------------------------------------------------------------- masked loss

def test_masks_follow_alpha_crop_and_flip_and_weight_the_loss(tiny_sd1, tmp_path):
    import mindspore as ms

    from mindone_lora_plugin.architectures.sd.loss import DenoiseLoss, TextConditioner
    from mindone_lora_plugin.models import load_models
    from mindone_lora_plugin.train.data.loader import BatchPlan
    from mindone_lora_plugin.train.data.masks import MaskSource, latent_masks

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, :8, 3] = 0  # the left quarter is ignored
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    masks = MaskSource(None)
    from mindone_lora_plugin.train.data.loader import decode_image, prepare

    ex = prepare(decode_image(str(path), str(path), "stop"), 32, None, masks(str(path), str(path)))
    ex.captions = ["x"]
    plan = BatchPlan([ex, ex], 2, 32, seed=0, center_crop=True, random_flip=True, masked=True)
    batch = plan.batch(0, 0)
    for m, (key, flipped) in zip(batch.masks, batch.keys):
        ignored = m[:, 24:] if flipped else m[:, :8]
        assert ignored.max() == 0 and m.sum() == 32 * 24
    lat = latent_masks(batch.masks, (16, 16))
    assert lat.shape == (2, 1, 16, 16) and set(np.unique(lat)) <= {0.0, 1.0}

    pynative_cpu()
    models = load_models(tiny_sd1)
    loss = DenoiseLoss(models["unet"], TextConditioner(models["text_encoder"]), False, False, False)
    rng = np.random.default_rng(0)
    t = ms.Tensor
    inputs = (t(rng.standard_normal((2, 4, 16, 16), dtype=np.float32)),
              t(rng.standard_normal((2, 4, 16, 16), dtype=np.float32)), t(np.array([10, 500], np.int32)),
              t(np.full(2, 0.8, np.float32)), t(np.full(2, 0.6, np.float32)), t(np.ones(2, np.float32)),
              t(rng.standard_normal((2, 77, 32), dtype=np.float32)))
    plain = float(loss(*inputs).asnumpy())
    loss.masked = True
    assert abs(float(loss(*inputs, t(np.ones((2, 1, 16, 16), np.float32))).asnumpy()) - plain) < 1e-6
    assert float(loss(*inputs, t(np.zeros((2, 1, 16, 16), np.float32))).asnumpy()) == 0.0
    assert 0 < float(loss(*inputs, t(lat)).asnumpy()) < plain


def test_sdxl_time_ids_carry_each_images_size_crop_and_bucket(tiny_sdxl, kohya, tmp_path, training):
    from mindone_lora_plugin.train.trainer import Trainer

    parse = training.parse

    trainer = Trainer(parse(["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", kohya,
                             "--output_dir", str(tmp_path / "o"), "--train_batch_size", "2", "--report_to", "none",
                             "--mode", "pynative", "--device_target", "CPU", "--enable_bucket", "--seed", "4"]))
    trainer.train_loop = lambda start: trainer  # set up everything, stop before the loop
    trainer.run()
    originals = {(32, 48), (48, 32), (40, 40), (32, 64), (32, 32)}  # (height, width) of the kohya fixture's images
    for i in range(trainer.plan.batches_per_epoch):
        batch = trainer.plan.batch(0, i)
        time_ids = trainer.micro_inputs(0, i, i)[-1].asnumpy()
        h, w = batch.pixels.shape[2:]
        for row, size, crop in zip(time_ids, batch.original_sizes, batch.crops_top_left):
            assert tuple(row[:2]) == size and size in originals
            assert tuple(row[2:4]) == crop and tuple(row[4:]) == (h, w)
