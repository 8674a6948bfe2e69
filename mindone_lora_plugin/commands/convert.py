"""``mindone-lora convert IN OUT --to {diffusers,kohya} [--base MODEL_DIR] [--dtype {fp32,fp16,bf16}]``.

Reads any plain-LoRA safetensors file (kohya, diffusers/PEFT and their variants of naming) and writes it in the chosen
format with every module's rank and alpha kept. Without ``--base`` the architecture comes from the file; when it cannot
be told and the target needs it (kohya names SDXL UNet modules differently), the command says so and asks for
``--base``. ``OUT`` is a file, or a folder to write the format's default file name into. Nothing is written on failure.
"""

from __future__ import annotations

import os

from mindone_lora_plugin.dtypes import SAVE_DTYPES as DTYPE_CHOICES
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.model_files import add_model_file_arguments, model_arg


def add_parser(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert a LoRA file between formats (diffusers, kohya)",
        description="Convert a LoRA file between formats, keeping every module's rank and alpha. Reads kohya, "
                    "diffusers/PEFT and ComfyUI-style plain-LoRA .safetensors files.")
    p.add_argument("input", metavar="IN", help="the LoRA file (.safetensors), or a folder holding one")
    p.add_argument("output", metavar="OUT",
                   help="the file to write, or a folder (diffusers: OUT/pytorch_lora_weights.safetensors)")
    p.add_argument("--to", required=True, metavar="{diffusers,kohya}", help="the format to write")
    p.add_argument("--base", metavar="MODEL", default=None,
                   help="the base model folder (diffusers layout) or single-file checkpoint: checks every key and "
                        "shape against it and fixes the architecture")
    add_model_file_arguments(p)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="save dtype (default: keep the file's); kohya casts alphas too")
    return p


def available_formats(formats=None) -> dict:
    """Name → format: ``formats`` when given, else the plugin manager's, else the built-ins."""
    if formats is not None:
        return formats if isinstance(formats, dict) else {f.name: f for f in formats}
    try:
        from mindone_lora_plugin.plugins import get_plugin_manager

        found = get_plugin_manager().formats()
        if found:
            return found
    except LoraError:
        raise
    except Exception:  # pragma: no cover - a broken plugin environment still converts with the built-ins
        pass
    from mindone_lora_plugin.formats.reader import builtin_formats

    return {f.name: f for f in builtin_formats()}


def output_name_for(in_path: str, out: str) -> str:
    """The run/output name written into metadata: OUT's file stem, else the input's."""
    stem, ext = os.path.splitext(os.path.basename(out.rstrip(os.sep)))
    if ext and not os.path.isdir(out):
        return stem
    stem = os.path.splitext(os.path.basename(in_path))[0]
    if stem == "pytorch_lora_weights":
        stem = os.path.basename(os.path.dirname(os.path.abspath(in_path))) or stem
    return stem or "lora"


def run(args, formats=None) -> int:
    from mindone_lora_plugin.architectures import label
    from mindone_lora_plugin.base_model_info import BaseModelInfo
    from mindone_lora_plugin.formats.common import PlainLoraFormat
    from mindone_lora_plugin.formats.reader import open_lora

    known = available_formats(formats)
    if args.to not in known:
        raise LoraError(f"unknown format '{args.to}' for --to; choose one of: {', '.join(sorted(known))}")
    target = known[args.to]
    out = args.output
    ext = os.path.splitext(out.rstrip(os.sep))[1]
    if isinstance(target, PlainLoraFormat) and ext and ext.lower() != ".safetensors" and not os.path.isdir(out):
        raise LoraError(f"OUT {out} must be a .safetensors file or a folder; LoRA files are only written as "
                        "safetensors")
    base = BaseModelInfo.from_folder(model_arg(args.base, args)) if args.base else None
    lf = open_lora(args.input, base=base, formats=known)
    state = lf.state
    name = output_name_for(lf.path, out)
    written = target.write(state, out, dtype=getattr(args, "dtype", None), output_name=name)
    from mindone_lora_plugin.state import component_order

    comps = ", ".join(f"{c} {len(state.components[c])}" for c in sorted(state.components, key=component_order))
    arch = label(state.architecture) if state.architecture else "unknown architecture"
    print(f"wrote {written} ({target.name}, {arch}, {len(state)} modules: {comps}; read as {lf.format.name})")
    return 0
