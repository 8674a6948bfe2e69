"""``mindone-lora train --demo [sd1|sdxl|dreambooth|flux|sd3]``: the whole job on a tiny model, on CPU, in minutes.

``sd1`` (the default) starts from the shipped pretrained shapes base (``mindone_lora_plugin/demo/assets/shapes-sd1``,
made
by :mod:`mindone_lora_plugin.demo.pretrain`), which draws red/green/blue/yellow circles, squares and triangles from
captions. It trains a LoRA in GRAPH_MODE on twelve images of a concept the base never saw — "a photo of sks", a purple
cross — writes both formats, checkpoints, the loss curve and the hparams, checks that every saved file loads back to
the same outputs, and then *measures* what the LoRA did: over 8 seeds, how often the concept prompt draws a purple
cross before and after, and whether two base prompts still draw their shapes (:mod:`mindone_lora_plugin.demo.shapes`).
``dreambooth`` does the same as DreamBooth with prior preservation ("a sks shape", class "a shape"). ``sdxl`` keeps
the randomly initialised tiny SDXL model: its pictures are noise, it shows the job running end to end; ``flux`` does the
same with a tiny FLUX.1-dev model (flow matching, kohya FLUX and diffusers files), ``sd3`` with a tiny SD3.5 model.
Flags given on the command line override the demo's defaults.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mindone_lora_plugin.demo.shapes import COLOURS, SHAPES
from mindone_lora_plugin.errors import LoraError

DEMO_DEFAULTS = dict(train_batch_size=4, max_train_steps=120, learning_rate=1e-3, lr_scheduler="constant",
                     lr_warmup_steps=0, lora_rank=4, lora_alpha=4.0, lora_targets="kohya", checkpointing_steps=60,
                     checkpoints_total_limit=1, num_validation_images=4, validation_epochs=1000, seed=0,
                     num_inference_steps=8, report_to="none")
#: the pretrained sd1 demo: a LoRA on the concept images only
CONCEPT_PROMPT = "a photo of sks"
CONCEPT = ("purple", "cross")
BASE_CHECKS = ("a red circle", "a blue square")
SD1_DEFAULTS = dict(DEMO_DEFAULTS, train_batch_size=6, max_train_steps=100, learning_rate=2e-3, lora_rank=8,
                    lora_alpha=8.0, checkpointing_steps=50)
#: the tiny FLUX.1-dev demo: fewer, shorter validation images (the PyNative FluxPipeline is the slow part on CPU)
FLUX_DEFAULTS = dict(DEMO_DEFAULTS, num_validation_images=2, num_inference_steps=4)
#: the tiny SD3.5 demo: every Linear of the joint blocks (kohya's default), short validation as for FLUX
SD3_DEFAULTS = dict(FLUX_DEFAULTS, lora_targets="all-linear")
SEEDS = range(8)
TARGETS = {"before": 1, "after": 6, "kept": 6}  # out of 8 seeds

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


def make_concept_dataset(folder: str, count: int = 12, reference: bool = True) -> str:
    """An imagefolder of the demo concept — :func:`make_instance_images` captioned "a photo of sks" — and, with
    ``reference``, one drawing of each of the 12 base classes captioned as the base model knows it ("a red circle"),
    so that training on the concept keeps the base prompts drawing what they drew (regularisation images)."""
    from mindone_lora_plugin.demo.shapes import draw

    make_instance_images(folder, count=count)
    rows = [{"file_name": f, "text": CONCEPT_PROMPT} for f in sorted(os.listdir(folder)) if f.startswith("sks_")]
    if reference:
        rng = np.random.default_rng(2)
        for colour in COLOURS:
            for shape in SHAPES:
                name = f"ref_{colour}_{shape}.png"
                draw(colour, shape, 64, rng).save(os.path.join(folder, name))
                rows.append({"file_name": name, "text": f"a {colour} {shape}"})
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


DREAMBOOTH_DEFAULTS = dict(instance_prompt="a sks shape", class_prompt="a shape", num_class_images=8,
                           sample_batch_size=4, train_batch_size=2, max_train_steps=200)


def run_demo(args) -> int:
    from mindone_lora_plugin.architectures.sd.tiny import RESOLUTION, ensure_tiny_model
    from mindone_lora_plugin.train.flags.training import add_train_arguments
    from mindone_lora_plugin.train.trainer import Trainer

    pretrained = args.demo in ("sd1", "dreambooth")
    kind = "sd1" if args.demo == "dreambooth" else args.demo
    root = os.path.abspath("demo-output")
    parser_defaults = _parser_defaults(add_train_arguments)
    defaults = {"sd1": SD1_DEFAULTS, "sdxl": DEMO_DEFAULTS, "flux": FLUX_DEFAULTS, "sd3": SD3_DEFAULTS,
                "dreambooth": dict(SD1_DEFAULTS, **DREAMBOOTH_DEFAULTS)}[args.demo]
    given = {k for k in defaults if getattr(args, k) != parser_defaults.get(k)}
    for key, value in defaults.items():  # the demo's defaults, unless the user gave the flag
        if key not in given:
            setattr(args, key, value)
    if args.pretrained_model_name_or_path is None:
        if pretrained:
            from mindone_lora_plugin.demo.shapes_eval import shipped_model

            args.pretrained_model_name_or_path = shipped_model()
            if not os.path.isfile(os.path.join(args.pretrained_model_name_or_path, "model_index.json")):
                raise LoraError(f"the shipped shapes base model is missing ({args.pretrained_model_name_or_path}); "
                                f"reinstall the package or rebuild it with python -m mindone_lora_plugin.demo.pretrain "
                                f"--seed 0 --out {args.pretrained_model_name_or_path}")
            print(f"base model: the pretrained shapes model {args.pretrained_model_name_or_path}", flush=True)
        else:
            print(f"building the tiny {kind} model (random weights) …", flush=True)
            if kind == "flux":
                from mindone_lora_plugin.architectures.flux import tiny as flux_tiny

                args.pretrained_model_name_or_path = flux_tiny.ensure_tiny_model("dev", os.path.join(root, "tiny-flux"))
            elif kind == "sd3":
                from mindone_lora_plugin.architectures.sd3 import tiny as sd3_tiny

                args.pretrained_model_name_or_path = sd3_tiny.ensure_tiny_model("3.5", os.path.join(root, "tiny-sd3"))
            else:
                args.pretrained_model_name_or_path = ensure_tiny_model(kind, os.path.join(root, f"tiny-{kind}"))
    if args.output_dir == parser_defaults["output_dir"]:
        args.output_dir = os.path.join(root, f"lora-{args.demo}")
    args.resolution = args.resolution or RESOLUTION
    args.device_target = args.device_target or "CPU"
    if not pretrained:
        if args.train_data_dir is None and args.dataset_name is None:
            args.train_data_dir = make_shapes_dataset(os.path.join(root, "shapes"))
        args.validation_prompt = args.validation_prompt or "a red circle"
        args._validate_before = True
        result = Trainer(args).run()
        return _report_files(result, args, verify_saved_files(result, args))

    from mindone_lora_plugin.demo.shapes_eval import Sampler
    from mindone_lora_plugin.runtime.process import setup

    setup(args.device_target, args.mode, seed=args.seed)
    args._validate_before = bool(args.validation_prompt)  # the trainer's own validation only when asked for
    print("measuring the base model …", flush=True)
    sampler = Sampler.from_folder(args.pretrained_model_name_or_path)
    if args.demo == "dreambooth":
        args.instance_data_dir = args.instance_data_dir or make_instance_images(os.path.join(root, "sks-instance"))
        args.class_data_dir = args.class_data_dir or os.path.join(root, "class-shape")
        args.with_prior_preservation = True
        _fill_class_images(sampler, args.class_data_dir, args.class_prompt, args.num_class_images)
        checks = [(args.instance_prompt, CONCEPT, "concept"), (args.class_prompt, _is_base_figure, "class kept")]
    else:
        if args.train_data_dir is None and args.dataset_name is None:
            args.train_data_dir = make_concept_dataset(os.path.join(root, "sks-concept"))
        checks = [(CONCEPT_PROMPT, CONCEPT, "concept")] + [(p, None, "prior kept") for p in BASE_CHECKS]
    before = _measure(sampler, checks)
    result = Trainer(args).run()
    reloaded = verify_saved_files(result, args)
    lora_file = next(f for f in result.files if f.endswith("pytorch_lora_weights.safetensors"))
    by_weight = _measure_weights(sampler, args.pretrained_model_name_or_path, lora_file, checks, (0.0, 0.5, 1.0))
    after = by_weight[1.0]
    folder = os.path.join(args.output_dir, "validation")
    result.validation_images += _write_pictures(folder, checks, before, after, by_weight)
    code = _report_files(result, args, reloaded)
    same = all(np.array_equal(np.asarray(b), np.asarray(z)) for r0, rz in zip(before, by_weight[0.0])
               for b, z in zip(r0.images, rz.images))
    _print_scores(checks, before, after, same)
    return code


def _is_base_figure(reading) -> bool:
    from mindone_lora_plugin.demo.shapes_eval import is_base_figure

    return is_base_figure(reading)


def _measure(sampler, checks):
    from mindone_lora_plugin.demo.shapes_eval import score_prompt

    return [score_prompt(sampler, prompt, SEEDS, want) for prompt, want, _ in checks]


def _measure_weights(sampler, model: str, lora_file: str, checks, weights) -> dict:
    """Scores with the saved LoRA fused into the sampler's base weights at each weight (restored afterwards)."""
    from mindone_lora_plugin import compose
    from mindone_lora_plugin.models import Models

    models = Models(unet=sampler.unet, text_encoder=sampler.text_encoder, architecture="sd1")
    saved = {(c, p.name): p.asnumpy().copy() for c, cell in models.items() for p in cell.get_parameters()}
    out = {}
    try:
        for w in weights:
            compose.merge_into_models(models, compose.load_loras([f"{lora_file}:{w}"], base=model))
            sampler.clear_text_cache()
            out[w] = _measure(sampler, checks)
            _restore(models, saved)
    finally:
        _restore(models, saved)
        sampler.clear_text_cache()
    return out


