"""SD3 LoRA files: every naming of :mod:`.keys` read into a :class:`~mindone_lora_plugin.state.LoraState`, and the
kohya (original MMDiT, fused q/k/v) layout written from one.

The state is keyed by diffusers paths of ``transformer`` / ``text_encoder`` (CLIP-L) / ``text_encoder_2`` (CLIP-G) /
``text_encoder_3`` (T5), one module per diffusers Linear, ``architecture == "sd3"``. Reading a fused ``qkv`` splits it
exactly and writing the kohya layout fuses the parts back (the exact fuse/split of
:mod:`mindone_lora_plugin.architectures.flux.fuse`, which knows nothing of FLUX but fused Linears); the diffusers layout
is the generic ``<component>.<path>.lora_A`` one with ``lora_adapter_metadata``, which ``StableDiffusion3Pipeline.
load_lora_weights`` reads.

Names read (``.lora_down/.lora_up/.lora_A/.lora_B`` or another installed algorithm's tensor names, optional
``.alpha``): kohya sd-scripts ``lora_unet_joint_blocks_0_x_block_attn_qkv``, ``lora_te1_``/``lora_te2_``/``lora_te3_``;
ComfyUI ``diffusion_model.joint_blocks.0.x_block.attn.qkv``; diffusers/PEFT ``transformer.transformer_blocks.0.attn.
to_q`` (``text_encoder.``, ``text_encoder_2.``, ``text_encoder_3.``; bare PEFT ``base_model.model.``); OneTrainer
``lora_transformer_transformer_blocks_0_attn_to_q``. Keys of no known naming are refused in one line (nothing is
dropped silently).
"""

from __future__ import annotations

from dataclasses import dataclass

from mindone_lora_plugin.architectures.flux import fuse
from mindone_lora_plugin.architectures.sd3 import keys
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.state import LoraModule, LoraState

DOWN, UP, ALPHA = "down", "up", "alpha"
_PLAIN = ((".lora_magnitude_vector.weight", "lora:magnitude"), (".lora_down.weight", DOWN), (".lora_up.weight", UP),
          (".lora_A.weight", DOWN), (".lora_B.weight", UP), (".alpha", ALPHA))
_FLAT = (("lora_unet_", "transformer"), ("lora_transformer_", "transformer"), ("lora_te1_", "text_encoder"),
         ("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_3"))
_DOTTED = (("text_encoders.clip_l.transformer.", "text_encoder"),
           ("text_encoders.clip_g.transformer.", "text_encoder_2"),
           ("text_encoders.t5xxl.transformer.", "text_encoder_3"), ("text_encoder_2.", "text_encoder_2"),
           ("text_encoder_3.", "text_encoder_3"), ("text_encoder.", "text_encoder"), ("transformer.", "transformer"),
           ("model.diffusion_model.", "transformer"), ("diffusion_model.", "transformer"),
           ("base_model.model.", "transformer"))


@dataclass(frozen=True)
class SD3Key:
    """One tensor key: component, module name (an MMDiT ``_`` name or a diffusers path), naming, tensor role."""

    key: str
    component: str
    name: str
    naming: str  # "mmdit" or "diffusers"
    role: str


def _suffixes():
    from mindone_lora_plugin.formats.names import algorithm_suffixes

    return tuple((s, r) for s, r, _ in algorithm_suffixes()) + _PLAIN


def _module_name(comp: str, stem: str) -> tuple[str, str] | None:
    if comp == "transformer" and keys.mmdit_parts(stem) is not None:
        return "mmdit", stem.replace(".", "_")
    path = keys.diffusers_path(comp, stem)
    return ("diffusers", path) if path else None


