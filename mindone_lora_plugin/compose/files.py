"""Writing one LoRA file through the plugin formats."""

from __future__ import annotations

import os

from mindone_lora_plugin.compose.folders import output_is_taken
from mindone_lora_plugin.compose.maths import concat_loras
from mindone_lora_plugin.compose.specs import _formats
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.state import LoraState


def pick_format(out: str, format: str | None = None, formats=None):
    """The format to write a combined LoRA with: ``format`` by name; else diffusers for a folder (or a
    ``pytorch_lora_weights.safetensors`` name), kohya for any other ``.safetensors`` file."""
    known = _formats(formats)
    if format is None:
        base = os.path.basename(out.rstrip(os.sep))
        ext = os.path.splitext(base)[1].lower()
        if base == "pytorch_lora_weights.safetensors" or not ext or os.path.isdir(out):
            format = "diffusers"
        elif ext == ".safetensors":
            format = "kohya"
        else:
            raise LoraError(f"cannot tell the format from {out}: give a .safetensors file (kohya), a folder "
                            f"(diffusers) or --format")
    if format not in known:
        raise LoraError(f"unknown LoRA format '{format}'; choose one of: {', '.join(sorted(known))}")
    return known[format]


def write_lora(state: LoraState, out: str, format: str | None = None, dtype: str | None = None,
               overwrite: bool = False, formats=None, output_name: str | None = None) -> str:
    """Write ``state`` to ``out`` with a format (see :func:`pick_format`), refusing an existing file unless
    ``overwrite``; return the path written."""
    fmt = pick_format(out, format, formats)
    name = output_name or os.path.splitext(os.path.basename(out.rstrip(os.sep)))[0] or "lora"
    if name == "pytorch_lora_weights":
        name = "lora"
    target = fmt.output_path(out, name) if hasattr(fmt, "output_path") else out
    if not overwrite and output_is_taken(target):
        raise LoraError(f"the output {target} already exists; choose another --out or pass --overwrite to replace it")
    return fmt.write(state, out, dtype=dtype, output_name=name)


def write_concatenated(loras, out: str, format: str | None = None, dtype: str | None = None,
                       overwrite: bool = False, formats=None, output_name: str | None = None) -> str:
    """:func:`concat_loras` written with :func:`write_lora`; return the path written."""
    return write_lora(concat_loras(loras), out, format, dtype, overwrite, formats, output_name)
