"""From flags to settings: LoRA options, argument checks, defaults, and what the output files record."""

from __future__ import annotations

import json
import os

from mindone_lora_plugin.errors import LoraError


def options_from_args(args, architecture: str, pm):
    """Translate parsed flags into :class:`LoraOptions` (plugin-added arguments go to ``extra``) with
    :func:`~mindone_lora_plugin.options.build_options`, the builder the integration API uses too."""
    from mindone_lora_plugin.options import build_options

    extra = {d: getattr(args, d) for d in getattr(args, "_plugin_dests", []) if hasattr(args, d)}
    for flag in ("network_dropout", "rank_dropout", "module_dropout"):
        value = getattr(args, flag, None)
        if value is not None:
            if not 0.0 <= value < 1.0:
                raise LoraError(f"--{flag} must be in [0, 1), got {value}")
            extra[flag] = float(value)
    options = build_options(pm, architecture, strategy=args.lora_strategy, algorithm=getattr(args, "lora_algo", None),
                            rank=args.lora_rank, alpha=args.lora_alpha, targets=args.lora_targets,
                            conv_rank=args.lora_conv_rank, conv_alpha=args.lora_conv_alpha, init=args.lora_init,
                            learning_rate=args.learning_rate, text_encoder_lr=args.text_encoder_lr,
                            save_dtype=args.save_dtype, dora=bool(getattr(args, "lora_dora", False)),
                            train_text_encoder=args.train_text_encoder, extra=extra)
    pm.get_algorithm(options.algorithm).check_options(options)  # before any model loads
    return options


def check_args(args):
    dreambooth = bool(args.instance_data_dir)
    checks = [(dreambooth and bool(args.train_data_dir or args.dataset_name),
               "--instance_data_dir (DreamBooth) cannot be combined with --train_data_dir/--dataset_name; pick one"),
              (dreambooth and not args.instance_prompt, "--instance_prompt is required with --instance_data_dir, "
                                                        'e.g. --instance_prompt "a photo of sks dog"'),
              (not dreambooth and (args.with_prior_preservation or args.instance_prompt),
               "--with_prior_preservation/--instance_prompt need --instance_data_dir (DreamBooth images)"),
              (args.with_prior_preservation and not args.class_prompt,
               '--with_prior_preservation needs --class_prompt, e.g. --class_prompt "a photo of a dog"'),
              (args.with_prior_preservation and not args.class_data_dir,
               "--with_prior_preservation needs --class_data_dir (a folder; missing class images are generated there)"),
              (args.num_class_images < 1 or args.sample_batch_size < 1,
               "--num_class_images and --sample_batch_size must be at least 1"),
              (args.train_batch_size < 1, "--train_batch_size must be at least 1"),
              (args.gradient_accumulation_steps < 1, "--gradient_accumulation_steps must be at least 1"),
              (args.max_train_steps is not None and args.max_train_steps < 1, "--max_train_steps must be at least 1"),
              (args.learning_rate <= 0, "--learning_rate must be positive"),
              (args.dataloader_num_workers < 0, "--dataloader_num_workers cannot be negative")]
    for bad, message in checks:
        if bad:
            raise LoraError(message)


def check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("")
        os.unlink(probe)
    except OSError as e:
        raise LoraError(f"cannot write to --output_dir {folder}: {e.strerror or e}; choose a writable folder") from None


def default_resolution(folder: str, info) -> int:
    try:
        with open(os.path.join(folder, "vae", "config.json"), encoding="utf-8") as f:
            size = json.load(f).get("sample_size")
        if isinstance(size, int) and size > 0:
            return size
    except (OSError, ValueError):
        pass
    from mindone_lora_plugin.architectures import get_architecture

    return get_architecture(info.architecture).default_resolution


# flags recorded only when given, so runs from a model folder keep the metadata they had before these flags existed
RECORDED_WHEN_GIVEN = ("vae", "model_config")


def plain_args(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_") and
            isinstance(v, (str, int, float, bool, type(None), list))
            and not (k in RECORDED_WHEN_GIVEN and v is None)}


