"""``mindone-lora train --demo [sd1|sdxl]``: the whole job on the built-in tiny model, on CPU, in a few minutes.

It builds the tiny model and a small captioned dataset of coloured shapes, trains a LoRA in GRAPH_MODE, writes both
formats, a sample grid before and after, and the loss curve, checks that every saved file loads back to the same
outputs, and prints what it wrote where. Flags given on the command line override the demo's defaults.
"""

from __future__ import annotations

import json
import os

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
DEMO_DEFAULTS = dict(train_batch_size=4, max_train_steps=120, learning_rate=1e-3, lr_scheduler="constant",
                     lr_warmup_steps=0, lora_rank=4, lora_alpha=4.0, lora_targets="kohya", checkpointing_steps=60,
                     checkpoints_total_limit=1, num_validation_images=4, validation_epochs=1000, seed=0,
                     num_inference_steps=8, report_to="none")


def make_shapes_dataset(folder: str, size: int = 64, repeats: int = 2) -> str:
    """Write an imagefolder of coloured shapes on white, captions naming colour and shape (``metadata.jsonl``)."""
    from PIL import Image, ImageDraw

    os.makedirs(folder, exist_ok=True)
    rows = []
    rng = np.random.default_rng(0)
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for r in range(repeats):
                img = Image.new("RGB", (size, size), "white")
                d = ImageDraw.Draw(img)
                m = int(size * (0.15 + 0.1 * rng.random()))
                box = [m, m, size - m, size - m]
                if shape == "circle":
                    d.ellipse(box, fill=rgb)
                elif shape == "square":
                    d.rectangle(box, fill=rgb)
                else:
                    d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=rgb)
                name = f"{colour}_{shape}_{r}.png"
                img.save(os.path.join(folder, name))
                rows.append({"file_name": name, "text": f"a {colour} {shape}"})
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def make_instance_images(folder: str, size: int = 64, count: int = 4) -> str:
    """DreamBooth instance images of one distinctive subject: a purple cross, slightly moved and resized."""
    from PIL import Image, ImageDraw

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        img = Image.new("RGB", (size, size), (250, 250, 240))
        d = ImageDraw.Draw(img)
        c = size // 2 + int(rng.integers(-4, 5))
        arm, w = int(size * (0.3 + 0.05 * rng.random())), size // 8
        d.rectangle([c - arm, c - w, c + arm, c + w], fill=(130, 40, 170))
        d.rectangle([c - w, c - arm, c + w, c + arm], fill=(130, 40, 170))
        img.save(os.path.join(folder, f"sks_{i}.png"))
    return folder


DREAMBOOTH_DEFAULTS = dict(instance_prompt="a photo of sks toy", class_prompt="a photo of a toy",
                           num_class_images=8, sample_batch_size=4, train_batch_size=2, max_train_steps=80)


def run_demo(args) -> int:
    from mindone_lora_plugin.tiny import RESOLUTION, ensure_tiny_model
    from mindone_lora_plugin.train.arguments import add_train_arguments
    from mindone_lora_plugin.train.trainer import Trainer

    kind = "sd1" if args.demo == "dreambooth" else args.demo
    root = os.path.abspath("demo-output")
    parser_defaults = _parser_defaults(add_train_arguments)
    defaults = dict(DEMO_DEFAULTS, **(DREAMBOOTH_DEFAULTS if args.demo == "dreambooth" else {}))
    for key, value in defaults.items():  # the demo's defaults, unless the user gave the flag
        if getattr(args, key) == parser_defaults.get(key):
            setattr(args, key, value)
    if args.pretrained_model_name_or_path is None:
        print(f"building the tiny {kind} model …", flush=True)
        args.pretrained_model_name_or_path = ensure_tiny_model(kind, os.path.join(root, f"tiny-{kind}"))
    if args.demo == "dreambooth":
        args.instance_data_dir = args.instance_data_dir or make_instance_images(os.path.join(root, "sks-instance"))
        args.class_data_dir = args.class_data_dir or os.path.join(root, "class-toy")
        args.with_prior_preservation = True
        args.validation_prompt = args.validation_prompt or args.instance_prompt
    elif args.train_data_dir is None and args.dataset_name is None:
        args.train_data_dir = make_shapes_dataset(os.path.join(root, "shapes"))
    if args.output_dir == parser_defaults["output_dir"]:
        args.output_dir = os.path.join(root, f"lora-{args.demo}")
    args.resolution = args.resolution or RESOLUTION
    args.validation_prompt = args.validation_prompt or "a red circle"
    args.device_target = args.device_target or "CPU"
    args._validate_before = True
    result = Trainer(args).run()
    checks = verify_saved_files(result, args)
    print("\nDemo finished. Wrote:")
    for path in result.files:
        print(f"  {path}  (loads back: {checks[path]})")
    for path in result.validation_images:
        print(f"  {path}")
    if result.loss_curve:
        print(f"  {result.loss_curve}")
    for path in result.checkpoints:
        print(f"  {path}/")
    print(f"  {os.path.join(args.output_dir, 'hparams.yml')}")
    print(f"first/last loss: {result.losses[0]:.4f} / {result.losses[-1]:.4f}")
    return 0 if all(v.startswith("ok") for v in checks.values()) else 1


def verify_saved_files(result, args) -> dict[str, str]:
    """Load every written file into fresh models and compare UNet/text-encoder outputs with the trained ones."""
    import mindspore as ms

    from mindone_lora_plugin.models import load_models
    from mindone_lora_plugin.plugins import get_plugin_manager
    from mindone_lora_plugin.train.settings import options_from_args

    pm = get_plugin_manager()
    trained = result.models
    options = options_from_args(args, trained.architecture, pm)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        reference = _outputs(trained)
        out = {}
        for path in result.files:
            fresh = load_models(args.pretrained_model_name_or_path)
            pm.load_weights(fresh, options, path)
            got = _outputs(fresh)
            diff = max(float(np.abs(got[k] - reference[k]).max()) for k in reference)
            tol = 1e-4 if (args.save_dtype in (None, "fp32")) else 5e-2
            out[path] = f"ok, max abs difference {diff:.2e}" if diff <= tol else f"MISMATCH {diff:.2e}"
        return out
    finally:
        ms.set_context(mode=mode)


def _outputs(models) -> dict[str, np.ndarray]:
    import mindspore as ms

    rng = np.random.default_rng(123)
    unet = models["unet"]
    cfg = unet.config
    x = ms.Tensor(rng.standard_normal((1, cfg.in_channels, cfg.sample_size, cfg.sample_size)).astype(np.float32))
    ids = ms.Tensor(np.arange(8, dtype=np.int32)[None] + 3)
    out = {}
    te_out = []
    for comp in ("text_encoder", "text_encoder_2"):
        if comp in models:
            hidden = models[comp](ids, output_hidden_states=True)[-1][-2]
            out[comp] = hidden.asnumpy()
            te_out.append(hidden)
    emb = ms.ops.concat(te_out, axis=-1) if len(te_out) > 1 else te_out[0]
    kwargs = {}
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        pooled = models["text_encoder_2"](ids)[0]
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ms.Tensor([[32, 32, 0, 0, 32, 32]],
                                                                                      ms.float32)}
    out["unet"] = unet(x, ms.Tensor([500], ms.int32), encoder_hidden_states=emb, return_dict=False, **kwargs)[0].asnumpy()
    return out


def _parser_defaults(add_arguments) -> dict:
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return {a.dest: a.default for a in p._actions}
