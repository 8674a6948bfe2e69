"""Pretrain the tiny SD1.x "shapes" base model that the demo ships: it draws coloured shapes from captions.

    python -m mindone_lora_plugin.pretrain_tiny --seed 0 --out ./shapes-sd1

Full-parameter training on MindSpore's CPU backend, in GRAPH_MODE, deterministic given ``--seed``:

1. **VAE** (an ``AutoencoderKL``, 32×32 pixels → 4×8×8 latents) as a plain autoencoder (L1 + MSE reconstruction and
   a small latent penalty) on random figures — ellipses, boxes, triangles, plus signs — in random colours, drawn
   fresh every step. It is a generic codec for this flat-colour world; the encoder's log-variance head is then fixed
   at a tiny constant (a near-deterministic encoder) and ``scaling_factor`` set so that latents have unit variance.
2. **UNet** (``UNet2DConditionModel``, cross-attention at both levels) with the epsilon objective and min-SNR-5
   weights on the latents of the 12 base classes (red, green, blue, yellow × circle, square, triangle), captioned
   "a red circle", and sometimes only "a circle", "a red shape", "a shape" or "" (for classifier-free guidance).
3. The **CLIP text encoder** stays as built (random, frozen): the UNet learns to read its embeddings.

The folder is written in diffusers layout with fp16 safetensors (``StableDiffusionPipeline.from_pretrained`` loads
it). The demo's concept (a purple cross) is never shown to the UNet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from mindone_lora_plugin.shapes import COLOURS, SHAPES, draw

RESOLUTION = 32
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
           norm_num_groups=8, sample_size=RESOLUTION, down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3)
LOGVAR = -14.0  # the encoder's fixed log-variance: std 1e-3, so sampled latents equal the mean to 3 digits
VARIANTS = 48  # drawn images per class for the UNet stage
CFG_DROPOUT = 0.1


def class_captions(colour: str, shape: str) -> list[tuple[str, float]]:
    """The captions a training image of ``shape`` in ``colour`` is shown with, and their probabilities."""
    return [(f"a {colour} {shape}", 0.7), (f"a {shape}", 0.075), (f"a {colour} shape", 0.075), ("a shape", 0.05),
            ("", CFG_DROPOUT)]


# ---------------------------------------------------------------------------------------------------- data


def vae_batch(rng, n: int) -> np.ndarray:
    """``n`` random single-figure images in [-1, 1], NCHW: any colour, any of four shapes, near-white grounds."""
    out = []
    for _ in range(n):
        shape = ("circle", "square", "triangle", "cross")[int(rng.integers(4))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        ground = tuple(int(v) for v in (255 - rng.integers(0, 16, 3)))
        out.append(np.asarray(draw(colour, shape, RESOLUTION, rng, background=ground)))
    return _to_pixels(np.stack(out))


def _to_pixels(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def unet_images(seed: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """``VARIANTS`` drawings of each base class (pixels NCHW in [-1, 1]) and their (colour, shape) labels."""
    images, labels = [], []
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            rng = np.random.default_rng([seed, ci, si, 2])
            for _ in range(VARIANTS):
                images.append(np.asarray(draw(colour, shape, RESOLUTION, rng)))
                labels.append((colour, shape))
    return _to_pixels(np.stack(images)), labels


# ---------------------------------------------------------------------------------------------------- models


def build_models(seed: int, workdir: str):
    """Fresh (seeded) tokenizer, CLIP text encoder, VAE and UNet."""
    import mindspore as ms

    from mindone.diffusers import AutoencoderKL, UNet2DConditionModel
    from mindone.transformers import CLIPTextModel
    from transformers import CLIPTextConfig

    from mindone_lora_plugin.tiny import CLIP, build_tokenizer

    tokenizer = build_tokenizer(os.path.join(workdir, "tokenizer"))

    def seeded(offset, factory):
        ms.set_seed(seed + offset)
        np.random.seed(seed + offset)
        return factory()

    text_encoder = seeded(2, lambda: CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **CLIP)))
    vae = seeded(1, lambda: AutoencoderKL(**VAE))
    unet = seeded(0, lambda: UNet2DConditionModel(**UNET))
    return tokenizer, text_encoder, vae, unet


def _train_cell(loss_cell, params, lrs, max_grad_norm=1.0):
    """A compiled AdamW step over ``params`` with the per-step learning rates ``lrs``."""
    import mindspore as ms
    from mindspore import nn

    from mindone_lora_plugin.train.step import TrainStep

    optimizer = nn.AdamWeightDecay(params, learning_rate=list(lrs) + [lrs[-1]], weight_decay=0.0)
    loss_cell.set_train(True)
    return TrainStep(ms.value_and_grad(loss_cell, None, optimizer.parameters), optimizer, max_grad_norm)


def schedule(base: float, steps: int, warmup: int) -> list[float]:
    """Linear warm-up, then cosine decay to a tenth of ``base``."""
    out = []
    for i in range(steps):
        if i < warmup:
            out.append(base * (i + 1) / warmup)
        else:
            p = (i - warmup) / max(1, steps - warmup)
            out.append(base * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p))))
    return out


def _cells():
    """The loss cells (defined lazily: they subclass MindSpore's ``nn.Cell``)."""
    import mindspore as ms
    from mindspore import nn, ops

    class AutoencoderLoss(nn.Cell):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def construct(self, x):
            mean = self.vae.encode(x)[0][:, :4]
            y = self.vae.decode(mean)[0]
            return ops.abs(y - x).mean() + ops.square(y - x).mean() + 1e-4 * ops.square(mean).mean()

    class EpsilonLoss(nn.Cell):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def construct(self, latents, noise, timesteps, a, s, weights, embeds):
            noisy = a.reshape((-1, 1, 1, 1)) * latents + s.reshape((-1, 1, 1, 1)) * noise
            pred = self.unet(noisy, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
            return (ops.square(pred.astype(ms.float32) - noise).mean(axis=(1, 2, 3)) * weights).mean()

    class Encode(nn.Cell):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def construct(self, x):
            return self.vae.encode(x)[0][:, :4]

    return AutoencoderLoss, EpsilonLoss, Encode


# ---------------------------------------------------------------------------------------------------- stages


def train_vae(vae, seed: int, steps: int, batch_size: int, lr: float, log) -> list[float]:
    import mindspore as ms
    from tqdm.auto import tqdm

    AutoencoderLoss, _, _ = _cells()
    step = _train_cell(AutoencoderLoss(vae), vae.trainable_params(), schedule(lr, steps, min(50, steps)))
    losses = []
    for i in tqdm(range(steps), desc="VAE", mininterval=10, disable=None):
        x = vae_batch(np.random.default_rng([seed, i, 1]), batch_size)
        losses.append(float(step(ms.Tensor(x)).asnumpy()))
        if (i + 1) % 50 == 0 or i + 1 == steps:
            log(f"vae step {i + 1}/{steps} loss {np.mean(losses[-50:]):.4f}")
    vae.set_train(False)
    return losses


def fix_vae_head(vae) -> None:
    """Make the encoder's log-variance a constant (:data:`LOGVAR`): zero weights, constant bias."""
    import mindspore as ms

    conv = vae.quant_conv
    w, b = conv.weight.asnumpy().copy(), conv.bias.asnumpy().copy()
    w[4:] = 0.0
    b[4:] = LOGVAR
    conv.weight.set_data(ms.Tensor(w))
    conv.bias.set_data(ms.Tensor(b))


def encode_all(vae, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    import mindspore as ms

    _, _, Encode = _cells()
    enc = Encode(vae)
    enc.set_train(False)
    out = [enc(ms.Tensor(pixels[i:i + batch])).asnumpy() for i in range(0, len(pixels), batch)]
    return np.concatenate(out)


def text_embeddings(tokenizer, text_encoder, captions: list[str]) -> np.ndarray:
    import mindspore as ms

    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np").input_ids.astype(np.int32)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        return text_encoder(ms.Tensor(ids))[0].asnumpy()
    finally:
        ms.set_context(mode=mode)


def train_unet(unet, latents, labels, embeds: dict[str, np.ndarray], seed: int, steps: int, batch_size: int,
               lr: float, log) -> list[float]:
    import mindspore as ms
    from tqdm.auto import tqdm

    from mindone_lora_plugin.tiny import SCHEDULER

    from mindone.diffusers import DDIMScheduler

    _, EpsilonLoss, _ = _cells()
    acp = DDIMScheduler(**SCHEDULER).alphas_cumprod
    acp = np.asarray(acp.asnumpy() if hasattr(acp, "asnumpy") else acp, np.float64)
    step = _train_cell(EpsilonLoss(unet), unet.trainable_params(), schedule(lr, steps, min(100, steps)))
    options = {label: class_captions(*label) for label in set(labels)}
    losses = []
    for i in tqdm(range(steps), desc="UNet", mininterval=10, disable=None):
        rng = np.random.default_rng([seed, i, 3])
        idx = rng.integers(len(latents), size=batch_size)
        caps = []
        for j in idx:
            texts, probs = zip(*options[labels[j]])
            caps.append(texts[int(rng.choice(len(texts), p=np.asarray(probs) / sum(probs)))])
        x = latents[idx]
        noise = rng.standard_normal(x.shape, dtype=np.float32)
        t = rng.integers(0, len(acp), size=batch_size)
        snr = acp[t] / (1 - acp[t])
        weights = np.minimum(snr, 5.0) / snr
        f = lambda v: ms.Tensor(np.asarray(v, np.float32))  # noqa: E731
        loss = step(f(x), f(noise), ms.Tensor(t.astype(np.int32)), f(np.sqrt(acp[t])), f(np.sqrt(1 - acp[t])),
                    f(weights), f(np.stack([embeds[c] for c in caps])))
        losses.append(float(loss.asnumpy()))
        if (i + 1) % 100 == 0 or i + 1 == steps:
            log(f"unet step {i + 1}/{steps} loss {np.mean(losses[-100:]):.4f}")
    unet.set_train(False)
    return losses


# ---------------------------------------------------------------------------------------------------- saving


def save_folder(out: str, tokenizer, text_encoder, vae, unet, info: dict) -> str:
    """Write the diffusers-layout folder with fp16 safetensors, under a temporary name renamed into place."""
    import shutil

    from mindone.diffusers import DDIMScheduler, StableDiffusionPipeline

    from mindone_lora_plugin import safetensors_io
    from mindone_lora_plugin.tiny import SCHEDULER, _to_transformers_names

    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    _to_transformers_names(os.path.join(tmp, "text_encoder", "model.safetensors"))
    for root, _, files in os.walk(tmp):
        for name in files:
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                tensors, metadata = safetensors_io.load(path)
                half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}
                safetensors_io.save(half, path, metadata)
    with open(os.path.join(tmp, "pretraining.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def pretrain(out: str, seed: int = 0, vae_steps: int = 400, unet_steps: int = 1200, batch_size: int = 24,
             vae_lr: float = 2e-3, unet_lr: float = 2e-3, mode: str = "graph", log=print) -> str:
    """Run both stages and write the model folder at ``out``; return ``out``."""
    import tempfile

    from mindone_lora_plugin.runtime import setup

    setup("CPU", mode, seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, text_encoder, vae, unet = build_models(seed, tmp)
        text_encoder.set_train(False)
        vae_losses = train_vae(vae, seed, vae_steps, batch_size, vae_lr, log)
        fix_vae_head(vae)
        pixels, labels = unet_images(seed)
        means = encode_all(vae, pixels)
        scaling = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scaling)
        log(f"VAE done in {time.time() - t0:.0f}s; latent std {means.std():.4f} → scaling_factor {scaling:.4f}")
        captions = sorted({c for label in set(labels) for c, _ in class_captions(*label)})
        embeds = dict(zip(captions, text_embeddings(tokenizer, text_encoder, captions)))
        unet_losses = train_unet(unet, means * scaling, labels, embeds, seed, unet_steps, batch_size, unet_lr, log)
        info = {"seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps, "batch_size": batch_size,
                "vae_lr": vae_lr, "unet_lr": unet_lr, "mode": mode, "scaling_factor": scaling,
                "final_vae_loss": float(np.mean(vae_losses[-50:])), "final_unet_loss": float(np.mean(unet_losses[-100:])),
                "command": f"python -m mindone_lora_plugin.pretrain_tiny --seed {seed} --vae_steps {vae_steps} "
                           f"--unet_steps {unet_steps} --batch_size {batch_size} --out OUT"}
        save_folder(out, tokenizer, text_encoder, vae, unet, info)
    log(f"wrote {out} in {time.time() - t0:.0f}s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mindone_lora_plugin.pretrain_tiny",
                                description="Pretrain the tiny SD1.x shapes base model on the CPU.")
    p.add_argument("--out", required=True, help="the model folder to write (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_steps", type=int, default=400)
    p.add_argument("--unet_steps", type=int, default=1200)
    p.add_argument("--batch_size", type=int, default=24)
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--unet_lr", type=float, default=2e-3)
    p.add_argument("--mode", choices=("graph", "pynative"), default="graph")
    a = p.parse_args(argv)
    pretrain(a.out, a.seed, a.vae_steps, a.unet_steps, a.batch_size, a.vae_lr, a.unet_lr, a.mode,
             log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
