"""Flags of ``mindone-lora train``.

Every flag of mindone's ``examples/diffusers/text_to_image/train_text_to_image_lora.py`` keeps its name and meaning;
flags it accepted but could not honour are refused with a reason; the LoRA flags of this package and of installed
plugins are added.
"""

from __future__ import annotations

import argparse

from mindone_lora_plugin.dtypes import SAVE_DTYPES
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.options import PRESETS
from mindone_lora_plugin.runtime.process import MODES

# Flags the mindone script accepted but nothing here can honour → the reason given when one is used.
REFUSED = {
    "push_to_hub": "pushing to a model hub is not supported (nothing is uploaded); copy the output folder yourself",
    "hub_token": "pushing to a model hub is not supported (nothing is uploaded)",
    "hub_model_id": "pushing to a model hub is not supported (nothing is uploaded)",
    "use_8bit_adam": "8-bit Adam (bitsandbytes) does not exist for MindSpore; drop the flag",
    "allow_tf32": "TF32 is a CUDA setting with no MindSpore equivalent; drop the flag",
    "enable_xformers_memory_efficient_attention": "xformers is a CUDA library; mindone picks its attention kernel "
                                                  "itself, drop the flag",
}

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


class _Refuse(argparse.Action):
    def __init__(self, option_strings, dest, nargs="?", **kw):
        super().__init__(option_strings, dest, nargs=nargs, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        raise LoraError(f"{option_string} is not supported: {REFUSED[self.dest]}")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and data (as mindone's train_text_to_image_lora.py)")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="a diffusers-layout model folder (SD1.x/2.x, SDXL, FLUX.1 or a plugin's family) or a "
                        "single-file .safetensors checkpoint in the original (A1111/ComfyUI) layout; the "
                        "architecture is detected from it")
    g.add_argument("--vae", type=str, default=None,
                   help="a single-file checkpoint's VAE replaced by this .safetensors file (as kohya's --vae)")
    g.add_argument("--model_config", type=str, default=None,
                   help="a single-file checkpoint's configs and tokenizers: a diffusers-layout folder of its base "
                        "model (its weights are not read)")
    g.add_argument("--revision", type=str, default=None, help="accepted for compatibility; local folders have none")
    g.add_argument("--variant", type=str, default=None, help="weight file variant, e.g. fp16")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="a local dataset folder or a dataset script/name loadable offline by `datasets`")
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="an imagefolder: images plus metadata.jsonl with a caption column")
    g.add_argument("--image_column", type=str, default="image")
    g.add_argument("--caption_column", type=str, default="text")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--cache_dir", type=str, default=None)
    g.add_argument("--resolution", type=int, default=None,
                   help="training resolution in pixels (default: 512 SD1.x, 768 SD2.x, 1024 SDXL, 32 tiny models)")
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--on_bad_image", choices=("skip", "stop"), default="skip",
                   help="an unreadable image: skip it (and count) or stop with an error")

    g = parser.add_argument_group("DreamBooth (as mindone's/diffusers' train_dreambooth_lora scripts)")
    g.add_argument("--instance_data_dir", type=str, default=None,
                   help="a folder of images of the subject; switches to DreamBooth training")
    g.add_argument("--instance_prompt", type=str, default=None, help='e.g. "a photo of sks dog"')
    g.add_argument("--class_data_dir", type=str, default=None,
                   help="class images for prior preservation (missing ones are generated with the base model)")
    g.add_argument("--class_prompt", type=str, default=None, help='e.g. "a photo of a dog"')
    g.add_argument("--with_prior_preservation", action="store_true")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--num_class_images", type=int, default=100)
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size when generating class images")

    g = parser.add_argument_group("training (as mindone's script)")
    g.add_argument("--output_dir", type=str, default="sd-model-finetuned-lora")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--train_batch_size", type=int, default=16)
    g.add_argument("--num_train_epochs", type=int, default=100)
    g.add_argument("--max_train_steps", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--snr_gamma", "--min_snr_gamma", dest="snr_gamma", type=float, default=None,
                   help="Min-SNR-gamma loss weighting (kohya: --min_snr_gamma); 5 is the paper's value")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-08)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--prediction_type", type=str, default=None, choices=(None, "epsilon", "v_prediction"))
    g.add_argument("--noise_offset", type=float, default=0)
    g.add_argument("--mixed_precision", type=str, default=None, choices=(None, "no", "fp16", "bf16"),
                   help="dtype of the frozen weights; LoRA weights always train in fp32")
    g.add_argument("--logging_dir", type=str, default="logs")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help="tensorboard (when tensorboardX is installed) or none")
    g.add_argument("--distributed", action="store_true", help="data parallel under msrun")
    g.add_argument("--enable_mindspore_data_sink", action="store_true",
                   help="accepted for compatibility; batches are fed from the host here")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='a checkpoint-N folder, or "latest" for the newest complete one in --output_dir')
    g.add_argument("--validation_prompt", type=str, default=None)
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_epochs", type=int, default=1)
    g.add_argument("--validation_steps", type=int, default=None,
                   help="also validate every N steps (default: only per --validation_epochs)")
    g.add_argument("--num_inference_steps", type=int, default=None,
                   help="denoising steps for validation images (default 30; 8 on tiny models)")

    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora_rank", "--rank", dest="lora_rank", type=int, default=4)
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    for flag, what in (("network_dropout", "drop neurons of each adapter's down output (LoHa/LoKr: its input)"),
                       ("rank_dropout", "drop whole ranks of each adapter per sample, rescaled (LoHa/LoKr: ΔW rows)"),
                       ("module_dropout", "skip each adapter for a step")):
        g.add_argument(f"--{flag}", type=float, default=None,
                       help=f"kohya's {flag}, in [0, 1): {what} with this probability, in training only; files and "
                            "validation unaffected" + (" (the only one --lora_dora takes)"
                                                       if flag == "module_dropout" else ""))
    g.add_argument("--lora_strategy", type=str, default=None, help="default: unet, or sdxl on SDXL models")
    g.add_argument("--lora_algo", type=str, default="lora",
                   help="adapter algorithm: lora (default; LoCon on convs) or a plugin's (loha, lokr from "
                        "mindone-lora-lycoris); see mindone-lora plugins")
    g.add_argument("--lora_dora", action="store_true",
                   help="DoRA (weight-decomposed LoRA, as peft's use_dora) on --lora_algo lora; Linear layers only")
    g.add_argument("--lora_targets", type=str, default="attn",
                   help=f"a preset ({', '.join(PRESETS)}) or a comma-separated list of module names")
    g.add_argument("--lora_conv_rank", type=int, default=None, help="rank of 3x3 convs with kohya-conv (conv_dim)")
    g.add_argument("--lora_conv_alpha", type=float, default=None, help="alpha of 3x3 convs (conv_alpha)")
    g.add_argument("--lora_init", choices=("gaussian", "default"), default="gaussian",
                   help="LoRA A init: gaussian (as mindone's script) or PEFT's default (kaiming)")
    g.add_argument("--train_text_encoder", action="store_true", help="also train the text encoder(s)")
    g.add_argument("--text_encoder_lr", type=float, default=None, help="learning rate of the text encoder(s)")
    g.add_argument("--save_formats", type=str, default="diffusers,kohya")
    g.add_argument("--output_name", type=str, default=None, help="kohya file name (default: the output folder's name)")
    g.add_argument("--save_dtype", choices=SAVE_DTYPES, default=None)

    from mindone_lora_plugin.train.flags.data import add_data_arguments

    add_data_arguments(parser)

    g = parser.add_argument_group("runtime")
    g.add_argument("--mode", choices=MODES, default="auto",
                   help="MindSpore execution mode; auto: GRAPH_MODE, except PyNative for full-size models on CPU, "
                        "where GRAPH_MODE keeps several times the memory")
    g.add_argument("--device_target", choices=("CPU", "GPU", "Ascend"), default=None)
    g.add_argument("--demo", nargs="?", const="sd1", choices=("sd1", "sdxl", "dreambooth", "flux", "sd3"), default=None,
                   help="train a built-in tiny model on generated data (sd1, sdxl, flux, sd3, or dreambooth on sd1)")

    from mindone_lora_plugin.plugins import get_plugin_manager
    from mindone_lora_plugin.train.features import active as features
    from mindone_lora_plugin.train.flags.loss_and_optimizer import add_arguments as add_kohya_arguments

    add_kohya_arguments(parser)  # kohya's loss options, LoRA+, optimizers
    features.add_arguments(parser, get_plugin_manager())  # EMA, validation loss, samples, save cadence, ...

    g = parser.add_argument_group("refused (mindone accepted these but they cannot be honoured)")
    for dest in REFUSED:
        g.add_argument("--" + dest, dest=dest, action=_Refuse, help=argparse.SUPPRESS)


def add_plugin_arguments(parser: argparse.ArgumentParser) -> None:
    from mindone_lora_plugin.plugins import get_plugin_manager

    group = parser.add_argument_group("plugins")
    before = {a.dest for a in parser._actions}
    get_plugin_manager().add_arguments(group)
    parser.set_defaults(_plugin_dests=sorted({a.dest for a in parser._actions} - before))
