"""The FLUX.1 flow-matching LoRA loss as a compiled cell (the counterpart of SD's
:class:`~mindone_lora_plugin.architectures.sd.loss.DenoiseLoss`).

As diffusers' train_dreambooth_lora_flux.py and kohya's flux_train_network.py compute it: the VAE latents
``x₀`` (already ``(z − shift_factor)·scaling_factor``) and the noise ``ε`` are mixed at noise level σ,
``x_σ = (1 − σ)·x₀ + σ·ε``; the latents are packed into 2×2 patches (``(N, C, H, W) → (N, H/2·W/2, 4C)``); the
transformer gets ``timestep = σ`` (it multiplies by 1000 itself), the image ids ``(0, row, column)`` of each patch,
text ids of zeros, the T5 hidden states, CLIP's pooled output and — dev layout only — the guidance scale; its output
is unpacked and compared with the target ``ε − x₀``: ``loss = mean_n(w_n · mean((pred − target)²))``.

Everything random (noise, σ) comes in from the host (:mod:`.timesteps`), so the graph is plain arithmetic and
identical in PyNative and GRAPH_MODE.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import operations as P


def pack_latents(latents):
    """``(N, C, H, W) → (N, H/2·W/2, 4C)``: each 2×2 patch becomes one token, channels outermost."""
    n, c, h, w = latents.shape
    x = latents.reshape((n, c, h // 2, 2, w // 2, 2)).transpose((0, 2, 4, 1, 3, 5))
    return x.reshape((n, (h // 2) * (w // 2), c * 4))


def unpack_latents(tokens, height: int, width: int):
    """The inverse of :func:`pack_latents` for latents of ``height × width``."""
    n, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape((n, height // 2, width // 2, c, 2, 2)).transpose((0, 3, 1, 4, 2, 5))
    return x.reshape((n, c, height, width))


def image_ids(height: int, width: int, dtype=ms.float32):
    """``(H/2·W/2, 3)`` position ids of the packed latent patches: ``(0, row, column)``, row-major."""
    rows, cols = height // 2, width // 2
    r = P.Range()(ops.scalar_to_tensor(0.0, ms.float32), ops.scalar_to_tensor(float(rows), ms.float32),
                  ops.scalar_to_tensor(1.0, ms.float32))
    c = P.Range()(ops.scalar_to_tensor(0.0, ms.float32), ops.scalar_to_tensor(float(cols), ms.float32),
                  ops.scalar_to_tensor(1.0, ms.float32))
    r = ops.broadcast_to(r.reshape((rows, 1, 1)), (rows, cols, 1))
    c = ops.broadcast_to(c.reshape((1, cols, 1)), (rows, cols, 1))
    ids = ops.concat((ops.zeros((rows, cols, 1), ms.float32), r, c), -1)
    return ids.reshape((rows * cols, 3)).astype(dtype)


class FluxTextConditioner(nn.Cell):
    """Prompt token ids → ``(prompt_embeds, pooled)`` as mindone's ``FluxPipeline.encode_prompt`` computes them: the
    T5 encoder's last hidden state and the CLIP text encoder's pooled output."""

    def __init__(self, text_encoder, text_encoder_2):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def construct(self, clip_ids, t5_ids):
        pooled = self.text_encoder(clip_ids, return_dict=False)[1]
        embeds = self.text_encoder_2(t5_ids, return_dict=False)[0]
        return embeds, pooled


class FlowMatchLoss(nn.Cell):
    """Inputs: ``latents`` (N, C, H, W), ``noise`` (same), ``sigmas`` (N,), ``weights`` (N,), then the conditioning
    — ``embeds, pooled`` (or ``clip_ids, t5_ids`` when a text encoder trains) and, for the dev layout
    (``guidance_embeds``), ``guidance`` (N,). ``masked``: the last input is a (N, 1, H, W) mask on the per-element
    loss."""

    masked = False

    def __init__(self, transformer, conditioner: FluxTextConditioner | None = None, train_text: bool = False):
        super().__init__()
        self.transformer = transformer
        self.conditioner = conditioner
        self.train_text = train_text
        self.guidance = bool(transformer.config.guidance_embeds)

    def construct(self, latents, noise, sigmas, weights, *cond):
        mask = None
        if self.masked:
            mask = cond[-1]
            cond = cond[:-1]
        if self.train_text:
            embeds, pooled = self.conditioner(cond[0], cond[1])
        else:
            embeds, pooled = cond[0], cond[1]
        n, _, height, width = latents.shape
        s = sigmas.reshape((-1, 1, 1, 1))
        noisy = (1.0 - s) * latents + s * noise
        dtype = self.transformer.dtype
        guidance = cond[2].astype(dtype) if self.guidance else None
        txt_ids = ops.zeros((embeds.shape[1], 3), dtype)
        pred = self.transformer(pack_latents(noisy).astype(dtype), embeds.astype(dtype), pooled.astype(dtype),
                                sigmas.astype(dtype), image_ids(height, width, dtype), txt_ids, guidance,
                                return_dict=False)[0]
        pred = unpack_latents(pred.astype(ms.float32), height, width)
        err = ops.square(pred - (noise - latents))
        if self.masked:
            err = err * mask
        per_sample = err.reshape((n, -1)).mean(axis=1)
        return (per_sample * weights).mean()
