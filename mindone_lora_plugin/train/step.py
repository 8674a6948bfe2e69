"""The compiled pieces of a training step: SD text conditioning, the SD denoising loss, and the optimizer step.

The SD architectures (:mod:`mindone_lora_plugin.architectures.sd`) build :class:`TextConditioner` and
:class:`DenoiseLoss`; another architecture brings its own loss cell, and the optimizer steps here work for any.

Randomness (noise, timesteps) is drawn on the host and passed in, together with the per-sample noise-schedule
coefficients and loss weights, so the graph is plain arithmetic: identical on CPU and Ascend, in GRAPH_MODE and
PyNative, and exactly reproducible on resume.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


class TextConditioner(nn.Cell):
    """Prompt token ids → ``(prompt_embeds, pooled)`` as mindone's SD and SDXL pipelines compute them.

    SD1.x/2.x: the text encoder's last hidden state, no pooled output. SDXL: the penultimate hidden states of both
    encoders concatenated, and the second encoder's projected pooled output.
    """

    def __init__(self, text_encoder, text_encoder_2=None):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.two_encoders = text_encoder_2 is not None

    def construct(self, ids, ids_2):
        if self.two_encoders:
            out1 = self.text_encoder(ids, output_hidden_states=True)
            out2 = self.text_encoder_2(ids_2, output_hidden_states=True)
            embeds = ops.concat((out1[-1][-2], out2[-1][-2]), axis=-1)
            return embeds, out2[0]
        embeds = self.text_encoder(ids)[0]
        return embeds, embeds[:, 0]


class VaeEncode(nn.Cell):
    """The VAE encoder: images in [-1, 1] → the latent distribution's moments (mean and log-variance)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def construct(self, x):
        return self.vae.encode(x)[0]


class DenoiseLoss(nn.Cell):
    """The LoRA training loss: MSE between the UNet's prediction and the target, weighted per sample.

    Inputs: ``latents`` (scaled VAE latents), ``noise``, ``timesteps``, ``sqrt_acp`` / ``sqrt_1m_acp`` (noise schedule
    at each timestep), ``weights`` (per-sample loss weights: 1, the min-SNR-γ weights, DreamBooth's prior weights),
    then the conditioning — only what this architecture uses, since every unused graph input costs time on each step:

    * SD1.x/2.x: ``embeds`` (or ``ids`` when the text encoder trains);
    * SDXL (``time_ids=True``): ``embeds, pooled, time_ids`` (or ``ids, ids_2, time_ids`` when the text encoders
      train).
    """

    masked = False  # --masked_loss: the last input is a (N, 1, h, w) mask the per-pixel loss is multiplied by

    def __init__(self, unet, conditioner: TextConditioner, train_text: bool, v_prediction: bool, time_ids: bool):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner
        self.train_text = train_text
        self.v_prediction = v_prediction
        self.time_ids = time_ids

    def construct(self, latents, noise, timesteps, sqrt_acp, sqrt_1m_acp, weights, *cond):
        mask = None
        if self.masked:
            mask = cond[-1]
            cond = cond[:-1]
        a = sqrt_acp.reshape((-1, 1, 1, 1))
        s = sqrt_1m_acp.reshape((-1, 1, 1, 1))
        noisy = a * latents + s * noise
        dtype = self.unet.dtype if hasattr(self.unet, "dtype") else latents.dtype
        if self.time_ids:
            if self.train_text:
                embeds, pooled = self.conditioner(cond[0], cond[1])
            else:
                embeds, pooled = cond[0], cond[1]
            added = {"text_embeds": pooled.astype(dtype), "time_ids": cond[2].astype(dtype)}
            pred = self.unet(noisy.astype(dtype), timesteps, encoder_hidden_states=embeds.astype(dtype),
                             added_cond_kwargs=added, return_dict=False)[0]
        else:
            embeds = self.conditioner(cond[0], cond[0])[0] if self.train_text else cond[0]
            pred = self.unet(noisy.astype(dtype), timesteps, encoder_hidden_states=embeds.astype(dtype),
                             return_dict=False)[0]
        target = a * noise - s * latents if self.v_prediction else noise
        err = ops.square(pred.astype(ms.float32) - target)
        if self.masked:
            err = err * mask
        per_sample = err.mean(axis=(1, 2, 3))
        return (per_sample * weights).mean()


class AccumulateStep(nn.Cell):
    """Forward and backward only; adds the gradients to ``buffers`` (a micro-step of gradient accumulation)."""

    def __init__(self, grad_fn, buffers):
        super().__init__()
        self.grad_fn = grad_fn
        self.buffers = buffers
        self.hyper_map = ops.HyperMap()

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        self.hyper_map(ops.assign_add, self.buffers, grads)
        return loss


_average = ops.MultitypeFuncGraph("average")
_clear = ops.MultitypeFuncGraph("clear")


@_average.register("Number", "Tensor", "Tensor")
def _average_tensor(scale, grad, buffer):
    return (grad + buffer) * scale


@_clear.register("Tensor")
def _clear_tensor(buffer):
    return ops.assign(buffer, ops.zeros_like(buffer))


class UpdateStep(nn.Cell):
    """The last micro-step: its gradients plus the buffers, averaged, reduced, clipped, applied; buffers cleared."""

    def __init__(self, grad_fn, buffers, optimizer, accumulation: int, max_grad_norm: float | None,
                 grad_reducer=None):
        super().__init__()
        self.grad_fn = grad_fn
        self.buffers = buffers
        self.optimizer = optimizer
        self.scale = 1.0 / accumulation
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else 0.0
        self.grad_reducer = grad_reducer if grad_reducer is not None else ops.identity
        self.hyper_map = ops.HyperMap()

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        grads = self.hyper_map(ops.partial(_average, self.scale), grads, self.buffers)
        grads = self.grad_reducer(grads)
        if self.max_grad_norm > 0:
            grads = ops.clip_by_global_norm(grads, self.max_grad_norm)
        self.optimizer(grads)
        self.hyper_map(_clear, self.buffers)
        return loss


class TrainStep(nn.Cell):
    """Forward, backward, (all-reduce), clip and optimizer update in one compiled step."""

    def __init__(self, grad_fn, optimizer, max_grad_norm, grad_reducer=None):
        super().__init__()
        self.grad_fn = grad_fn
        self.optimizer = optimizer
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else 0.0
        self.grad_reducer = grad_reducer if grad_reducer is not None else ops.identity

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        grads = self.grad_reducer(grads)
        if self.max_grad_norm > 0:
            grads = ops.clip_by_global_norm(grads, self.max_grad_norm)
        self.optimizer(grads)
        return loss


def build_steps(loss: DenoiseLoss, optimizer, max_grad_norm, accumulation: int, grad_reducer=None):
    """``(micro_step, update_step)`` cells. Without accumulation ``micro_step`` is None and ``update_step`` does it all;
    with it, ``micro_step`` adds gradients to buffers and ``update_step`` (the last micro-batch) applies them."""
    grad_fn = ms.value_and_grad(loss, None, optimizer.parameters)
    if accumulation <= 1:
        return None, TrainStep(grad_fn, optimizer, max_grad_norm, grad_reducer)
    buffers = optimizer.parameters.clone(prefix="accum", init="zeros")
    return (AccumulateStep(grad_fn, buffers),
            UpdateStep(grad_fn, buffers, optimizer, accumulation, max_grad_norm, grad_reducer))
