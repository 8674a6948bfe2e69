"""Pretrain the tiny SD1.x "shapes" base model that the demo ships: it draws coloured shapes from captions.

    python -m mindone_lora_plugin.demo.pretrain --seed 0 --out ./shapes-sd1

Full-parameter training on MindSpore's CPU backend, in GRAPH_MODE, deterministic given ``--seed``:

1. **VAE** (an ``AutoencoderKL``, 32×32 pixels → 4×8×8 latents) as a plain autoencoder (L1 + MSE reconstruction and
   a small latent penalty) on random figures — ellipses, boxes, triangles, plus signs — in random colours, drawn
   fresh every step. It is a generic codec for this flat-colour world; the encoder's log-variance head is then fixed
   at a tiny constant (a near-deterministic encoder) and ``scaling_factor`` set so that latents have unit variance.
2. **UNet** (``UNet2DConditionModel``, cross-attention at both levels) with the v-prediction objective and min-SNR-5
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

from mindone_lora_plugin.demo.shapes import COLOURS, SHAPES, draw

RESOLUTION = 32
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(16, 16, 16), layers_per_block=1, latent_channels=4,
           norm_num_groups=4, sample_size=RESOLUTION, down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, mid_block_add_attention=False)
#: DDPM's linear schedule: its terminal signal (sqrt(ᾱ) ≈ 0.01 at t = 950) is small enough that a sample's start
#: noise does not pass for a colour — with SD's scaled-linear schedule (0.07) the mean of 8×8 start noise did
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
LOGVAR = -14.0  # the encoder's fixed log-variance: std 1e-3, so sampled latents equal the mean to 3 digits
_K = 100.0  # the constant channels that make every GroupNorm (nearly) linear, see designed_vae
_B = 20.0  # the offset that makes every SiLU (nearly) the identity
VARIANTS = 48  # drawn images per class for the UNet stage
CFG_DROPOUT = 0.1


def class_captions(colour: str, shape: str) -> list[tuple[str, float]]:
    """The captions a training image of ``shape`` in ``colour`` is shown with, and their probabilities."""
    return [(f"a {colour} {shape}", 0.7), (f"a {shape}", 0.075), (f"a {colour} shape", 0.075), ("a shape", 0.05),
            ("", CFG_DROPOUT)]


# ---------------------------------------------------------------------------------------------------- data


def _to_pixels(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def unet_images(seed: int, variants: int = VARIANTS) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """``variants`` drawings of each base class (pixels NCHW in [-1, 1]) and their (colour, shape) labels."""
    images, labels = [], []
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            rng = np.random.default_rng([seed, ci, si, 2])
            for _ in range(variants):
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

    from mindone_lora_plugin.demo.tiny import CLIP, build_tokenizer

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

    class VLoss(nn.Cell):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def construct(self, latents, noise, timesteps, a, s, weights, embeds):
            noisy = a.reshape((-1, 1, 1, 1)) * latents + s.reshape((-1, 1, 1, 1)) * noise
            pred = self.unet(noisy, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
            target = a.reshape((-1, 1, 1, 1)) * noise - s.reshape((-1, 1, 1, 1)) * latents  # v
            return (ops.square(pred.astype(ms.float32) - target).mean(axis=(1, 2, 3)) * weights).mean()

    class Encode(nn.Cell):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def construct(self, x):
            return self.vae.encode(x)[0][:, :4]

    return VLoss, Encode


# ---------------------------------------------------------------------------------------------------- stages


def designed_vae(vae) -> None:
    """Set ``vae``'s weights (an ``AutoencoderKL`` built from :data:`VAE`) to a fixed linear codec:

    * encoder: the latent's channels 0-2 are the mean R, G, B (in [-1, 1]) of each 4×4 pixel block, channel 3 is 0,
      the log-variance is :data:`LOGVAR`;
    * decoder: nearest 2× upsampling followed by a [1 2 1]² blur, twice — a smooth 4× enlargement of the 8×8 colour
      image, in which zero padding means white.

    Every ResNet block's second convolution is zero (each block is the identity) and the mid block has no attention.
    The two non-linear layers are made linear: each GroupNorm group holds four channels ``(s, -s, K, -K)``, so its
    mean is 0 and its variance ``(mean(s²) + K²) / 2`` is constant to 1e-4 (``K`` = :data:`_K`); the SiLU that follows
    runs at an offset of :data:`_B`, where it is the identity to 1e-8. The result stays a standard diffusers VAE.
    """
    import mindspore as ms

    c = VAE["block_out_channels"][0]
    groups = VAE["norm_num_groups"]
    sigma = float(np.sqrt(_K ** 2 / 2))
    blur = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0

    def put(param, array):
        param.set_data(ms.Tensor(np.asarray(array, np.float32), dtype=param.dtype))

    def zero(cell):
        for p in cell.get_parameters():
            if p.name.endswith("conv2.weight") or p.name.endswith("conv2.bias"):
                put(p, np.zeros(p.shape))

    def spread(conv, sources: int, offset: float, taps=None):
        """conv → channels (s_g, -s_g, K, -K) per group from input channel g (g < sources), centre tap or ``taps``."""
        w = np.zeros(conv.weight.shape)
        b = np.zeros(c)
        for g in range(groups):
            if g < sources:
                w[4 * g, g, 1, 1], w[4 * g + 1, g, 1, 1] = 1.0, -1.0
                b[4 * g], b[4 * g + 1] = offset, -offset
            b[4 * g + 2], b[4 * g + 3] = _K, -_K
        put(conv.weight, w)
        put(conv.bias, b)

    def per_channel(conv, taps):
        w = np.zeros(conv.weight.shape)
        for ch in range(c):
            w[ch, ch, :taps.shape[0], :taps.shape[1]] = taps
        put(conv.weight, w)
        put(conv.bias, np.zeros(c))

    def linear_norm(norm):
        put(norm.weight, np.full(c, sigma))
        put(norm.bias, np.full(c, _B))

    enc, dec = vae.encoder, vae.decoder
    zero(vae)
    spread(enc.conv_in, 3, 0.0)
    for block in enc.down_blocks:
        for down in block.downsamplers or []:
            per_channel(down.conv, np.full((2, 2), 0.25))  # taps (0..1, 0..1) of the stride-2 conv: the 2×2 mean
    linear_norm(enc.conv_norm_out)
    w = np.zeros(enc.conv_out.weight.shape)
    b = np.zeros(w.shape[0])
    for m in range(3):
        w[m, 4 * m, 1, 1] = 1.0
    b[:4] = [-_B] * 3 + [0.0]
    b[4:] = LOGVAR
    put(enc.conv_out.weight, w)
    put(enc.conv_out.bias, b)
    for conv in (vae.quant_conv, vae.post_quant_conv):
        n = conv.weight.shape[0]
        put(conv.weight, np.eye(n).reshape(n, n, 1, 1))
        put(conv.bias, np.zeros(n))
    spread(dec.conv_in, 3, -1.0)  # the decoder works on (pixel - 1): white is 0, so zero padding is white
    for block in dec.up_blocks:
        for up in block.upsamplers or []:
            per_channel(up.conv, blur)
    linear_norm(dec.conv_norm_out)
    w = np.zeros(dec.conv_out.weight.shape)
    for m in range(3):
        w[m, 4 * m, 1, 1] = 1.0
    put(dec.conv_out.weight, w)
    put(dec.conv_out.bias, np.full(3, 1.0 - _B))


def encode_all(vae, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    import mindspore as ms

    _, Encode = _cells()
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
               lr: float, log, snapshot=None, snapshot_every: int = 0) -> list[float]:
    import mindspore as ms
    from mindone.diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    VLoss, _ = _cells()
    acp = DDIMScheduler(**SCHEDULER).alphas_cumprod
    acp = np.asarray(acp.asnumpy() if hasattr(acp, "asnumpy") else acp, np.float64)
    step = _train_cell(VLoss(unet), unet.trainable_params(), schedule(lr, steps, min(100, steps)))
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
        weights = np.minimum(snr, 5.0) / (snr + 1.0)  # min-SNR-5 for v-prediction
        f = lambda v: ms.Tensor(np.asarray(v, np.float32))  # noqa: E731
        loss = step(f(x), f(noise), ms.Tensor(t.astype(np.int32)), f(np.sqrt(acp[t])), f(np.sqrt(1 - acp[t])),
                    f(weights), f(np.stack([embeds[c] for c in caps])))
        losses.append(float(loss.asnumpy()))
        if (i + 1) % 100 == 0 or i + 1 == steps:
            log(f"unet step {i + 1}/{steps} loss {np.mean(losses[-100:]):.4f}")
        if snapshot is not None and snapshot_every and (i + 1) % snapshot_every == 0 and i + 1 < steps:
            snapshot(i + 1, losses)
    unet.set_train(False)
    return losses


# ---------------------------------------------------------------------------------------------------- saving


def save_folder(out: str, tokenizer, text_encoder, vae, unet, info: dict) -> str:
    """Write the diffusers-layout folder with fp16 safetensors, under a temporary name renamed into place."""
    import shutil

    from mindone.diffusers import DDIMScheduler, StableDiffusionPipeline

    from mindone_lora_plugin import safetensors_io
    from mindone_lora_plugin.demo.tiny import _to_transformers_names

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


def pretrain(out: str, seed: int = 0, unet_steps: int = 6000, batch_size: int = 32, unet_lr: float = 2e-3,
             mode: str = "graph", log=print, variants: int = VARIANTS, snapshot_every: int = 0) -> str:
    """Run both stages and write the model folder at ``out``; return ``out``. With ``snapshot_every``, the model so
    far is also written every that many UNet steps, as ``OUT-stepN`` (to score how it improves). (A test runs a few
    steps of it twice with few ``variants`` per class, in PyNative, to check that the same seed gives the same
    weights.)"""
    import tempfile

    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", mode, seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, text_encoder, vae, unet = build_models(seed, tmp)
        text_encoder.set_train(False)
        designed_vae(vae)
        pixels, labels = unet_images(seed, variants)
        means = encode_all(vae, pixels)
        scaling = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scaling)
        log(f"VAE set; latent std {means.std():.4f} → scaling_factor {scaling:.4f}")
        captions = sorted({c for label in set(labels) for c, _ in class_captions(*label)})
        embeds = dict(zip(captions, text_embeddings(tokenizer, text_encoder, captions)))

        def info(steps_done, losses):
            return {"seed": seed, "unet_steps": steps_done, "batch_size": batch_size, "unet_lr": unet_lr,
                    "mode": mode, "variants": variants, "scaling_factor": scaling,
                    "final_unet_loss": float(np.mean(losses[-100:])),
                    "command": f"python -m mindone_lora_plugin.demo.pretrain --seed {seed} --unet_steps {unet_steps} "
                               f"--batch_size {batch_size} --unet_lr {unet_lr:g} --out OUT"}

        def snapshot(steps_done, losses):
            path = save_folder(f"{out.rstrip('/')}-step{steps_done}", tokenizer, text_encoder, vae, unet,
                               info(steps_done, losses))
            log(f"wrote {path}")

        unet_losses = train_unet(unet, means * scaling, labels, embeds, seed, unet_steps, batch_size, unet_lr, log,
                                 snapshot, snapshot_every)
        save_folder(out, tokenizer, text_encoder, vae, unet, info(unet_steps, unet_losses))
    log(f"wrote {out} in {time.time() - t0:.0f}s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mindone_lora_plugin.demo.pretrain",
                                description="Pretrain the tiny SD1.x shapes base model on the CPU.")
    p.add_argument("--out", required=True, help="the model folder to write (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unet_steps", type=int, default=6000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--unet_lr", type=float, default=2e-3)
    p.add_argument("--mode", choices=("graph", "pynative"), default="graph")
    p.add_argument("--snapshot_every", type=int, default=0, metavar="N",
                   help="also write the model every N UNet steps, as OUT-stepN")
    a = p.parse_args(argv)
    pretrain(a.out, a.seed, a.unet_steps, a.batch_size, a.unet_lr, a.mode,
             log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True), snapshot_every=a.snapshot_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