def _restore(models, saved) -> None:
    import mindspore as ms

    for c, cell in models.items():
        for p in cell.get_parameters():
            p.set_data(ms.Tensor(saved[(c, p.name)], dtype=p.dtype))


def _write_pictures(folder: str, checks, before, after, by_weight) -> list[str]:
    from mindone_lora_plugin.train.visuals import save_rows

    def label(score, when):
        return f"{when}: {score.prompt}\n{score.hits}/{score.total} {checks_label(score)}"

    def checks_label(score):
        want = next(w for p, w, _ in checks if p == score.prompt)
        return " ".join(want) if isinstance(want, tuple) else ("base shape" if callable(want) else
                                                               " ".join(str(x) for x in _asked(score.prompt)))

    paths = [save_rows([(label(b, "base"), b.images) for b in before], os.path.join(folder, "before.png"),
                       "before training (base model)"),
             save_rows([(label(a, "LoRA"), a.images) for a in after], os.path.join(folder, "final.png"),
                       "after training (LoRA weight 1.0)")]
    rows = []
    for b, a in zip(before, after):
        rows += [(label(b, "before"), b.images), (label(a, "after"), a.images)]
    paths.append(save_rows(rows, os.path.join(folder, "before_after.png"), "before / after the LoRA, 8 seeds"))
    rows = [(f"LoRA weight {w:g}\n{s[0].prompt}\n{s[0].hits}/{s[0].total} {checks_label(s[0])}", s[0].images)
            for w, s in sorted(by_weight.items())]
    paths.append(save_rows(rows, os.path.join(folder, "lora_weights.png"), "one LoRA at weights 0, 0.5 and 1.0"))
    return paths