def write_hparams(args, path: str) -> None:
    import yaml

    from mindone_lora_plugin.safetensors_io import write_bytes_atomic

    write_bytes_atomic(path, yaml.safe_dump(plain_args(args), sort_keys=True).encode("utf-8"))


def replace_options(options, **changes):
    import dataclasses

    return dataclasses.replace(options, **changes)


def dropout_metadata(args) -> dict[str, str]:
    """kohya's keys for the adapter dropouts: ``ss_network_dropout`` (``None`` when off) and ``rank_dropout`` /
    ``module_dropout`` in ``ss_network_args`` (kohya passes them as network args)."""
    meta = {"ss_network_dropout": str(getattr(args, "network_dropout", None) or None)}
    net_args = {k: str(getattr(args, k)) for k in ("rank_dropout", "module_dropout") if getattr(args, k, None)}
    if net_args:
        meta["ss_network_args"] = json.dumps(net_args)
    return meta


def training_metadata(trainer, global_step: int) -> dict[str, str]:
    """The training arguments as kohya ``ss_*`` keys (strings) plus the full flag set as JSON."""
    from mindone_lora_plugin.train.data.setup import data_metadata
    from mindone_lora_plugin.train.flags.loss_and_optimizer import metadata as feature_metadata

    args = trainer.args
    epoch = -(-global_step // trainer.updates_per_epoch)
    return {**data_metadata(trainer),
        "ss_output_name": trainer.output_name,
        "ss_sd_model_name": os.path.basename(os.path.abspath(args.pretrained_model_name_or_path)),
        "ss_learning_rate": str(args.learning_rate),
        "ss_unet_lr": str(trainer.options.lr_for(trainer.arch.denoiser)),
        "ss_text_encoder_lr": str(trainer.options.lr_for("text_encoder")),
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_lr_warmup_steps": str(args.lr_warmup_steps),
        "ss_steps": str(global_step),
        "ss_epoch": str(epoch),
        "ss_num_epochs": str(trainer.num_epochs),
        "ss_max_train_steps": str(trainer.max_steps),
        "ss_seed": str(trainer.seed),
        "ss_resolution": f"({trainer.resolution}, {trainer.resolution})",
        "ss_batch_size_per_device": str(args.train_batch_size),
        "ss_total_batch_size": str(args.train_batch_size * trainer.world * max(1, args.gradient_accumulation_steps)),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(bool(args.gradient_checkpointing)),
        "ss_mixed_precision": str(args.mixed_precision or "no"),
        "ss_noise_offset": str(args.noise_offset),
        "ss_min_snr_gamma": str(args.snr_gamma),
        "ss_num_train_images": str(len(trainer.plan.examples)),
        "ss_num_reg_images": str(len(trainer.plan.prior)),
        "ss_prediction_type": trainer.parts.prediction_type,
        **feature_metadata(args),  # ss_optimizer, the loss and LoRA+ keys
        **trainer.features.metadata(),  # EMA, validation loss, save cadence, … (each feature's keys)
        **dropout_metadata(args),
        "mindone_lora.training_args": json.dumps(plain_args(args), sort_keys=True),
    }


def start_distributed() -> tuple[int, int]:
    """``--distributed``: collective communication and data parallelism under msrun; ``(rank, world size)``."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    if not (os.environ.get("MS_ROLE") or os.environ.get("RANK_TABLE_FILE") or os.environ.get("MS_WORKER_NUM")):
        raise LoraError("--distributed needs MindSpore's launcher: run under msrun (e.g. msrun "
                        "--worker_num=2 --local_worker_num=2 $(which mindone-lora) train --distributed ...)")
    try:
        init()
    except RuntimeError as e:
        raise LoraError(f"--distributed: MindSpore could not start collective communication "
                        f"({' '.join(str(e).split())[:200]}); check the msrun settings") from None
    rank, world = get_rank(), get_group_size()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=world)
    return rank, world
