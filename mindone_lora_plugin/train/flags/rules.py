"""Every flag of ``mindone-lora train`` checked before any model is loaded.

A value the trainer cannot use ends in one line naming the flag and what it accepts; nothing is silently replaced by
a default or ignored (a flag that only works together with another one says which).
"""

from __future__ import annotations

import os

from mindone_lora_plugin.errors import LoraError

# flag → (lowest accepted, what it accepts); None values mean "not given" and are always fine
AT_LEAST_ONE = ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_train_steps", "lora_rank",
                "num_class_images", "sample_batch_size", "num_validation_images", "validation_epochs",
                "validation_steps", "num_inference_steps", "checkpoints_total_limit", "lora_conv_rank",
                "max_train_samples", "resolution")
NOT_NEGATIVE = ("lr_warmup_steps", "checkpointing_steps", "dataloader_num_workers", "noise_offset", "max_grad_norm",
                "adam_weight_decay", "prior_loss_weight", "seed")
# snr_gamma's check is in feature_args
POSITIVE = ("learning_rate", "text_encoder_lr", "adam_epsilon", "lora_alpha", "lora_conv_alpha")
FRACTIONS = {"adam_beta1": (0.0, 1.0, False), "adam_beta2": (0.0, 1.0, False)}
NOT_EMPTY = ("output_dir", "save_formats", "lora_targets", "image_column", "caption_column", "logging_dir",
             "instance_prompt", "class_prompt", "validation_prompt", "output_name", "caption_extension",
             "pretrained_model_name_or_path", "report_to")
EXISTING_FOLDERS = ("train_data_dir", "instance_data_dir", "reg_data_dir", "model_config")
# flag → the flag it needs and the words naming it (training features add theirs: TrainingFeature.needs)
NEEDS = {
    "validation_steps": ("validation_prompt", "--validation_prompt"),
    "class_data_dir": ("with_prior_preservation", "--with_prior_preservation"),
}


def check_resolution(resolution: int) -> int:
    """The training resolution (given or the model's default) must be a multiple of 8 (the VAE's downscale)."""
    if resolution % 8:
        raise LoraError(f"--resolution {resolution} is not divisible by 8; use e.g. {resolution - resolution % 8 or 8}")
    return resolution


def _given(value) -> bool:
    return value not in (None, False, 0, 0.0)


def validate_train_args(args, needs: dict | None = None) -> None:
    """Raise :class:`LoraError` (one line) for the first flag whose value cannot be used; ``needs``: the installed
    training features' flag dependencies (:func:`mindone_lora_plugin.train.features.active.needs`), checked with
    :data:`NEEDS`."""
    v = vars(args)
    for name in AT_LEAST_ONE:
        if v.get(name) is not None and v[name] < 1:
            raise LoraError(f"--{name} {v[name]} is out of range; it accepts a whole number of at least 1")
    for name in NOT_NEGATIVE:
        if v.get(name) is not None and v[name] < 0:
            raise LoraError(f"--{name} {v[name]} is out of range; it accepts 0 or more")
    for name in POSITIVE:
        if v.get(name) is not None and not v[name] > 0:
            raise LoraError(f"--{name} {v[name]} is out of range; it accepts a number greater than 0")
    for name, (low, high, inclusive) in FRACTIONS.items():
        x = v.get(name)
        if x is not None and not (low <= x <= high if inclusive else low <= x < high):
            raise LoraError(f"--{name} {x} is out of range; it accepts {low} ≤ value {'≤' if inclusive else '<'} "
                            f"{high}")
    for name in NOT_EMPTY:
        x = v.get(name)
        if isinstance(x, str) and not x.strip():
            raise LoraError(f"--{name} is empty; give a value or leave the flag out")
    if v.get("save_formats") is not None and not [f for f in args.save_formats.split(",") if f.strip()]:
        raise LoraError("--save_formats names no format; it accepts a comma-separated list such as diffusers,kohya")
    if v.get("output_name") and (os.sep in args.output_name or "/" in args.output_name):
        raise LoraError(f"--output_name {args.output_name!r} contains a path separator; it accepts a file name "
                        f"without folder (the file goes to --output_dir)")
    if v.get("caption_extension") and not args.caption_extension.startswith("."):
        raise LoraError(f"--caption_extension {args.caption_extension!r} must start with a dot, e.g. .txt")
    for name in EXISTING_FOLDERS:
        x = v.get(name)
        if x and not os.path.isdir(x):
            what = "does not exist" if not os.path.exists(x) else "is not a folder"
            raise LoraError(f"--{name} {x} {what}; it accepts an existing folder")
    for name in ("dataset_name",):
        x = v.get(name)
        if x and not os.path.exists(x):
            raise LoraError(f"dataset {x} does not exist locally (nothing is downloaded); --{name} accepts a local "
                            f"dataset folder or script")
    if v.get("class_data_dir") and os.path.exists(args.class_data_dir) and not os.path.isdir(args.class_data_dir):
        raise LoraError(f"--class_data_dir {args.class_data_dir} is not a folder; it accepts a folder (created when "
                        f"missing)")
    resume = v.get("resume_from_checkpoint")
    if resume and resume != "latest" and not os.path.isdir(resume):
        raise LoraError(f"--resume_from_checkpoint {resume} does not exist; it accepts a checkpoint-N folder or "
                        f"'latest'")
    for name, (other, words) in {**NEEDS, **(needs or {})}.items():
        if _given(v.get(name)) and not _given(v.get(other)):
            raise LoraError(f"--{name} only works together with {words}; add it or drop --{name}")
    _check_combinations(args)


