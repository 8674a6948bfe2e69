"""The Stable Diffusion side of training (mixed into the SD architectures): the parts a run loads (VAE, CLIP
tokenizers, the DDPM schedule: :class:`DDPMParts`), the text conditioning and loss cells (:mod:`.loss`), each step's
inputs, and the pipelines for validation images and ``generate``."""

from __future__ import annotations

from dataclasses import dataclass

from mindone_lora_plugin.architectures.base import TrainingParts
from mindone_lora_plugin.errors import LoraError


@dataclass
class DDPMParts(TrainingParts):
    """:class:`~mindone_lora_plugin.architectures.base.TrainingParts` with the DDPM schedule's cumulative alphas
    (float64, one per training timestep)."""

    alphas_cumprod: object = None


class SDTraining:
    """The training methods of :class:`~.arch.StableDiffusion` (its attributes ``uses_time_ids``,
    ``vae_half_precision`` and ``pipeline_class`` say what differs between SD1.x/2.x and SDXL)."""

    # ------------------------------------------------------------------ training (MindSpore)

    def load_training_parts(self, folder: str, args, models, weight_dtype) -> DDPMParts:
        import mindspore as ms
        import numpy as np
        from mindone.diffusers import AutoencoderKL, DDPMScheduler
        from transformers import CLIPTokenizer

        vae_kw = {"variant": args.variant} if args.variant else {}
        if weight_dtype != ms.float32 and self.vae_half_precision:
            vae_kw["mindspore_dtype"] = weight_dtype
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **vae_kw)
        vae.set_train(False)
        for p in vae.get_parameters():
            p.requires_grad = False
        subfolders = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
        tokenizers = tuple(CLIPTokenizer.from_pretrained(folder, subfolder=subfolders[c]) for c in self.text_encoders())
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        acp = scheduler.alphas_cumprod
        prediction_type = args.prediction_type or scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise LoraError(f"prediction type {prediction_type!r} is not supported; use epsilon or v_prediction")
        return DDPMParts(vae, tokenizers, scheduler, prediction_type,
                         np.asarray(acp.asnumpy() if hasattr(acp, "asnumpy") else acp, dtype=np.float64))

    def text_conditioner(self, models):
        from mindone_lora_plugin.architectures.sd.loss import TextConditioner

        return TextConditioner(models.get("text_encoder"), models.get("text_encoder_2"))

    def make_loss(self, context):
        from mindone_lora_plugin.architectures.sd.loss import DenoiseLoss

        return DenoiseLoss(context.models["unet"], context.conditioner, context.train_text,
                           context.parts.prediction_type == "v_prediction", self.uses_time_ids)

    def model_inputs(self, context, batch, rng, weighted: bool = True) -> tuple:
        """DDPM: latents, noise, timesteps, the schedule at them, per-sample weights, then the conditioning (see
        :class:`~.loss.DenoiseLoss`)."""
        import mindspore as ms
        import numpy as np

        from mindone_lora_plugin.train.noise import draw_noise, loss_weights

        args, parts, inputs = context.args, context.parts, context.inputs
        latents = inputs.latents(batch, rng)
        noise = draw_noise(rng, latents.shape, args)
        n = latents.shape[0]
        t = rng.integers(0, len(parts.alphas_cumprod), size=n)
        acp = parts.alphas_cumprod[t]
        # batch.loss_weights: 1, or --prior_loss_weight for kohya regularisation images
        weights = (batch.loss_weights * loss_weights(acp, args, parts.prediction_type == "v_prediction")
                   if weighted else np.ones(n, dtype=np.float32))
        if weighted:
            weights = inputs.prior_weighted(weights, n)
        text = inputs.text(batch)
        if self.uses_time_ids:  # each image's own original size and crop; the target is the batch's shape
            time_ids = np.asarray([list(o) + list(c) + list(batch.pixels.shape[2:])
                                   for o, c in zip(batch.original_sizes, batch.crops_top_left)], dtype=np.float32)
            cond = (text[0], text[1], ms.Tensor(time_ids, ms.float32))
        else:
            cond = (text[0],)  # see DenoiseLoss: only the inputs this architecture uses
        f32 = ms.float32
        return (ms.Tensor(latents, f32), ms.Tensor(noise, f32), ms.Tensor(t.astype(np.int32)),
                ms.Tensor(np.sqrt(acp).astype(np.float32)), ms.Tensor(np.sqrt(1.0 - acp).astype(np.float32)),
                ms.Tensor(weights.astype(np.float32))) + cond + inputs.mask(batch, latents.shape[2:])

    # ------------------------------------------------------------------ pipelines (MindSpore)

    pipeline_class = "StableDiffusionPipeline"
    _no_safety_checker = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def load_pipeline(self, folder: str, dtype=None):
        import mindone.diffusers as md

        kw = {"mindspore_dtype": dtype} if dtype is not None else {}
        extra = self._no_safety_checker if self.pipeline_class == "StableDiffusionPipeline" else {}
        return getattr(md, self.pipeline_class).from_pretrained(folder, **extra, **kw)

    def training_pipeline(self, models, parts):
        import mindone.diffusers as md

        m, loaded = models, parts
        scheduler = md.DDIMScheduler.from_config(loaded.noise_scheduler.config)
        parts = {"vae": loaded.vae, "unet": m["unet"], "scheduler": scheduler}
        parts.update({c: m[c] for c in self.text_encoders()})
        parts.update(zip(("tokenizer", "tokenizer_2"), loaded.tokenizers))
        extra = self._no_safety_checker if self.pipeline_class == "StableDiffusionPipeline" else {}
        return getattr(md, self.pipeline_class)(**parts, **extra)
