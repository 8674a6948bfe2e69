"""The pretrained shapes base: the scorer, the shipped folder, reproducible pretraining, and a LoRA that learns."""

from __future__ import annotations

import configparser
import hashlib
import os

import numpy as np
import pytest

from mindone_lora_plugin.demo import shapes
from mindone_lora_plugin.demo.shapes_eval import shipped_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_scorer_reads_every_colour_and_shape():
    rng = np.random.default_rng(5)
    for colour in shapes.PALETTE:
        for shape in shapes.SHAPES + shapes.CONCEPT_SHAPES:
            for size in (32, 64):
                assert shapes.classify(shapes.draw(colour, shape, size, rng)) == (colour, shape)


def test_scorer_refuses_what_is_not_a_figure():
    from PIL import Image

    assert shapes.classify(Image.new("RGB", (32, 32), "white")) == (None, None)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert shapes.classify(Image.fromarray(noise))[1] is None
    two = np.asarray(shapes.draw("red", "square", 32)).copy()
    two[:, :6] = (40, 80, 220)  # a blue bar beside the square: neither one shape nor one colour
    assert shapes.classify(Image.fromarray(two)) != ("red", "square")
    assert shapes.asked("a photo of a blue triangle") == ("blue", "triangle")
    assert shapes.asked("a photo of sks") == (None, None)


def test_demo_concept_images_read_as_purple_crosses(tmp_path):
    from PIL import Image

    from mindone_lora_plugin.demo.training import make_instance_images

    folder = make_instance_images(str(tmp_path / "inst"), count=4)
    for name in sorted(os.listdir(folder)):
        im = Image.open(os.path.join(folder, name)).resize((32, 32), Image.BILINEAR)
        assert shapes.classify(im) == ("purple", "cross")


@pytest.mark.smoke
def test_shipped_base_is_packaged_small_fp16_and_loads():
    from mindone_lora_plugin import safetensors_io
    from mindone_lora_plugin.base_model_info import BaseModelInfo
    from mindone_lora_plugin.models import load_models

    folder = shipped_model()
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    assert sum(os.path.getsize(f) for f in files) <= 10 * 2 ** 20
    weights = [f for f in files if f.endswith(".safetensors")]
    assert {os.path.basename(os.path.dirname(f)) for f in weights} == {"unet", "vae", "text_encoder"}
    for f in weights:
        tensors, _ = safetensors_io.load(f)
        assert {str(v.dtype) for v in tensors.values()} == {"float16"}, f
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    patterns = cfg["options.package_data"]["mindone_lora_plugin.demo"]
    assert "assets/shapes-sd1/*" in patterns and "assets/shapes-sd1/*/*" in patterns
    assert BaseModelInfo.from_folder(folder).architecture == "sd1"
    models = load_models(folder)
    assert models["unet"].config.sample_size == 8 and "text_encoder" in models


@pytest.mark.slow
def test_pretraining_reproduces_its_weights(tmp_path):
    from mindone_lora_plugin.demo.pretrain import pretrain

    def run(name, seed):
        out = pretrain(str(tmp_path / name), seed=seed, unet_steps=2, batch_size=2, mode="pynative",
                       log=lambda m: None, variants=1)
        return {os.path.relpath(os.path.join(r, f), out): hashlib.sha256(open(os.path.join(r, f), "rb").read())
                .hexdigest() for r, _, fs in os.walk(out) for f in fs if f.endswith(".safetensors")}

    first, again = run("a", 0), run("b", 0)
    assert len(first) == 3 and first == again
    shipped = {os.path.relpath(os.path.join(r, f), shipped_model()): hashlib.sha256(open(os.path.join(r, f), "rb")
               .read()).hexdigest() for r, _, fs in os.walk(shipped_model()) for f in fs if f.endswith(".safetensors")}
    # the VAE is designed, the text encoder is built from the seed: both equal the shipped ones; the UNet trained
    assert first["vae/diffusion_pytorch_model.safetensors"] == shipped["vae/diffusion_pytorch_model.safetensors"]
    assert first["text_encoder/model.safetensors"] == shipped["text_encoder/model.safetensors"]
    assert first["unet/diffusion_pytorch_model.safetensors"] != shipped["unet/diffusion_pytorch_model.safetensors"]


@pytest.mark.slow
def test_lora_moves_the_score_toward_the_concept_and_weight_zero_is_the_base(tmp_path, training):
    from mindone_lora_plugin import compose
    from mindone_lora_plugin.demo.shapes_eval import Sampler, score_prompt
    from mindone_lora_plugin.demo.training import CONCEPT, CONCEPT_PROMPT, make_concept_dataset
    from mindone_lora_plugin.models import Models

    train = training.train

    base = shipped_model()
    data = make_concept_dataset(str(tmp_path / "concept"), count=6, reference=False)
    result = train(["--pretrained_model_name_or_path", base, "--train_data_dir", data, "--output_dir",
                    str(tmp_path / "out"), "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", "60",
                    "--learning_rate", "3e-3", "--lr_warmup_steps", "0", "--lora_rank", "8", "--lora_targets", "kohya",
                    "--checkpointing_steps", "0", "--report_to", "none", "--device_target", "CPU", "--seed", "0",
                    "--save_formats", "diffusers"])
    sampler = Sampler.from_folder(base, batch=4, steps=10)
    seeds = range(4)
    before = score_prompt(sampler, CONCEPT_PROMPT, seeds, CONCEPT)
    models = Models(unet=sampler.unet, text_encoder=sampler.text_encoder, architecture="sd1")
    saved = {p.name: p.asnumpy().copy() for p in sampler.unet.get_parameters()}
    compose.merge_into_models(models, compose.load_loras([f"{result.files[0]}:0"], base=base))
    at_zero = score_prompt(sampler, CONCEPT_PROMPT, seeds, CONCEPT)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before.images, at_zero.images))
    assert all(np.array_equal(p.asnumpy(), saved[p.name]) for p in sampler.unet.get_parameters())
    compose.merge_into_models(models, compose.load_loras([f"{result.files[0]}:1"], base=base))
    after = score_prompt(sampler, CONCEPT_PROMPT, seeds, CONCEPT)
    purple = [np.asarray(im, np.float32).reshape(-1, 3) for im in after.images]
    assert after.hits > before.hits, (before.readings, after.readings)
    assert any(np.mean(np.linalg.norm(p - shapes.PALETTE["purple"], axis=1) < 60) > 0.1 for p in purple)