def _check_combinations(args) -> None:
    if args.reg_data_dir and args.instance_data_dir:
        raise LoraError("--reg_data_dir (kohya regularisation folders) goes with --train_data_dir kohya folders; with "
                        "--instance_data_dir use --class_data_dir and --with_prior_preservation")


def check_fused_targets(arch, strategy, models, options, formats) -> None:
    """Before any data is loaded or adapter added: adapters that a file layout of the run must fuse but cannot, in one
    line naming the modules and what works instead. FLUX's kohya layout fuses q/k/v → ``qkv`` and q/k/v/proj_mlp →
    ``linear1``. An algorithm other than plain LoRA (LoHa, LoKr) on such a module has no exact fused form (a Hadamard
    or Kronecker product per part is not one of the concatenated weight), and the layouts that keep the parts separate
    (diffusers) hold plain LoRA only, so the run could not be saved. DoRA fuses only when every part of the fused
    module has it. Architectures without fused file modules are never refused."""
    fused_of = getattr(arch, "fused_file_module", None)
    algorithm = getattr(options, "algorithm", "lora") or "lora"
    dora = bool(getattr(options, "dora", False))
    if fused_of is None or (algorithm == "lora" and not dora):
        return
    hits: dict[str, tuple[list[str], tuple[str, ...]]] = {}
    for comp in strategy.enabled_components(models, options):
        if comp not in models:
            continue
        for path in strategy.target_modules(comp, models[comp], options):
            found = fused_of(comp, path, formats)
            if found:
                hits.setdefault(found[0], ([], found[1]))[0].append(f"{comp}.{path}")
    targets = options.targets if isinstance(options.targets, str) else ",".join(options.targets)
    if algorithm == "lora":  # DoRA: only fused modules some of whose parts are left out
        partial = {name: (got, parts) for name, (got, parts) in hits.items() if set(got) != set(parts)}
        if partial:
            name, (got, parts) = next(iter(partial.items()))
            left = [p for p in parts if p not in got]
            raise LoraError(
                f"--lora_dora with --lora_targets {targets} trains {', '.join(got)} but not {', '.join(left)}, which "
                f"the {arch.label} kohya layout fuses with them into {name} ({len(partial)} such fused module(s)); "
                f"a fused DoRA module needs every part: use --lora_targets kohya (every part), or "
                f"--save_formats diffusers (keeps the parts separate)")
        return
    if not hits:
        return
    first, (paths, _) = next(iter(hits.items()))
    more = sum(len(v[0]) for v in hits.values()) - len(paths)
    raise LoraError(
        f"--lora_algo {algorithm} cannot train {', '.join(paths)}{f' and {more} more module(s)' if more else ''} "
        f"(--lora_targets {targets}): the {arch.label} kohya layout fuses them into {first} ({len(hits)} fused "
        f"module(s)), and a {algorithm} module has no exact fused form; use --lora_algo lora, or --lora_targets "
        f"without the fused modules (e.g. {arch.unfused_targets_hint})")
