"""The latent and text-encoder-output caches (kohya's ``--cache_latents``, ``--cache_latents_to_disk``,
``--cache_text_encoder_outputs``) as a training feature: its flags and checks, filling the caches once the encoders
exist (after the features that encode held-out images), handing them to the run's batch inputs, and its ``ss_*``
keys. The caches themselves are :mod:`mindone_lora_plugin.train.data.cache`."""

from __future__ import annotations

import types

import numpy as np

from mindone_lora_plugin.train.features.base import TrainingFeature


class Caches(TrainingFeature):
    name = "caches"
    description = "encode every image and/or caption once before training (kohya's caches)"
    order = 25  # after the validation loss, which encodes its held-out images with the VAE the cache may release

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group(
            "caches (kohya)",
            "What changes every epoch cannot be cached and is refused: random crops (pass --center_crop) with a latent "
            "cache; --train_text_encoder, --shuffle_caption or --caption_dropout_rate with a text-encoder cache.")
        g.add_argument("--cache_latents", action="store_true",
                       help="encode every image (and its mirror image with --random_flip) once, before training")
        g.add_argument("--cache_latents_to_disk", action="store_true",
                       help="also keep the latents as safetensors in <data folder>/.latent_cache, keyed by image "
                            "content, size, flip and VAE; implies --cache_latents")
        g.add_argument("--cache_text_encoder_outputs", action="store_true",
                       help="encode every caption once with the frozen text encoder(s)")

    @classmethod
    def check(cls, args) -> None:
        from mindone_lora_plugin.train.data.cache import check_cache_args

        check_cache_args(args)

    def __init__(self, args):
        super().__init__(args)
        self.latents = bool(args.cache_latents or args.cache_latents_to_disk)
        self.text = False  # whether a text-encoder cache is in use (the text encoders may train instead)

    def plan_ready(self, run, plan) -> None:
        if self.latents:
            from mindone_lora_plugin.train.data.cache import check_crops_cacheable

            check_crops_cacheable(plan)

    def setup(self, run) -> None:
        examples = list(run.plan.examples) + list(run.plan.prior)
        if self.latents:
            run.inputs.latent_cache = self._latent_cache(run, examples)
        if self.args.cache_text_encoder_outputs and not run.train_text:
            from mindone_lora_plugin.train.data.cache import TextCache

            cache = TextCache(run.conditioner, run.inputs.tokenize, self.args.train_batch_size)
            cache.fill(c for ex in examples for c in ex.captions)
            run.say(f"text-encoder cache: {len(cache.entries)} caption(s) encoded")
            run.inputs.text_cache, self.text = cache, True

    def _latent_cache(self, run, examples):
        import mindspore as ms

        from mindone_lora_plugin.model_files import model_folder
        from mindone_lora_plugin.train.data.cache import LatentCache, cache_folder, vae_identity

        args, inputs, parts = self.args, run.inputs, run.parts
        folder = cache_folder(args, args.output_dir) if args.cache_latents_to_disk else None
        vae_id = vae_identity(model_folder(args), args.variant, str(parts.vae.dtype))

        def encode(pixels):
            return inputs.encode_cell(ms.Tensor(pixels, dtype=parts.vae.dtype)).asnumpy().astype(np.float32)

        cache = LatentCache(encode, vae_id, folder, args.train_batch_size)
        cache.fill(examples, bool(args.random_flip))
        s = cache.stats
        run.say(f"latent cache: {s['encoded']} encoded, {s['read']} read from disk, {s['rebuilt']} rebuilt "
                f"(stale or unreadable)" + (f" in {folder}" if folder else ""))
        needs_vae = (args.validation_prompt or getattr(args, "sample_prompts", None)
                     or getattr(args, "validation_split", None) or getattr(args, "validation_data_dir", None))
        if not needs_vae:  # nothing encodes or decodes images any more: let the VAE's weights go
            inputs.encode_cell = None
            parts.vae = types.SimpleNamespace(config=parts.vae.config, dtype=parts.vae.dtype)
        return cache

    def metadata(self) -> dict[str, str]:
        return {"ss_cache_latents": str(self.latents), "ss_cache_text_encoder_outputs": str(self.text)}
