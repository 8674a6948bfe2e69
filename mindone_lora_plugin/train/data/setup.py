"""The trainer's data hooks: which loader and sizer to use, the batch plan, the caches and what a step reads from them.

Kept apart from ``trainer.py`` so the loop itself only calls :func:`load_text_to_image`, :func:`make_plan`,
:func:`setup_caches`, :func:`moments` and :func:`text_embeddings`.
"""

from __future__ import annotations

import numpy as np

from mindone_lora_plugin.errors import LoraError


def make_sizer(args, resolution: int):
    """A :class:`~mindone_lora_plugin.train.data.buckets.BucketSizer` with ``--enable_bucket``, else None (square)."""
    if not args.enable_bucket:
        return None
    from mindone_lora_plugin.train.data.buckets import BucketSizer, make_buckets, resolve_bucket_args

    low, high, steps = resolve_bucket_args(args, resolution)
    return BucketSizer(make_buckets(resolution, low, high, steps), args.bucket_no_upscale)


def make_masks(args):
    """The mask source of ``--masked_loss`` (alpha channels or ``--conditioning_data_dir``), else None."""
    if not args.masked_loss:
        return None
    from mindone_lora_plugin.train.data.masks import MaskSource

    return MaskSource(args.conditioning_data_dir)


def mask_input(trainer, batch, latent_hw) -> tuple:
    """``(mask tensor,)`` for the loss with ``--masked_loss``, else ``()``."""
    if batch.masks is None:
        return ()
    from mindone_lora_plugin.train.data.masks import latent_masks

    return (trainer._ms.Tensor(latent_masks(batch.masks, tuple(latent_hw))),)


def load_text_to_image(trainer):
    """Examples of ``--train_data_dir`` (an imagefolder or kohya folders) / ``--dataset_name``, plus kohya
    regularisation images of ``--reg_data_dir``; returns ``(examples, unreadable images skipped)``."""
    from mindone_lora_plugin.train.data import kohya_folders, loader

    args, sizer, say, masks = trainer.args, trainer.sizer, trainer.say, getattr(trainer, "masks", None)
    trainer.dataset_info = {}
    kohya = bool(args.train_data_dir and kohya_folders.is_kohya_folder(args.train_data_dir))
    if kohya and args.max_train_samples is not None:
        raise LoraError("--max_train_samples applies to imagefolder/datasets data; with <repeats>_<name>/ folders "
                        "choose the images and repeats by folder instead")
    if not kohya and args.caption_extension != ".txt" and not args.reg_data_dir:
        raise LoraError(f"--caption_extension {args.caption_extension} applies to <repeats>_<name>/ folders, but "
                        f"--train_data_dir is an imagefolder (captions come from its metadata); drop the flag")
    if kohya:
        examples, bad, distinct = kohya_folders.load_kohya_examples(args.train_data_dir, "--train_data_dir", args,
                                                                 trainer.resolution, sizer, masks=masks)
        trainer.dataset_info["train"] = (distinct, len(examples))
        say(f"kohya dataset: {distinct} image(s), {len(examples)} with repeats")
    else:
        examples, bad = loader.load_examples(args, trainer.resolution, sizer, masks)
    if args.reg_data_dir:
        reg, reg_bad, reg_distinct = kohya_folders.load_kohya_examples(args.reg_data_dir, "--reg_data_dir", args,
                                                                    trainer.resolution, sizer,
                                                                    loss_weight=args.prior_loss_weight, masks=masks)
        reg = kohya_folders.balance_regularisation(reg, len(examples))
        trainer.dataset_info["reg"] = (reg_distinct, len(reg))
        say(f"regularisation: {reg_distinct} image(s), {len(reg)} used per epoch, loss weight {args.prior_loss_weight}")
        examples, bad = examples + reg, bad + reg_bad
    return examples, bad


