"""The trainer's data hooks: which loader and sizer to use, the batch plan, the caches and what a step reads from them.

Kept apart from ``trainer.py`` so the loop itself only calls :func:`load_data` and :func:`make_plan` and builds a
:class:`StepInputs`, the side of a batch that a family's loss reads (the caches feature fills its caches).
"""

from __future__ import annotations

import numpy as np

from mindone_lora_plugin.errors import LoraError


class StepInputs:
    """A batch as a family's loss needs it (:class:`~mindone_lora_plugin.architectures.context.BatchInputs`): latents
    from the latent cache or the VAE, the text from the text cache, the tokenizers or the frozen encoders,
    DreamBooth's weighting and the loss masks. The caches feature gives it the caches once they are filled."""

    def __init__(self, args, parts, encode_cell, conditioner, train_text: bool, has_prior: bool):
        self.args, self.parts, self.encode_cell = args, parts, encode_cell
        self.conditioner, self.train_text, self.has_prior = conditioner, train_text, has_prior
        self.latent_cache = self.text_cache = None

    def moments(self, batch) -> np.ndarray:
        """The VAE moments of a batch: from the latent cache, or encoded now."""
        if self.latent_cache is not None:
            return self.latent_cache.moments(batch.keys)
        import mindspore as ms

        pixels = ms.Tensor(batch.pixels, dtype=self.parts.vae.dtype)
        return self.encode_cell(pixels).asnumpy().astype(np.float32)

    def latents(self, batch, rng) -> np.ndarray:
        """A draw from the VAE's posterior (cached moments or a fresh encode), shifted and scaled as the VAE's config
        says (``shift_factor`` for FLUX's VAE, none for SD's)."""
        config = self.parts.vae.config
        mean, logvar = np.split(self.moments(batch), 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        sample = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
        return (sample - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor

    def prior_weighted(self, weights: np.ndarray, n: int) -> np.ndarray:
        """DreamBooth's loss, mean(instance) + prior_loss_weight × mean(class), as per-sample weights: a prior batch
        is its instance images, then as many class images."""
        if not self.has_prior:
            return weights
        half = n // 2
        return weights * np.concatenate([np.full(half, 2.0), np.full(n - half, 2.0 * self.args.prior_loss_weight)])

    def text(self, batch) -> tuple:
        """Cached ``(embeds, pooled)``, the token ids when the text encoders train, or the frozen encoders'
        outputs."""
        if self.text_cache is not None:
            import mindspore as ms

            embeds, pooled = self.text_cache.lookup(batch.captions)
            return ms.Tensor(embeds), ms.Tensor(pooled)
        ids = self.tokenize(batch.captions)  # one tensor per tokenizer (two at least: SD's one given twice)
        return ids if self.train_text else self.conditioner(*ids)

    def tokenize(self, captions) -> tuple:
        """The token ids of ``captions``, one tensor per tokenizer (one text encoder: its ids twice)."""
        import mindspore as ms

        def ids(tok):
            out = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="np")
            return ms.Tensor(out.input_ids.astype(np.int32))

        found = [ids(tok) for tok in self.parts.tokenizers]
        return tuple(found) if len(found) > 2 else (found[0], found[-1])

    def mask(self, batch, latent_hw) -> tuple:
        """``(mask tensor,)`` for the loss with ``--masked_loss``, else ``()``."""
        if batch.masks is None:
            return ()
        import mindspore as ms

        from mindone_lora_plugin.train.data.masks import latent_masks

        return (ms.Tensor(latent_masks(batch.masks, tuple(latent_hw))),)


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
    """The batch plan of the run (with the features' caption augmentation); every feature's ``plan_ready``."""
    from mindone_lora_plugin.train.data.loader import BatchPlan

    args = trainer.args
    plan = BatchPlan(examples, args.train_batch_size, trainer.resolution, trainer.seed, args.center_crop,
                     args.random_flip, trainer.rank, trainer.world, prior=prior, bucketed=trainer.sizer is not None,
                     captions=trainer.features.caption_augment(), masked=trainer.masks is not None)
    trainer.features.plan_ready(trainer, plan)  # buckets logged, masks counted, crops checked for a latent cache
    return plan


def data_metadata(trainer) -> dict[str, str]:
    """kohya's ``ss_*`` keys for the data (strings, as kohya writes them); buckets, caches, caption augmentation and
    the masked loss add theirs as training features."""
    import json
    import os

    args = trainer.args
    meta = {"ss_flip_aug": str(bool(args.random_flip)),
            "ss_random_crop": str(not args.center_crop),
            "ss_caption_extension": args.caption_extension}
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
