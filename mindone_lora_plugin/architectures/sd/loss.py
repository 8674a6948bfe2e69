"""The Stable Diffusion training loss and text conditioning as compiled cells: :class:`TextConditioner` (SD1.x/2.x
and SDXL prompt embeddings) and :class:`DenoiseLoss` (DDPM epsilon or v-prediction MSE).

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