def _asked(prompt):
    from mindone_lora_plugin.demo.shapes import asked

    return asked(prompt)


def _print_scores(checks, before, after, same_at_zero: bool) -> None:
    print("\nMeasured in this run (8 seeds per prompt, colour-and-shape scorer, mindone_lora_plugin.demo.shapes):")
    print(f"  {'prompt':22s} {'looking for':16s} {'before':>7s} {'after':>7s}  target")
    for (prompt, want, role), b, a in zip(checks, before, after):
        what = " ".join(want) if isinstance(want, tuple) else ("any base shape" if callable(want) else
                                                               " ".join(str(x) for x in _asked(prompt)))
        if role == "concept":
            ok = b.hits <= TARGETS["before"] and a.hits >= TARGETS["after"]
            target = f"before ≤ {TARGETS['before']}/8, after ≥ {TARGETS['after']}/8"
        else:
            ok = a.hits >= TARGETS["kept"]
            target = f"{role}: after ≥ {TARGETS['kept']}/8"
        print(f"  {prompt:22s} {what:16s} {b.hits:>5d}/8 {a.hits:>5d}/8  {target}  {'met' if ok else 'MISSED'}")
    print(f"  LoRA weight 0 reproduces the base images exactly: {'yes' if same_at_zero else 'NO'}")


