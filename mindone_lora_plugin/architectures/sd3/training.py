"""The training and pipeline side of the SD3 architecture (mixed into :class:`.arch.SD3`): what a run loads
besides the adapted components, the text conditioner, the loss cell and its inputs, and the pipelines."""

from __future__ import annotations

from dataclasses import dataclass

from mindone_lora_plugin.architectures.base import TrainingParts

TRAINING_DEFAULTS = {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
                     "precondition_outputs": 1, "discrete_flow_shift": None}


def option(args, name):
    """The run's value of an SD3 training option, else its default."""
    value = getattr(args, name, None)
    return TRAINING_DEFAULTS[name] if value is None else value


@dataclass
class SD3Parts(TrainingParts):
    """:class:`~mindone_lora_plugin.architectures.base.TrainingParts` with the flow-matching time shift."""

    flow_shift: float = 3.0


class SD3Training:
    def load_training_parts(self, folder: str, args, models, weight_dtype) -> SD3Parts:
        import os

        import mindspore as ms
        from mindone.diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTokenizer, T5TokenizerFast

        vae_kw = {"variant": args.variant} if args.variant else {}
        if weight_dtype != ms.float32:
            vae_kw["mindspore_dtype"] = weight_dtype
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **vae_kw)
        vae.set_train(False)
        for p in vae.get_parameters():
            p.requires_grad = False
        tokenizers = (CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                      CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
        if models.get("text_encoder_3") is not None and os.path.isdir(os.path.join(folder, "tokenizer_3")):
            tokenizers += (T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_3"),)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
        shift = option(args, "discrete_flow_shift")
        return SD3Parts(vae, tokenizers, scheduler, "flow_matching",
                        float(scheduler.config.shift if shift is None else shift))

    def text_conditioner(self, models):
        from mindone_lora_plugin.architectures.sd3.loss import SD3TextConditioner

        config = models["transformer"].config
        return SD3TextConditioner(models.get("text_encoder"), models.get("text_encoder_2"),
                                  models.get("text_encoder_3"), int(config.joint_attention_dim), 77)

    def make_loss(self, context):
        from mindone_lora_plugin.architectures.sd3.loss import SD3FlowMatchLoss

        return SD3FlowMatchLoss(context.models["transformer"], context.conditioner, context.train_text)

    def model_inputs(self, context, batch, rng, weighted: bool = True) -> tuple:
        """Flow matching: latents ``(z − shift_factor)·scaling_factor``, noise, σ, per-sample weights (the weighting
        scheme's, the DreamBooth prior's), then the conditioning (see :class:`~.loss.SD3FlowMatchLoss`)."""
        import mindspore as ms
        import numpy as np

        from mindone_lora_plugin.architectures.sd3.timesteps import loss_weights, sample_sigmas
        from mindone_lora_plugin.train.noise import draw_noise

        args, inputs = context.args, context.inputs
        latents = inputs.latents(batch, rng)
        noise = draw_noise(rng, latents.shape, args)
        n = latents.shape[0]
        scheme = option(args, "weighting_scheme")
        sigmas = sample_sigmas(rng, n, scheme, context.parts.flow_shift, option(args, "logit_mean"),
                               option(args, "logit_std"), option(args, "mode_scale"))
        weights = loss_weights(sigmas, scheme, bool(option(args, "precondition_outputs")))
        if weighted:
            weights = inputs.prior_weighted(weights * batch.loss_weights.astype(np.float64), n)
        text = tuple(inputs.text(batch))
        f32 = ms.float32
        return (ms.Tensor(latents.astype(np.float32), f32), ms.Tensor(noise, f32), ms.Tensor(sigmas, f32),
                ms.Tensor(weights.astype(np.float32))) + text + inputs.mask(batch, latents.shape[2:])

    def load_pipeline(self, folder: str, dtype=None):
        from mindone_lora_plugin.architectures.sd3 import pipeline

        return pipeline.load_pipeline(folder, dtype)

    def training_pipeline(self, models, parts):
        from mindone.diffusers import FlowMatchEulerDiscreteScheduler

        from mindone_lora_plugin.architectures.sd3 import pipeline

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(parts.noise_scheduler.config)
        return pipeline.live_pipeline(models, parts.vae, parts.tokenizers, scheduler)
