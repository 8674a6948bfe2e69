"""``--mixed_precision``: the dtype of the frozen weights, and what each device can run.

The frozen UNet / text-encoder / VAE weights are loaded in the chosen dtype (mindone's ``from_pretrained`` casts while
loading, so no float32 copy is kept); LoRA weights are always created and trained in float32 (the adapters cast their
input up and their output back). What a device cannot run is refused here, before any model is loaded.
"""

from __future__ import annotations

from mindone_lora_plugin.errors import LoraError

#: ``--mixed_precision`` values that run on MindSpore's CPU target (with this package's CPU backend)
CPU_PRECISIONS = ("no", "fp16")

_CPU_BF16 = ("--mixed_precision bf16 cannot run on CPU: MindSpore 2.7.1's CPU kernels have no bfloat16 variants for "
             "operations the models use (Gather, FillV2, ...); use --mixed_precision fp16 or no on CPU (bf16 runs on "
             "Ascend)")


def check(mixed_precision: str | None, device_target: str) -> None:
    """Refuse, in one line, a ``--mixed_precision`` the device cannot honour."""
    if str(device_target).upper() == "CPU" and (mixed_precision or "no") not in CPU_PRECISIONS:
        raise LoraError(_CPU_BF16)


def weight_dtype(mixed_precision: str | None, device_target: str):
    """The MindSpore dtype of the frozen weights for ``--mixed_precision`` on ``device_target`` (checked)."""
    from mindone_lora_plugin.dtypes import mindspore_dtype

    check(mixed_precision, device_target)
    return mindspore_dtype(mixed_precision if mixed_precision in ("fp16", "bf16") else "fp32")
