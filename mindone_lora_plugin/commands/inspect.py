"""``mindone-lora inspect FILE [--json]``: what a LoRA file contains.

Format, architecture guess (and why), components with module counts, ranks and alphas (and whether they vary per
module), the kinds of modules targeted, dtype and a metadata summary. ``--json`` prints an object with exactly the keys
``format``, ``architecture``, ``components`` (name → ``modules``, ``algorithms`` (name → module count), ``ranks``,
``alphas``), ``dtype`` and ``metadata``.
"""

from __future__ import annotations

import json
import re
from collections import Counter

_SUMMARY_KEYS = ("ss_output_name", "modelspec.title", "ss_base_model_version", "modelspec.architecture",
                 "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_sd_model_name",
                 "ss_resolution", "ss_steps", "ss_epoch", "ss_learning_rate", "ss_training_comment",
                 "sshs_model_hash")


def add_parser(subparsers):
    p = subparsers.add_parser("inspect", help="show what a LoRA file contains",
                              description="Show a LoRA file's format, architecture, modules, ranks, alphas, dtype and "
                                          "metadata.")
    p.add_argument("file", metavar="FILE", help="the LoRA file (.safetensors), or a folder holding one")
    p.add_argument("--json", action="store_true", help="print JSON (keys: format, architecture, components, dtype, "
                                                       "metadata)")
    return p


def module_kind(component: str, path: str, mod) -> str:
    """A short kind for a module: attn, proj, ff, mlp, modulation, conv3x3, resnet, embedding or other (SD UNets,
    FLUX transformers, CLIP and T5 encoders)."""
    if mod.is_conv and tuple(mod.kernel_size) != (1, 1):
        return "conv3x3" if tuple(mod.kernel_size) == (3, 3) else "conv"
    dotted = "." + path
    if re.search(r"\.attn[12]?\.|\.self_attn\.|\.SelfAttention\.", dotted):
        return "attn"
    if re.search(r"\.norm\w*\.linear$", dotted):
        return "modulation"  # FLUX's AdaLN
    if re.search(r"(?:^|\.)proj_(?:in|out)$", path):
        return "proj"
    if re.search(r"\.ff(?:_context)?\.", dotted):
        return "ff"
    if re.search(r"\.mlp\.|\.DenseReluDense\.|\.proj_mlp$", dotted):
        return "mlp"
    if re.search(r"\.resnets\.\d+\.(?:time_emb_proj|conv_shortcut)$", path):
        return "resnet"
    if path.startswith(("time_embedding.", "add_embedding.", "time_text_embed.", "x_embedder", "context_embedder")):
        return "embedding"
    return "other"


def _values(counter: Counter, fmt) -> str:
    if not counter:
        return "-"
    if len(counter) == 1:
        return fmt(next(iter(counter)))
    parts = ", ".join(f"{fmt(v)}×{n}" for v, n in sorted(counter.items()))
    return f"{fmt(min(counter))}..{fmt(max(counter))} (vary: {parts})"


def _num(a: float):
    a = float(a)
    return int(a) if a.is_integer() else a


def summary(lf) -> dict:
    """The ``--json`` object for an opened LoRA file (:class:`~mindone_lora_plugin.formats.reader.LoraFile`)."""
    state = lf.state
    comps = {}
    for comp in ordered_components(state):
        mods = state.components[comp]
        comps[comp] = {"modules": len(mods),
                       "algorithms": dict(sorted(state.labels(comp).items())),
                       "ranks": sorted({m.rank for m in mods.values()}),
                       "alphas": sorted({float(m.alpha) for m in mods.values()})}
    return {"format": lf.format.name, "architecture": state.architecture or "unknown", "components": comps,
            "dtype": state.dtype(), "metadata": dict(state.metadata)}


def ordered_components(state) -> list[str]:
    from mindone_lora_plugin.state import component_order

    return sorted(state.components, key=component_order)


def strength_warning(lf) -> str:
    """One line when the file's alphas live only in its PEFT config (``lora_adapter_metadata`` or
    ``adapter_config.json``) and differ from the ranks: ComfyUI reads no such config and takes alpha = rank."""
    source = lf.info.alpha_source if lf.info is not None else ""
    if not {"lora_adapter_metadata", "adapter_config.json"} & set(source.split("+")):
        return ""
    off = sum(float(m.alpha) != m.rank for _, _, m in lf.state.modules())
    if not off:
        return ""
    return (f"ComfyUI and other tools that ignore lora_adapter_metadata apply this file at the wrong strength ({off} "
            "module(s) have alpha != rank); give them the kohya file (mindone-lora convert FILE OUT.safetensors "
            "--to kohya)")


def _short(v: str, n: int = 70) -> str:
    v = " ".join(str(v).split())
    return v if len(v) <= n else v[: n - 3] + "..."


def render(lf) -> str:
    from mindone_lora_plugin.architectures import label

    state, info = lf.state, lf.info
    lines = [f"file:          {lf.path}"]
    fmt = lf.format.name
    if info is not None:
        styles = ", ".join(sorted(info.styles))
        fmt += f" (keys: {styles}{'; UNet in SGM names' if info.sgm else ''})"
    lines.append(f"format:        {fmt}")
    arch = label(state.architecture) if state.architecture else "unknown"
    if info is not None and info.architecture_reason:
        arch += f" ({'' if info.architecture_strong else 'probably: '}{info.architecture_reason})"
    lines.append(f"architecture:  {arch}")
    lines.append(f"dtype:         {state.dtype()}")
    if info is not None and info.alpha_source:
        lines.append(f"alphas from:   {info.alpha_source}")
    warning = strength_warning(lf)
    if warning:
        lines.append(f"warning:       {warning}")
    lines.append(f"modules:       {len(state)}")
    for comp in ordered_components(state):
        mods = state.components[comp]
        kinds = Counter(module_kind(comp, p, m) for p, m in mods.items())
        kinds_s = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        algos = ", ".join(f"{a} {n}" if len(state.labels(comp)) > 1 else a
                          for a, n in sorted(state.labels(comp).items()))
        lines.append(f"  {comp:<15} {len(mods):>5} modules  algorithm {algos}  "
                     f"rank {_values(state.ranks(comp), str)}  "
                     f"alpha {_values(state.alphas(comp), lambda a: str(_num(a)))}  kinds: {kinds_s}")
    meta = state.metadata
    lines.append(f"metadata:      {len(meta)} keys" + ("" if meta else " (none)"))
    for k in _SUMMARY_KEYS:
        if k in meta:
            lines.append(f"  {k}: {_short(meta[k])}")
    if "lora_adapter_metadata" in meta:
        try:
            cfg = json.loads(meta["lora_adapter_metadata"])
            comps = sorted({k.split(".", 1)[0] for k in cfg})
            lines.append(f"  lora_adapter_metadata: LoraConfig for {', '.join(comps)}")
        except ValueError:
            lines.append("  lora_adapter_metadata: (not valid JSON)")
    others = len([k for k in meta if k not in _SUMMARY_KEYS and k != "lora_adapter_metadata"])
    if others:
        lines.append(f"  ... {others} more (see --json)")
    return "\n".join(lines)


def run(args, formats=None) -> int:
    from mindone_lora_plugin.commands.convert import available_formats
    from mindone_lora_plugin.formats.reader import open_lora

    lf = open_lora(args.file, formats=available_formats(formats))
    if args.json:
        print(json.dumps(summary(lf), indent=2, sort_keys=False))
    else:
        print(render(lf))
    return 0