def _fill_class_images(sampler, folder: str, prompt: str, wanted: int) -> None:
    """Class images for prior preservation, drawn by the base model with the fast sampler (the trainer would make
    the same kind of images with the slower PyNative pipeline)."""
    from mindone_lora_plugin.safetensors_io import atomic_path
    from mindone_lora_plugin.train.data.loader import IMAGE_SUFFIXES

    os.makedirs(folder, exist_ok=True)
    have = len([f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES)])
    if have >= wanted:
        return
    for i, im in enumerate(sampler.sample(prompt, range(1000 + have, 1000 + wanted))):
        with atomic_path(os.path.join(folder, f"{have + i:05d}-base.png")) as tmp:
            im.save(tmp, format="PNG")


def _report_files(result, args, checks) -> int:
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
    from mindone_lora_plugin.train.flags.settings import options_from_args

    pm = get_plugin_manager()
    trained = result.models
    options = options_from_args(args, trained.architecture, pm)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        reference = model_outputs(trained)
        out = {}
        for path in result.files:
            fresh = load_models(args.pretrained_model_name_or_path)
            pm.load_weights(fresh, options, path)
            got = model_outputs(fresh)
            diff = max(float(np.abs(got[k] - reference[k]).max()) for k in reference)
            tol = 1e-4 if (args.save_dtype in (None, "fp32")) else 5e-2
            out[path] = f"ok, max abs difference {diff:.2e}" if diff <= tol else f"MISMATCH {diff:.2e}"
        return out
    finally:
        ms.set_context(mode=mode)


def model_outputs(models) -> dict[str, np.ndarray]:
    """The denoiser's and text encoders' outputs on fixed, seeded inputs (numpy arrays by component name)."""
    import mindspore as ms

    if models.architecture == "sd3":
        from mindone_lora_plugin.architectures.sd3.tiny import probe_outputs

        return probe_outputs(models)
    if "transformer" in models:
        from mindone_lora_plugin.architectures.flux.loss import image_ids

        rng = np.random.default_rng(123)
        model, ids = models["transformer"], ms.Tensor(np.arange(8, dtype=np.int32)[None] + 3)
        cfg, t5 = model.config, models["text_encoder_2"](ids, return_dict=False)[0]
        pooled = models["text_encoder"](ids, return_dict=False)[1]
        x = ms.Tensor(rng.standard_normal((1, 16, cfg.in_channels)).astype(np.float32))
        guidance = ms.Tensor([3.5], ms.float32) if cfg.guidance_embeds else None
        out = model(x, t5, pooled, ms.Tensor([0.5], ms.float32), image_ids(8, 8), ms.ops.zeros((8, 3), ms.float32),
                    guidance, return_dict=False)[0]
        return {"transformer": out.asnumpy(), "text_encoder": pooled.asnumpy(), "text_encoder_2": t5.asnumpy()}
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
    out["unet"] = unet(x, ms.Tensor([500], ms.int32), encoder_hidden_states=emb, return_dict=False,
                       **kwargs)[0].asnumpy()
    return out


def _parser_defaults(add_arguments) -> dict:
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return {a.dest: a.default for a in p._actions}
