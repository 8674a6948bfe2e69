"""Every flag check of ``mindone-lora train``, in one pipeline that runs before any model loads.

The stages, in order: the flags' own values (:mod:`~mindone_lora_plugin.train.flags.rules`) and every installed
training feature's :meth:`~mindone_lora_plugin.train.features.base.TrainingFeature.check`, the model folder's
architecture (its ``config.json`` files only) and the flags it does not use
(:attr:`~mindone_lora_plugin.architectures.base.Architecture.unused_flags`), the resolution, how the flags combine
(:func:`~mindone_lora_plugin.train.flags.settings.check_args`), kohya's loss/LoRA+/optimizer flags, the features'
image sizer (the bucket settings against the resolution) and mask source, the LoRA options (the algorithm's checks
and the dropouts) and the save formats. A flag that cannot be used is one
:class:`~mindone_lora_plugin.errors.LoraError` line naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mindone_lora_plugin.errors import LoraError


@dataclass(frozen=True)
class CheckedFlags:
    """What the checks found, for the trainer: nothing here has loaded a model."""

    info: object  # BaseModelInfo of the model folder
    arch: object  # its Architecture
    resolution: int
    features: object  # the run's ActiveFeatures (made once every check passed)
    sizer: object  # how the loaders size images (the buckets feature's BucketSizer), else None: square crops
    masks: object  # the masked-loss feature's MaskSource, else None
    options: object  # LoraOptions
    formats: list
    exact_format: object  # what checkpoints hold and a resume reads


def check_unused_flags(args, arch) -> None:
    """A flag the architecture does not use, given a value, is refused in one line."""
    given = [dest for dest in arch.unused_flags if getattr(args, dest, None) not in (None, False)]
    if given:
        flags = ", ".join("--" + dest for dest in given)
        raise LoraError(f"{flags} {'does' if len(given) == 1 else 'do'} not apply to {arch.label or arch.name} "
                        f"training ({arch.name}); leave {'it' if len(given) == 1 else 'them'} out")


def check_flags(args, pm) -> CheckedFlags:
    """Run every check; return what they found. Raises :class:`LoraError` at the first flag that cannot be used."""
    from mindone_lora_plugin.base_model_info import BaseModelInfo
    from mindone_lora_plugin.core_plugin import check_save_formats, exact_format
    from mindone_lora_plugin.model_files import model_folder
    from mindone_lora_plugin.train.features import active as features
    from mindone_lora_plugin.train.flags import loss_and_optimizer
    from mindone_lora_plugin.train.flags.rules import check_resolution, validate_train_args
    from mindone_lora_plugin.train.flags.settings import check_args, default_resolution, options_from_args

    if not args.pretrained_model_name_or_path:
        raise LoraError("--pretrained_model_name_or_path is required (a diffusers-layout model folder), or use "
                        "--demo")
    validate_train_args(args, features.needs(pm))
    features.check(args, pm)  # every installed feature's flags (buckets, caches, captions, EMA, ...)
    info = BaseModelInfo.from_folder(model_folder(args))
    arch = pm.get_architecture(info.architecture)  # loss, conditioning, pipelines
    resolution = check_resolution(args.resolution or default_resolution(info.source, info))
    check_args(args)
    loss_and_optimizer.check(args)
    check_unused_flags(args, arch)
    active = features.ActiveFeatures(args, pm)  # EMA, validation loss, caches, buckets, ...
    sizer = active.image_sizer(resolution)  # the bucket settings against the resolution
    masks = active.mask_source()
    options = options_from_args(args, info.architecture, pm)  # the algorithm's checks, the dropouts
    formats = [f.strip() for f in args.save_formats.split(",") if f.strip()]
    check_save_formats(pm, formats, options)  # unknown names, or formats that cannot hold the algorithm
    return CheckedFlags(info, arch, resolution, active, sizer, masks, options, formats, exact_format(pm, options))
