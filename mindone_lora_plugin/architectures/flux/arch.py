"""The FLUX.1 architecture object (``flux``): dev and schnell layouts, LoRA on the transformer and optionally on the
CLIP and T5 text encoders, flow-matching training, ``FluxPipeline`` for validation images and ``generate``.

The key grammar and file layouts are :mod:`.keys`/:mod:`.files` (mixed in through :class:`.files.FluxKeyGrammar`);
the presets :mod:`.targets`; the loss :mod:`.loss` with the noise levels of :mod:`.timesteps`; generation
:mod:`.pipeline`. Training options read from the run's arguments (defaults in :data:`TRAINING_DEFAULTS`):
``timestep_sampling``, ``discrete_flow_shift`` (None: the scheduler's ``shift``), ``guidance_scale``,
``logit_mean``/``logit_std``, ``sigmoid_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mindone_lora_plugin.architectures.base import Architecture, Component, FolderInfo, TargetRule, TrainingParts
from mindone_lora_plugin.architectures.flux import files, keys, targets
from mindone_lora_plugin.errors import LoraError

TRANSFORMER = Component("transformer", "mindone.diffusers:FluxTransformer2DModel", "lora_unet",
                        class_names=("FluxTransformer2DModel",))
# no class_names: a live CLIPTextModel is SD's as much as FLUX's, so its class must not claim it for FLUX
CLIP = Component("text_encoder", "mindone.transformers:CLIPTextModel", "lora_te1", kind="text_encoder",
                 optional=True, dtype_kw="dtype")
T5 = Component("text_encoder_2", "mindone.transformers:T5EncoderModel", "lora_te3", kind="text_encoder",
               optional=True, dtype_kw="dtype", class_names=("T5EncoderModel",))

TRAINING_DEFAULTS = {"timestep_sampling": "sigma", "discrete_flow_shift": None, "guidance_scale": 3.5,
                     "logit_mean": 0.0, "logit_std": 1.0, "sigmoid_scale": 1.0}


def _option(args, name):
    value = getattr(args, name, None)
    return TRAINING_DEFAULTS[name] if value is None else value



@dataclass
class FlowMatchParts(TrainingParts):
    """:class:`~mindone_lora_plugin.architectures.base.TrainingParts` with the flow-matching time shift and whether
    the transformer takes an embedded guidance value (FLUX.1-dev)."""

    flow_shift: float = 3.0
    guidance: bool = False


class Flux(files.FluxKeyGrammar, Architecture):
    name = "flux"
    label = "FLUX.1"
    description = "FLUX.1 dev/schnell: MMDiT transformer + CLIP-L (pooled) and T5 encoders, flow matching"
    components = (TRANSFORMER, CLIP, T5)
    denoiser = "transformer"
    default_strategy = "flux"
    default_resolution = 1024
    unused_flags = ("prediction_type", "snr_gamma", "debiased_estimation_loss")  # flow matching: no SNR, no epsilon
    kohya_base_model_version = keys.KOHYA_BASE_MODEL_VERSION
    kohya_version_family = keys.KOHYA_BASE_MODEL_VERSION
    modelspec_architecture = "flux-1-dev/lora"
    modelspec_prefix = keys.MODELSPEC_FAMILY

    # ------------------------------------------------------------------ detection and targets

    def detect_folder(self, folder: FolderInfo) -> int:
        transformer = folder.configs.get("transformer") or {}
        if folder.class_name.startswith("Flux") or transformer.get("_class_name") == "FluxTransformer2DModel":
            return 2
        return 0

    def target_rules(self, component: str) -> dict[str, TargetRule]:
        return dict(targets.RULES.get(component, {}))

    #: explicit --lora_targets that the kohya layout keeps unfused (LoHa/LoKr can train them)
    unfused_targets_hint = "to_out.0,to_add_out,ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2,proj_out"

    def fused_file_module(self, component: str, path: str, formats) -> tuple[str, tuple[str, ...]] | None:
        """``(kohya module name, the paths it fuses)`` of a target fused with others when one of ``formats`` is the
        kohya layout (the original BFL model's ``img_attn_qkv``/``txt_attn_qkv``/``linear1``), else None.

        LoHa/LoKr on those modules are refused before training (:func:`~mindone_lora_plugin.train.flags.rules.
        check_fused_targets`). LyCORIS wraps whatever torch model it is given. In the kohya layout (sd-scripts,
        ComfyUI) that is the original BFL model, whose ``qkv``/``linear1`` are single Linears, so a LoHa/LoKr module
        there adapts the fused weight as a whole. That is a different module from separate q/k/v ones, and no exact
        conversion joins them. (Diffusers-based trainers apply LyCORIS to the separate ``to_q``/``to_k``/``to_v``
        under LyCORIS's own diffusers-path names, a layout this package does not write.) This package trains the
        diffusers model (separate q/k/v), so it trains LoHa/LoKr only on modules the kohya layout keeps as they are,
        and plain LoRA (which fuses exactly) everywhere. DoRA fuses exactly only when every part of a fused module
        has it (each part needs its magnitude)."""
        if component != "transformer" or "kohya" not in formats:
            return None
        found = keys.bfl_name(path)
        if found is None or len(found[2]) < 2:
            return None
        return f"{keys.KOHYA_PREFIXES['transformer']}_{found[0]}", tuple(f"{component}.{p}" for p in found[2])

    # ------------------------------------------------------------------ training (MindSpore)

    def load_training_parts(self, folder: str, args, models, weight_dtype) -> FlowMatchParts:
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
        config = models["transformer"].config
        if config.in_channels != 4 * vae.config.latent_channels:
            raise LoraError(f"this FLUX transformer takes {config.in_channels} input channels, not 4 × the VAE's "
                            f"{vae.config.latent_channels} latent channels: FLUX.1 Fill/Depth/Canny/Kontext "
                            "variants are not supported; use a FLUX.1 dev or schnell model")
        tokenizers = (CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                      T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2"))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
        shift = _option(args, "discrete_flow_shift")
        return FlowMatchParts(vae, tokenizers, scheduler, "flow_matching",
                              float(scheduler.config.shift if shift is None else shift), bool(config.guidance_embeds))

    def text_conditioner(self, models):
        from mindone_lora_plugin.architectures.flux.loss import FluxTextConditioner

        return FluxTextConditioner(models.get("text_encoder"), models.get("text_encoder_2"))

    def make_loss(self, context):
        from mindone_lora_plugin.architectures.flux.loss import FlowMatchLoss

        return FlowMatchLoss(context.models["transformer"], context.conditioner, context.train_text)

    def model_inputs(self, context, batch, rng, weighted: bool = True) -> tuple:
        """Flow matching: latents ``(z − shift_factor)·scaling_factor``, noise, σ, per-sample weights, then the
        conditioning (see :class:`~.loss.FlowMatchLoss`)."""
        import mindspore as ms
        import numpy as np

        from mindone_lora_plugin.architectures.flux.timesteps import sample_sigmas
        from mindone_lora_plugin.train.noise import draw_noise

        args, parts, inputs = context.args, context.parts, context.inputs
        latents = inputs.latents(batch, rng)
        noise = draw_noise(rng, latents.shape, args)
        n = latents.shape[0]
        sigmas = sample_sigmas(rng, n, _option(args, "timestep_sampling"), parts.flow_shift,
                               _option(args, "logit_mean"), _option(args, "logit_std"), _option(args, "sigmoid_scale"))
        weights = batch.loss_weights.astype(np.float64) if weighted else np.ones(n)
        if weighted:
            weights = inputs.prior_weighted(weights, n)
        text = inputs.text(batch)
        cond = (text[0], text[1])
        if parts.guidance:
            cond = cond + (ms.Tensor(np.full(n, _option(args, "guidance_scale"), np.float32)),)
        f32 = ms.float32
        return (ms.Tensor(latents.astype(np.float32), f32), ms.Tensor(noise, f32), ms.Tensor(sigmas, f32),
                ms.Tensor(weights.astype(np.float32))) + cond + inputs.mask(batch, latents.shape[2:])

    # ------------------------------------------------------------------ pipelines (MindSpore)

    def load_pipeline(self, folder: str, dtype=None):
        from mindone_lora_plugin.architectures.flux import pipeline

        return pipeline.load_pipeline(folder, dtype)

    def training_pipeline(self, models, parts):
        from mindone.diffusers import FlowMatchEulerDiscreteScheduler

        from mindone_lora_plugin.architectures.flux import pipeline

        m, loaded = models, parts
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(loaded.noise_scheduler.config)
        return pipeline.live_pipeline(m["transformer"], loaded.vae, m["text_encoder"], m["text_encoder_2"],
                                      *loaded.tokenizers, scheduler)