def make_plan(trainer, examples, prior):
    from mindone_lora_plugin.train.data.captions import CaptionAugment
    from mindone_lora_plugin.train.data.loader import BatchPlan

    args = trainer.args
    captions = CaptionAugment.from_args(args)
    plan = BatchPlan(examples, args.train_batch_size, trainer.resolution, trainer.seed, args.center_crop,
                     args.random_flip, trainer.rank, trainer.world, prior=prior, bucketed=trainer.sizer is not None,
                     captions=captions if captions.active else None, masked=bool(args.masked_loss))
    if args.masked_loss:
        with_mask = sum(ex.mask is not None for ex in examples)
        if not with_mask:
            raise LoraError("--masked_loss: no training image has an alpha channel or a mask in "
                            "--conditioning_data_dir; add masks or drop --masked_loss")
        trainer.say(f"masked loss: {with_mask} of {len(examples)} example(s) have a mask (the rest count fully)")
    trainer.too_small = trainer.sizer.too_small if trainer.sizer is not None else 0
    if trainer.sizer is not None:
        from mindone_lora_plugin.train.data.buckets import log_buckets

        if trainer.too_small:
            trainer.say(f"skipped {trainer.too_small} image(s) smaller than the smallest bucket (--bucket_no_upscale)")
        trainer.bucket_counts = log_buckets(examples + (prior or []), trainer.say)
    if args.cache_latents or args.cache_latents_to_disk:
        from mindone_lora_plugin.train.data.cache import check_crops_cacheable

        check_crops_cacheable(plan)
    return plan


def setup_caches(trainer) -> None:
    """Fill the latent and text caches (when asked) once the encoders are built."""
    args = trainer.args
    ms = trainer._ms
    trainer.latent_cache = trainer.text_cache = None
    if args.cache_latents or args.cache_latents_to_disk:
        from mindone_lora_plugin.model_files import model_folder
        from mindone_lora_plugin.train.data.cache import LatentCache, cache_folder, vae_identity

        folder = cache_folder(args, args.output_dir) if args.cache_latents_to_disk else None
        vae_id = vae_identity(model_folder(args), args.variant, str(trainer.parts.vae.dtype))

        def encode(pixels):
            return trainer.encode_cell(ms.Tensor(pixels, dtype=trainer.parts.vae.dtype)).asnumpy().astype(np.float32)

        cache = LatentCache(encode, vae_id, folder, args.train_batch_size)
        cache.fill(list(trainer.plan.examples) + list(trainer.plan.prior), bool(args.random_flip))
        s = cache.stats
        trainer.say(f"latent cache: {s['encoded']} encoded, {s['read']} read from disk, {s['rebuilt']} rebuilt "
                    f"(stale or unreadable)" + (f" in {folder}" if folder else ""))
        trainer.latent_cache = cache
        needs_vae = (args.validation_prompt or getattr(args, "sample_prompts", None)
                     or getattr(args, "validation_split", None) or getattr(args, "validation_data_dir", None))
        if not needs_vae:  # nothing encodes or decodes images any more: let the VAE's weights go
            import types

            trainer.encode_cell = None
            trainer.parts.vae = types.SimpleNamespace(config=trainer.parts.vae.config, dtype=trainer.parts.vae.dtype)
    if args.cache_text_encoder_outputs and not trainer.train_text:
        from mindone_lora_plugin.train.data.cache import TextCache

        cache = TextCache(trainer.conditioner, trainer._tokenize, args.train_batch_size)
        cache.fill(c for ex in list(trainer.plan.examples) + list(trainer.plan.prior) for c in ex.captions)
        trainer.say(f"text-encoder cache: {len(cache.entries)} caption(s) encoded")
        trainer.text_cache = cache


def moments(trainer, batch) -> np.ndarray:
    """The VAE moments of a batch: from the latent cache, or encoded now."""
    if getattr(trainer, "latent_cache", None) is not None:
        return trainer.latent_cache.moments(batch.keys)
    ms = trainer._ms
    return trainer.encode_cell(ms.Tensor(batch.pixels, dtype=trainer.parts.vae.dtype)).asnumpy().astype(np.float32)