def parse_key(key: str, suffixes=None) -> SD3Key | None:
    """One tensor key of an SD3 LoRA file in any naming of the module docstring; None when it is none of them."""
    for suffix, role in suffixes or _suffixes():
        if key.endswith(suffix) and len(key) > len(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None
    for prefix, comp in _FLAT if "." not in stem else _DOTTED:
        if stem.startswith(prefix):
            found = _module_name(comp, stem[len(prefix):])
            return SD3Key(key, comp, found[1], found[0], role) if found else None
    return None


def _example(items, n=3) -> str:
    items = list(items)
    return ", ".join(f"'{k}'" for k in items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def parse_keys(names, where: str) -> list[SD3Key]:
    """Every key parsed, or one :class:`LoraError` line naming the keys of no SD3 naming."""
    suffixes = _suffixes()
    parsed = [(k, parse_key(k, suffixes)) for k in names]
    unknown = [k for k, pk in parsed if pk is None]
    if unknown:
        raise LoraError(f"{where}: {len(unknown)} key(s) are not SD3 LoRA weights of a known naming, e.g. "
                        f"{_example(unknown)}; expected kohya (lora_unet_joint_blocks_0_x_block_attn_qkv ...), ComfyUI "
                        "(diffusion_model.joint_blocks.0 ...) or diffusers (transformer.transformer_blocks.0 ...) keys")
    if not parsed:
        raise LoraError(f"{where} holds no LoRA weights (no tensors); it is not a LoRA file")
    return [pk for _, pk in parsed]


def _part_sizes(parts, mod: LoraModule, base) -> list[int]:
    shapes = base.modules.get("transformer", {}) if base is not None else {}
    if all(p in shapes for p in parts):
        return [int(shapes[p][0]) for p in parts]
    rows = int(mod.base_shape()[0])
    return [rows // len(parts)] * len(parts)  # q, k and v are equally wide


def build_state(tensors: dict, metadata: dict[str, str], base=None, where: str = "the LoRA file"):
    """``(LoraState, ReadInfo)`` of an SD3 LoRA file, fused modules split exactly; with ``base`` (an SD3
    :class:`~mindone_lora_plugin.base_model_info.BaseModelInfo`) every module is checked against it."""
    from mindone_lora_plugin.formats.alphas import alpha_value, configs_from_metadata
    from mindone_lora_plugin.formats.plain import ReadInfo, _module_from_roles

    groups: dict[tuple, dict] = {}
    for pk in parse_keys(list(tensors), where):
        roles = groups.setdefault((pk.component, pk.naming, pk.name), {})
        if pk.role in roles:
            raise LoraError(f"{where}: keys '{roles[pk.role].key}' and '{pk.key}' hold the same LoRA tensor; the file "
                            "mixes two namings of one module")
        roles[pk.role] = pk
    configs = configs_from_metadata(metadata, where) or {}
    state = LoraState(architecture="sd3", metadata=dict(metadata or {}))
    owner: dict[tuple[str, str], str] = {}
    sources = set()
    for (comp, naming, name), roles in groups.items():
        first = next(iter(roles.values())).key
        parts = (name,) if naming == "diffusers" else keys.mmdit_parts(name)
        mod = _module_from_roles(roles, tensors, comp, parts[0] if len(parts) == 1 else name, where)
        if ALPHA in roles:
            mod.alpha = alpha_value(tensors[roles[ALPHA].key], roles[ALPHA].key, where)
            sources.add("keys")
        elif comp in configs and len(parts) == 1:
            mod.alpha = configs[comp].alpha_for(parts[0], mod.rank)
            sources.add("lora_adapter_metadata")
        else:
            mod.alpha = float(mod.rank)
            sources.add("rank")
        shown = f"{where}: module '{first.rsplit('.', 2)[0]}'"
        if len(parts) > 1:
            pieces = list(zip(parts, fuse.split(mod, _part_sizes(parts, mod, base), shown)))
        else:
            if naming == "mmdit" and keys.is_swapped(name, tuple(mod.base_shape())):
                mod = fuse.swap_halves(mod, shown)
            pieces = [(parts[0], mod)]
        for path, piece in pieces:
            if piece is None:
                continue
            if (comp, path) in owner:
                raise LoraError(f"{where}: keys '{owner[(comp, path)]}' and '{first}' both adapt {comp}.{path}; the "
                                "file mixes two namings of one module")
            owner[(comp, path)] = first
            state.add(comp, path, piece)
    if base is not None:
        base.fit_shapes(state)
    info = ReadInfo(styles={f"sd3-{n}" for _, n, _ in groups}, alpha_source="+".join(sorted(sources)),
                    architecture_reason=keys.detect(tensors, metadata) or "the base model is SD3",
                    architecture_strong=True)
    return state, info


def read_file(tensors: dict, metadata: dict[str, str], base, where: str):
    """``(LoraState, ReadInfo)`` for an SD3 base model or a file that names SD3 (else None: another family's); an
    SD3 file for another family's base model is refused in one line naming both."""
    from mindone_lora_plugin.architectures import label

    why = keys.detect(tensors, metadata)
    base_sd3 = base is not None and base.architecture == "sd3"
    if not why and not base_sd3:
        return None
    if why and base is not None and not base_sd3:
        src = f" {base.source}" if base.source else ""
        raise LoraError(f"{where} is a LoRA for SD3 ({why}) but the base model{src} is {label(base.architecture)}; "
                        f"use a LoRA made for {label(base.architecture)} or an SD3 model")
    return build_state(tensors, metadata, base, where)


def kohya_modules(state: LoraState) -> dict[str, tuple[LoraModule, str]]:
    """``{kohya name: (module, what it holds)}``: q/k/v fused into the MMDiT ``qkv`` (:func:`.fuse.fuse`), the
    swapped-halves modules reordered."""
    out: dict[str, tuple[LoraModule, str]] = {}
    groups: dict[str, dict[int, tuple[str, LoraModule]]] = {}
    for comp, path, mod in state.modules():
        if comp not in keys.COMPONENTS:
            raise LoraError(f"the LoRA has weights for {comp}, which SD3 has not (its components: "
                            f"{', '.join(keys.COMPONENTS)}); it was made for another architecture")
        if comp != "transformer":
            out[keys.kohya_module_name(comp, path)] = (mod, f"{comp}.{path}")
            continue
        found = keys.mmdit_name(path)
        if found is None:
            raise LoraError(f"transformer.{path} has no name in the original SD3 model, so kohya/ComfyUI cannot load "
                            "it; drop it from the targets or write the diffusers format")
        groups.setdefault(found[0], {})[found[1]] = (path, mod)
    for mmdit, members in groups.items():
        name = f"{keys.KOHYA_PREFIXES['transformer']}_{mmdit}"
        parts = keys.mmdit_parts(mmdit)
        if len(parts) == 1:
            mod = members[0][1]
            if keys.is_swapped(mmdit, tuple(mod.base_shape())):
                mod = fuse.swap_halves(mod, f"transformer.{parts[0]}")
            out[name] = (mod, f"transformer.{parts[0]}")
            continue
        mods = [members[i][1] if i in members else None for i in range(len(parts))]
        rows = next(int(m.base_shape()[0]) for m in mods if m is not None)
        held = ", ".join(f"transformer.{parts[i]}" for i in sorted(members))
        out[name] = (fuse.fuse(mods, [rows] * len(parts), f"{name} (from {held})"), held)
    return out


def count_file_keys(names, kohya: bool) -> int:
    """How many keys are SD3 keys in kohya/ComfyUI style (``kohya``) or in diffusers/PEFT style."""
    if not keys.detect_keys(names):
        return 0
    suffixes = _suffixes()
    parsed = [pk for pk in (parse_key(k, suffixes) for k in names) if pk is not None]
    return sum((pk.naming == "mmdit" or pk.key.startswith("lora_")) == kohya for pk in parsed)
