"""The SD3 flow-matching LoRA loss as a compiled cell (the counterpart of FLUX.1's
:class:`~mindone_lora_plugin.architectures.flux.loss.FlowMatchLoss`).

As diffusers' train_dreambooth_lora_sd3.py computes it: the VAE latents ``x₀`` (already ``(z − shift_factor)·
scaling_factor``) and the noise ``ε`` mixed at noise level σ, ``x_σ = (1 − σ)·x₀ + σ·ε``; the transformer gets
``timestep = 1000 σ``, the joint text sequence and the pooled text embedding (:class:`SD3TextConditioner`); its
prediction is compared with ``ε − x₀``: ``loss = mean_n(w_n · mean((pred − target)²))``, ``w_n`` the weighting
scheme's weight (× σ² for preconditioned outputs: :mod:`.timesteps`) and any DreamBooth prior weight.

Everything random comes in from the host, so the graph is plain arithmetic in PyNative and GRAPH_MODE alike.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


class SD3TextConditioner(nn.Cell):
    """Prompt token ids → ``(prompt_embeds, pooled)`` as mindone's ``StableDiffusion3Pipeline.encode_prompt``
    computes them: both CLIPs' penultimate hidden states side by side, zero-padded to T5's width, followed on the
    sequence axis by T5's last hidden state (zeros without a T5); the pooled output is both CLIPs' projected pooled
    outputs side by side."""

    def __init__(self, text_encoder, text_encoder_2, text_encoder_3=None, t5_width: int = 0, t5_length: int = 0):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.text_encoder_3 = text_encoder_3
        self.t5_width, self.t5_length = t5_width, t5_length

    def construct(self, ids, ids_2, ids_3=None):
        out = self.text_encoder(ids, output_hidden_states=True, return_dict=False)
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True, return_dict=False)
        clip = ops.concat((out[2][-2], out_2[2][-2]), -1)
        pooled = ops.concat((out[0], out_2[0]), -1)
        if self.text_encoder_3 is not None:
            t5 = self.text_encoder_3(ids_3, return_dict=False)[0]
        else:
            t5 = ops.zeros((clip.shape[0], self.t5_length, self.t5_width), clip.dtype)
        clip = ops.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return ops.concat((clip, t5.astype(clip.dtype)), 1), pooled


class SD3FlowMatchLoss(nn.Cell):
    """Inputs: ``latents`` (N, C, H, W), ``noise`` (same), ``sigmas`` (N,), ``weights`` (N,), then the conditioning
    — ``embeds, pooled`` (or the token ids of each tokenizer when a text encoder trains). ``masked``: the last input is
    a (N, 1, H, W) mask on the per-element loss."""

    masked = False

    def __init__(self, transformer, conditioner: SD3TextConditioner | None = None, train_text: bool = False):
        super().__init__()
        self.transformer = transformer
        self.conditioner = conditioner
        self.train_text = train_text

    def construct(self, latents, noise, sigmas, weights, *cond):
        mask = None
        if self.masked:
            mask = cond[-1]
            cond = cond[:-1]
        if self.train_text:
            embeds, pooled = self.conditioner(*cond)
        else:
            embeds, pooled = cond[0], cond[1]
        n = latents.shape[0]
        s = sigmas.reshape((-1, 1, 1, 1))
        noisy = (1.0 - s) * latents + s * noise
        dtype = self.transformer.dtype
        pred = self.transformer(noisy.astype(dtype), embeds.astype(dtype), pooled.astype(dtype),
                                (sigmas * 1000.0).astype(dtype), return_dict=False)[0]
        err = ops.square(pred.astype(ms.float32) - (noise - latents))
        if self.masked:
            err = err * mask
        per_sample = err.reshape((n, -1)).mean(axis=1)
        return (per_sample * weights).mean()
