"""The trainer's data hooks: which loader and sizer to use, the batch plan, the caches and what a step reads from them.

Kept apart from ``trainer.py`` so the loop itself only calls :func:`load_text_to_image`, :func:`make_plan`,
:func:`setup_caches`, :func:`moments` and :func:`text_embeddings`.
"""

from __future__ import annotations

import numpy as np


def make_sizer(args, resolution: int):
    """A :class:`~mindone_lora_plugin.train.buckets.BucketSizer` with ``--enable_bucket``, else None (square)."""
    if not args.enable_bucket:
        return None
    from mindone_lora_plugin.train.buckets import BucketSizer, make_buckets, resolve_bucket_args

    low, high, steps = resolve_bucket_args(args, resolution)
    return BucketSizer(make_buckets(resolution, low, high, steps), args.bucket_no_upscale)


def load_text_to_image(trainer):
    """Examples of ``--train_data_dir`` (an imagefolder or kohya folders) / ``--dataset_name``, plus kohya
    regularisation images of ``--reg_data_dir``; returns ``(examples, unreadable images skipped)``."""
    from mindone_lora_plugin.train import data, kohya_data

    args, sizer, say = trainer.args, trainer.sizer, trainer._say
    trainer.dataset_info = {}
    if args.train_data_dir and kohya_data.is_kohya_folder(args.train_data_dir):
        examples, bad, distinct = kohya_data.load_kohya_examples(args.train_data_dir, "--train_data_dir", args,
                                                                 trainer.resolution, sizer)
        trainer.dataset_info["train"] = (distinct, len(examples))
        say(f"kohya dataset: {distinct} image(s), {len(examples)} with repeats")
    else:
        examples, bad = data.load_examples(args, trainer.resolution, sizer)
    if args.reg_data_dir:
        reg, reg_bad, reg_distinct = kohya_data.load_kohya_examples(args.reg_data_dir, "--reg_data_dir", args,
                                                                    trainer.resolution, sizer,
                                                                    loss_weight=args.prior_loss_weight)
        reg = kohya_data.balance_regularisation(reg, len(examples))
        trainer.dataset_info["reg"] = (reg_distinct, len(reg))
        say(f"regularisation: {reg_distinct} image(s), {len(reg)} used per epoch, loss weight {args.prior_loss_weight}")
        examples, bad = examples + reg, bad + reg_bad
    return examples, bad


def make_plan(trainer, examples, prior):
    from mindone_lora_plugin.train.captions import CaptionAugment
    from mindone_lora_plugin.train.data import BatchPlan

    args = trainer.args
    captions = CaptionAugment.from_args(args)
    plan = BatchPlan(examples, args.train_batch_size, trainer.resolution, trainer.seed, args.center_crop,
                     args.random_flip, trainer.rank, trainer.world, prior=prior, bucketed=trainer.sizer is not None,
                     captions=captions if captions.active else None)
    trainer.too_small = trainer.sizer.too_small if trainer.sizer is not None else 0
    if trainer.sizer is not None:
        from mindone_lora_plugin.train.buckets import log_buckets

        if trainer.too_small:
            trainer._say(f"skipped {trainer.too_small} image(s) smaller than the smallest bucket (--bucket_no_upscale)")
        trainer.bucket_counts = log_buckets(examples + (prior or []), trainer._say)
    if args.cache_latents or args.cache_latents_to_disk:
        from mindone_lora_plugin.train.cache import check_crops_cacheable

        check_crops_cacheable(plan)
    return plan


def setup_caches(trainer) -> None:
    """Fill the latent and text caches (when asked) once the encoders are built."""
    args = trainer.args
    ms = trainer._ms
    trainer.latent_cache = trainer.text_cache = None
    if args.cache_latents or args.cache_latents_to_disk:
        from mindone_lora_plugin.train.cache import LatentCache, cache_folder, vae_identity

        folder = cache_folder(args, args.output_dir) if args.cache_latents_to_disk else None
        vae_id = vae_identity(args.pretrained_model_name_or_path, args.variant, str(trainer.vae.dtype))

        def encode(pixels):
            return trainer.encode_cell(ms.Tensor(pixels, dtype=trainer.vae.dtype)).asnumpy().astype(np.float32)

        cache = LatentCache(encode, vae_id, folder, args.train_batch_size)
        cache.fill(list(trainer.plan.examples) + list(trainer.plan.prior), bool(args.random_flip))
        s = cache.stats
        trainer._say(f"latent cache: {s['encoded']} encoded, {s['read']} read from disk, {s['rebuilt']} rebuilt "
                     f"(stale or unreadable)" + (f" in {folder}" if folder else ""))
        trainer.latent_cache = cache
        if not args.validation_prompt:  # nothing decodes or encodes images any more: let the VAE go
            trainer.encode_cell = None
    if args.cache_text_encoder_outputs and not trainer.train_text:
        from mindone_lora_plugin.train.cache import TextCache

        cache = TextCache(trainer.conditioner, trainer._tokenize, args.train_batch_size)
        cache.fill(c for ex in list(trainer.plan.examples) + list(trainer.plan.prior) for c in ex.captions)
        trainer._say(f"text-encoder cache: {len(cache.entries)} caption(s) encoded")
        trainer.text_cache = cache


def moments(trainer, batch) -> np.ndarray:
    """The VAE moments of a batch: from the latent cache, or encoded now."""
    if getattr(trainer, "latent_cache", None) is not None:
        return trainer.latent_cache.moments(batch.keys)
    ms = trainer._ms
    return trainer.encode_cell(ms.Tensor(batch.pixels, dtype=trainer.vae.dtype)).asnumpy().astype(np.float32)


def text_embeddings(trainer, batch):
    """``(embeds, pooled)`` tensors of the batch's captions from the text cache, or None when there is none."""
    if getattr(trainer, "text_cache", None) is None:
        return None
    ms = trainer._ms
    embeds, pooled = trainer.text_cache.lookup(batch.captions)
    return ms.Tensor(embeds), ms.Tensor(pooled)