def sample_latents(trainer, batch, rng) -> np.ndarray:
    """Latents of the batch's images: a draw from the VAE's posterior (cached moments or a fresh encode), shifted
    and scaled as the VAE's config says (``shift_factor`` for FLUX's VAE, none for SD's)."""
    config = trainer.parts.vae.config
    mean, logvar = np.split(moments(trainer, batch), 2, axis=1)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    sample = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    return (sample - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor


def prior_weighted(trainer, weights: np.ndarray, n: int) -> np.ndarray:
    """DreamBooth's loss, mean(instance) + prior_loss_weight × mean(class), as per-sample weights: a prior batch is
    its instance images, then as many class images."""
    if not trainer.plan.prior:
        return weights
    half = n // 2
    return weights * np.concatenate([np.full(half, 2.0), np.full(n - half, 2.0 * trainer.args.prior_loss_weight)])


def batch_text(trainer, batch):
    """The batch's text input: cached ``(embeds, pooled)``, the token ids when the text encoders train, or the
    frozen encoders' outputs."""
    text = text_embeddings(trainer, batch)
    if text is None:
        ids, ids_2 = trainer._tokenize(batch.captions)
        text = (ids, ids_2) if trainer.train_text else trainer.conditioner(ids, ids_2)
    return text


def text_embeddings(trainer, batch):
    """``(embeds, pooled)`` tensors of the batch's captions from the text cache, or None when there is none."""
    if getattr(trainer, "text_cache", None) is None:
        return None
    ms = trainer._ms
    embeds, pooled = trainer.text_cache.lookup(batch.captions)
    return ms.Tensor(embeds), ms.Tensor(pooled)


def data_metadata(trainer) -> dict[str, str]:
    """kohya's ``ss_*`` keys for buckets, caches, captions and dataset folders (strings, as kohya writes them)."""
    import json
    import os

    args = trainer.args
    meta = {"ss_enable_bucket": str(bool(args.enable_bucket)),
            "ss_bucket_no_upscale": str(bool(args.bucket_no_upscale)),
            "ss_cache_latents": str(bool(args.cache_latents or args.cache_latents_to_disk)),
            "ss_cache_text_encoder_outputs": str(bool(getattr(trainer, "text_cache", None) is not None)),
            "ss_caption_dropout_rate": str(args.caption_dropout_rate),
            "ss_keep_tokens": str(args.keep_tokens),
            "ss_shuffle_caption": str(bool(args.shuffle_caption)),
            "ss_flip_aug": str(bool(args.random_flip)),
            "ss_random_crop": str(not args.center_crop),
            "ss_caption_extension": args.caption_extension,
            "ss_masked_loss": str(bool(args.masked_loss))}
    if trainer.sizer is not None:
        from mindone_lora_plugin.train.data.buckets import resolve_bucket_args

        low, high, steps = resolve_bucket_args(args, trainer.resolution)
        meta.update(ss_min_bucket_reso=str(low), ss_max_bucket_reso=str(high), ss_bucket_reso_steps=str(steps))
        counts = getattr(trainer, "bucket_counts", {})
        buckets = {str(i): {"resolution": [int(k.split("x")[1]), int(k.split("x")[0])], "count": n}
                   for i, (k, n) in enumerate(sorted(counts.items()))}
        meta["ss_bucket_info"] = json.dumps({"buckets": buckets, "skipped_too_small": trainer.too_small})
    from mindone_lora_plugin.train.data import kohya_folders

    for flag, key in (("train_data_dir", "ss_dataset_dirs"), ("reg_data_dir", "ss_reg_dataset_dirs")):
        folder = getattr(args, flag)
        if folder and kohya_folders.is_kohya_folder(folder):
            dirs: dict[str, dict] = {}
            for path, _, repeats in kohya_folders.scan(folder, "--" + flag, args.caption_extension):
                d = dirs.setdefault(os.path.basename(os.path.dirname(path)), {"n_repeats": repeats, "img_count": 0})
                d["img_count"] += 1
            meta[key] = json.dumps(dirs)
    return meta


def load_data(trainer):
    """Captioned examples (text-to-image), or instance (+ class) examples (DreamBooth): ``(examples, prior)``;
    sets ``trainer.skipped`` (unreadable images skipped)."""
    args = trainer.args
    from mindone_lora_plugin.train.data import loader

    if not args.instance_data_dir:
        examples, trainer.skipped = load_text_to_image(trainer)
        return examples, None
    examples, trainer.skipped = loader.load_folder_examples(args.instance_data_dir, args.instance_prompt,
                                                          trainer.resolution, args.on_bad_image,
                                                          "--instance_data_dir", trainer.sizer, trainer.masks)
    if not args.with_prior_preservation:
        return examples, None
    if trainer.is_main:
        from mindone_lora_plugin.train.data.dreambooth import ensure_class_images

        ensure_class_images(trainer, args.class_data_dir, args.class_prompt, args.num_class_images,
                            args.sample_batch_size)
    if trainer.world > 1:

        barrier()
    prior, bad = loader.load_folder_examples(args.class_data_dir, args.class_prompt, trainer.resolution,
                                           args.on_bad_image, "--class_data_dir", trainer.sizer, trainer.masks)
    trainer.skipped += bad
    trainer.say(f"DreamBooth: {len(examples)} instance and {len(prior)} class image(s), prior loss weight "
                f"{args.prior_loss_weight}")
    return examples, prior


def barrier() -> None:
    """Wait until every worker gets here (rank 0 may be generating class images meanwhile)."""
    from mindspore.communication import comm_func

    comm_func.barrier()
