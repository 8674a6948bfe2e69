"""FLUX.1 LoRA files: any naming of :mod:`.keys` read into a :class:`~mindone_lora_plugin.state.LoraState`, and the
kohya (original-model, fused) layout written from one.

The state is always keyed by diffusers paths of ``transformer`` / ``text_encoder`` (CLIP) / ``text_encoder_2`` (T5),
one module per diffusers Linear, with ``architecture == "flux"``. Reading a fused module (kohya ``img_attn_qkv``,
``linear1``; XLabs ``qkv_lora``) splits it exactly (:func:`.fuse.split`); writing the kohya layout fuses the parts
back (:func:`.fuse.fuse`). The diffusers layout needs nothing special: it is the generic ``<component>.<path>.lora_A``
layout with ``lora_adapter_metadata`` (``transformer.r`` ...), which ``FluxPipeline.load_lora_weights`` reads.

Refused with one line each: keys of no known naming (nothing is dropped silently); FLUX variants whose LoRAs carry
more than LoRA pairs or adapt a different model (FLUX.1 Fill: a 384-channel ``x_embedder``/``img_in``; FLUX.1 Canny/
Depth "control" LoRAs: a 128-channel one, plus norm weights; FLUX.1 Redux: ``redux_up``/``redux_down``); a FLUX file
for a Stable Diffusion base model and the reverse. FLUX.1 Kontext has no modules of its own: its LoRAs are plain
FLUX LoRAs and are read as such.

The formats and the reader reach this module through the FLUX architecture's file hooks
(:class:`FluxKeyGrammar`, mixed into the :class:`~mindone_lora_plugin.architectures.base.Architecture`).
"""

from __future__ import annotations

import datetime
import re

import numpy as np

from mindone_lora_plugin.architectures.flux import fuse, keys
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.state import LoraModule, LoraState

ARCHITECTURE = "flux"
LABEL = "FLUX.1"
MODELSPEC = {"dev": "flux-1-dev/lora", "schnell": "flux-1-schnell/lora"}
KOHYA_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"  # the code base whose names kohya files use
NETWORK_MODULE = "networks.lora_flux"  # sd-scripts' FLUX network module
DEFAULT_RESOLUTION = "1024x1024"
MLP_RATIO = 4  # FluxSingleTransformerBlock's proj_mlp is 4 × hidden wide

_VARIANT_KEYS = (
    (re.compile(r"(?:query_norm|key_norm)\.scale$|\.norm_(?:added_)?[qk]\.weight$"),
     "a FLUX.1 Canny/Depth control LoRA (it also replaces the attention norm weights)"),
    (re.compile(r"(?:^|[._])redux_(?:up|down)(?:[._]|$)"), "a FLUX.1 Redux image-encoder LoRA"),
)
_EMBEDDER_WIDTHS = {384: "a FLUX.1 Fill LoRA (its x_embedder/img_in takes 384 channels)",
                    128: "a FLUX.1 Canny/Depth control LoRA (its x_embedder/img_in takes 128 channels)"}


def _example(items, n=3) -> str:
    items = list(items)
    shown = ", ".join(f"'{k}'" for k in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def suffixes():
    """``(suffix, "algo:role")`` of the installed algorithms other than plain LoRA (LoHa, LoKr, DoRA ...)."""
    from mindone_lora_plugin.formats.names import algorithm_suffixes

    return tuple((suffix, role) for suffix, role, _ in algorithm_suffixes())


def parse_keys(names, where: str) -> list[keys.FluxKey]:
    """Every key parsed, or one :class:`LoraError` line naming the keys of no FLUX naming."""
    extra = suffixes()
    parsed, unknown = [], []
    for k in names:
        pk = keys.parse_key(k, extra)
        (parsed if pk is not None else unknown).append(pk or k)
    if unknown:
        raise LoraError(f"{where}: {len(unknown)} key(s) are not FLUX LoRA weights of a known naming, e.g. "
                        f"{_example(unknown)}; expected kohya (lora_unet_double_blocks_0_img_attn_qkv ...), ComfyUI "
                        "(diffusion_model.double_blocks.0 ...) or diffusers (transformer.transformer_blocks.0 ...) "
                        "keys")
    if not parsed:
        raise LoraError(f"{where} holds no LoRA weights (no tensors); it is not a LoRA file")
    return parsed


def refuse_variants(names, shapes: dict, base, where: str) -> None:
    """One line for a FLUX variant this package cannot represent (Fill, Canny/Depth control, Redux)."""
    for k in names:
        for regex, what in _VARIANT_KEYS:
            if regex.search(k):
                raise LoraError(f"{where} is {what} (key '{k}'); only plain FLUX.1 dev/schnell LoRAs are supported: "
                                "use a LoRA made for FLUX.1 dev or schnell")
    base_in = None
    if base is not None:
        shape = base.modules.get("transformer", {}).get("x_embedder")
        base_in = int(shape[1]) if shape else None
    for k in names:
        if re.search(r"(?:^|[._])(?:img_in|x_embedder)\.(?:lora_down|lora_A|down)\.weight$", k):
            width = int(shapes[k][1]) if len(shapes[k]) > 1 else None
            if width in _EMBEDDER_WIDTHS and width != base_in:
                raise LoraError(f"{where} is {_EMBEDDER_WIDTHS[width]} (key '{k}'); only plain FLUX.1 dev/schnell "
                                "LoRAs are supported: use a LoRA made for FLUX.1 dev or schnell")


def _configs(metadata: dict[str, str], where: str) -> dict:
    """Per-component PEFT configs from a ``lora_adapter_metadata`` header entry (``transformer.r`` ...)."""
    from mindone_lora_plugin.formats.alphas import AdapterConfig, adapter_metadata

    data = adapter_metadata(metadata, where)
    if data is None:
        return {}
    per: dict[str, dict] = {}
    for k, v in data.items():
        comp, sep, field = k.partition(".")
        if sep and comp in keys.COMPONENTS:
            per.setdefault(comp, {})[field] = v
    return {c: AdapterConfig.from_dict(d, f"{where} (lora_adapter_metadata, {c})") for c, d in per.items()}


def part_sizes(parts, mod: LoraModule, base, where: str = "a fused module") -> list[int]:
    """Output rows of each part of a fused module: the base model's, else from the input width (q/k/v: the hidden
    width; proj_mlp: the rest)."""
    shapes = base.modules.get("transformer", {}) if base is not None else {}
    if all(p in shapes for p in parts):
        return [int(shapes[p][0]) for p in parts]
    hidden = int(mod.base_shape()[1])
    rows = int(mod.base_shape()[0])
    sizes = [hidden if not p.endswith("proj_mlp") else rows - hidden * (len(parts) - 1) for p in parts]
    if sum(sizes) != rows or min(sizes) <= 0:
        raise LoraError(f"{where} (parts {', '.join(parts)}) has {rows} output rows, which do not split into parts of "
                        f"{hidden} rows; pass --base MODEL_DIR (the FLUX model folder)")
    return sizes


def build_state(tensors: dict, metadata: dict[str, str], base=None, where: str = "the LoRA file"):
    """``(LoraState, ReadInfo)`` of a FLUX LoRA file's tensors, every fused module split exactly.

    With ``base`` (a FLUX :class:`~mindone_lora_plugin.base_model_info.BaseModelInfo`) every module must exist with
    fitting
    shapes. Raises :class:`LoraError` (one line) for anything wrong."""
    from mindone_lora_plugin.formats.alphas import alpha_value
    from mindone_lora_plugin.formats.plain import ReadInfo, _module_from_roles

    names = list(tensors)
    refuse_variants(names, {k: tuple(np.shape(v)) for k, v in tensors.items()}, base, where)
    parsed = parse_keys(names, where)
    groups: dict[tuple, dict] = {}
    for pk in parsed:
        roles = groups.setdefault(pk.module, {})
        if pk.role in roles:
            raise LoraError(f"{where}: keys '{roles[pk.role].key}' and '{pk.key}' hold the same LoRA tensor; the file "
                            "mixes two namings of one module")
        roles[pk.role] = pk
    configs = _configs(metadata, where)
    state = LoraState(architecture=ARCHITECTURE, metadata=dict(metadata or {}))
    owner: dict[tuple[str, str], str] = {}
    sources, namings = set(), set()
    for (comp, naming, name), roles in groups.items():
        first = next(iter(roles.values())).key
        shown = first.split(".")[0] if first.startswith("lora_") else name  # the module as the file names it
        namings.add(naming)
        parts = (name,) if naming == "diffusers" else keys.bfl_parts(name)
        label = parts[0] if len(parts) == 1 else name
        mod = _module_from_roles(roles, tensors, comp, label, where)
        if keys.ALPHA in roles:
            mod.alpha = alpha_value(tensors[roles[keys.ALPHA].key], roles[keys.ALPHA].key, where)
            sources.add("keys")
        elif comp in configs and len(parts) == 1:
            mod.alpha = configs[comp].alpha_for(parts[0], mod.rank)
            sources.add("lora_adapter_metadata")
        else:
            mod.alpha = float(mod.rank)
            sources.add("rank")
        if len(parts) == 1:
            if naming != "diffusers" and keys.is_swapped(name):
                mod = fuse.swap_halves(mod, f"{where}: module '{shown}'")
            pieces = [(parts[0], mod)]
        else:
            where_mod = f"{where}: fused module '{shown}'"
            pieces = list(zip(parts, fuse.split(mod, part_sizes(parts, mod, base, where_mod), where_mod)))
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
    info = ReadInfo(styles={f"flux-{n}" for n in namings}, alpha_source="+".join(sorted(sources)),
                    architecture_reason=keys.detect(names, metadata) or "the base model is FLUX.1",
                    architecture_strong=True)
    return state, info


# ----------------------------------------------------------------------------- writing the kohya layout


def kohya_modules(state: LoraState) -> dict[str, tuple[LoraModule, str]]:
    """``{kohya name: (module, what it holds)}`` of ``state``: q/k/v (and proj_mlp) fused into the original model's
    ``qkv``/``linear1`` (:func:`.fuse.fuse`), ``norm_out.linear`` reordered to ``final_layer.adaLN_modulation.1``."""
    out: dict[str, tuple[LoraModule, str]] = {}
    groups: dict[str, dict[int, tuple[str, LoraModule]]] = {}
    parts_of: dict[str, tuple[str, ...]] = {}
    for comp, path, mod in state.modules():
        if comp not in keys.COMPONENTS:
            raise LoraError(f"the LoRA has weights for {comp}, which FLUX.1 has not (its components: "
                            f"{', '.join(keys.COMPONENTS)}); it was made for another architecture")
        if comp != "transformer":
            out[keys.kohya_module_name(comp, path)] = (mod, f"{comp}.{path}")
            continue
        found = keys.bfl_name(path)
        if found is None:
            raise LoraError(f"transformer.{path} has no name in the original FLUX.1 model, so kohya/ComfyUI cannot "
                            "load it; drop it from the targets or write the diffusers format")
        bfl, index, parts = found
        groups.setdefault(bfl, {})[index] = (path, mod)
        parts_of[bfl] = parts
    for bfl, members in groups.items():
        name = f"{keys.KOHYA_PREFIXES['transformer']}_{bfl}"
        parts = parts_of[bfl]
        if len(parts) == 1:
            mod = members[0][1]
            if keys.is_swapped(bfl):
                mod = fuse.swap_halves(mod, f"transformer.{parts[0]}")
            out[name] = (mod, f"transformer.{parts[0]}")
            continue
        mods = [members[i][1] if i in members else None for i in range(len(parts))]
        sizes = _write_sizes(parts, mods)
        held = ", ".join(f"transformer.{parts[i]}" for i in sorted(members))
        out[name] = (fuse.fuse(mods, sizes, f"{name} (from {held})"), held)
    return out


def _write_sizes(parts, mods) -> list[int]:
    hidden = next(int(m.base_shape()[1]) for m in mods if m is not None)
    sizes = []
    for p, m in zip(parts, mods):
        if m is not None:
            sizes.append(int(m.base_shape()[0]))
        else:
            sizes.append(hidden * MLP_RATIO if p.endswith("proj_mlp") else hidden)
    return sizes


def variant(state: LoraState, metadata: dict[str, str] | None = None) -> str:
    """``dev`` or ``schnell``: what the LoRA's own header (or the given metadata) says; dev by default."""
    return keys.variant_from_metadata({**(state.metadata or {}), **(metadata or {})})


def modelspec(meta: dict[str, str], title: str, implementation: str, flux_variant: str = "dev") -> dict[str, str]:
    """The SAI ModelSpec 1.0.1 keys sd-scripts writes for a FLUX.1 LoRA of ``flux_variant`` (dev/schnell)."""
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC[flux_variant],
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": meta.get("modelspec.resolution") or DEFAULT_RESOLUTION,
        "modelspec.date": meta.get("modelspec.date") or datetime.datetime.now().replace(microsecond=0).isoformat(),
    }


# ----------------------------------------------------------------------------- architecture pairing


def refuse_mismatch(is_flux: str, base, where: str, sd_guess: str = "") -> None:
    """A FLUX LoRA for a Stable Diffusion base model, or the reverse: one line naming both architectures."""
    from mindone_lora_plugin.architectures import label

    if base is None:
        return
    base_flux = base.architecture == ARCHITECTURE
    src = f" {base.source}" if base.source else ""
    if is_flux and not base_flux:
        raise LoraError(f"{where} is a LoRA for {LABEL} ({is_flux}) but the base model{src} is "
                        f"{label(base.architecture)}; use a LoRA made for {label(base.architecture)} or a FLUX.1 model")
    if base_flux and not is_flux:
        made = label(sd_guess) if sd_guess else "Stable Diffusion"
        raise LoraError(f"{where} is a LoRA for {made} (its keys are Stable Diffusion UNet/text-encoder names) but the "
                        f"base model{src} is {LABEL}; use a LoRA made for FLUX.1 or a {made} model")


# ----------------------------------------------------------------------------- the architecture's file hooks


def read_file(tensors: dict, metadata: dict[str, str], base, where: str):
    """``(LoraState, ReadInfo)`` when the file or the base model is FLUX.1, else None (an SD file for an SD base);
    a FLUX file for an SD base model and the reverse are refused in one line naming both."""
    why = keys.detect(tensors.keys(), metadata)
    base_flux = base is not None and base.architecture == ARCHITECTURE
    if not why and not base_flux:
        return None
    sd_guess = ""
    if not why:  # a FLUX base model: text-encoder-only LoRAs have no FLUX-only names, but their names still fit
        try:
            parse_keys(list(tensors), where)
            why = "its keys fit FLUX.1's modules"
        except LoraError:
            pass
    if not why:
        from mindone_lora_plugin.formats.arch import guess_architecture
        from mindone_lora_plugin.formats.names import parse_key

        parsed = [pk for pk in map(parse_key, tensors) if pk is not None]
        sd_guess = (guess_architecture(parsed, tensors, metadata)[0] or "") if parsed else ""
    refuse_mismatch(why, base, where, sd_guess)
    return build_state(tensors, metadata, base, where)


def count_file_keys(names, kohya: bool) -> int:
    """How many keys are FLUX keys in kohya/ComfyUI/XLabs style (``kohya``: original-model names or ``lora_…`` flat
    names) or else in diffusers/PEFT style (dotted diffusers paths)."""
    extra = suffixes()
    parsed = [pk for pk in (keys.parse_key(k, extra) for k in names) if pk is not None]
    return sum((pk.naming != "diffusers" or pk.key.startswith("lora_")) == kohya for pk in parsed)


# ----------------------------------------------------------------------------- the architecture's key-grammar methods


class FluxKeyGrammar:
    """The LoRA-file side of the FLUX.1 :class:`~mindone_lora_plugin.architectures.base.Architecture` (mix it in:
    ``class Flux(FluxKeyGrammar, Architecture)``): detection and the per-name questions the generic code asks, and the
    file hooks the kohya/diffusers formats and the reader call — whole files, fused modules included, are read and
    written by the functions above (:meth:`read_file`, :meth:`kohya_modules`, :meth:`count_file_keys`,
    :meth:`modelspec`)."""

    kohya_network_module = NETWORK_MODULE
    kohya_implementation = KOHYA_IMPLEMENTATION

    def read_file(self, tensors, metadata, base, where):
        return read_file(tensors, metadata, base, where)

    def kohya_modules(self, state):
        return kohya_modules(state)

    def count_file_keys(self, names, kohya):
        return count_file_keys(names, kohya)

    def modelspec(self, state, meta, title, implementation, v_prediction):
        return modelspec(meta, title, implementation, variant(state) if state is not None else "dev")

    def detect_lora(self, parsed, tensors, metadata, sgm_used=False):
        from mindone_lora_plugin.architectures.base import METADATA, STRUCTURE, Evidence

        why = keys.detect_keys(getattr(pk, "key", pk) for pk in parsed)
        if why:  # names only FLUX has outweigh SD's "a second text encoder" (FLUX's T5 is one too)
            return Evidence("flux", STRUCTURE + 1, why)
        why = keys.detect_metadata(metadata or {})
        return Evidence("flux", METADATA, why) if why else None

    def detect_metadata(self, metadata) -> str:
        return keys.detect_metadata(metadata or {})

    def kohya_name(self, component: str, path: str, base_config=None) -> str:
        """The kohya name of the file module holding ``component.path`` (q/k/v share their fused module's name)."""
        from mindone_lora_plugin.errors import LoraError

        try:
            return keys.kohya_module_name(component, path)
        except (ValueError, KeyError):
            raise LoraError(f"{component}.{path} has no kohya name in FLUX.1's layout") from None

    def resolve_name(self, component: str, name: str, flat: bool, base_config=None) -> str | None:
        """The one module path a name means (None for a fused or reordered module: :func:`bfl_parts` lists a fused
        module's parts, :mod:`.files` splits it)."""
        if component not in keys.PATH_RES:
            return None
        if component == "transformer":
            found = keys._transformer_name(name)
            if found is None:
                return None
            if found[0] != "diffusers" and keys.is_swapped(found[1]):
                return None  # its rows are reordered: only the file reader (files.build_state) maps it
            parts = (found[1],) if found[0] == "diffusers" else keys.bfl_parts(found[1])
            return parts[0] if parts and len(parts) == 1 else None
        return keys._encoder_name(component, name)


class FluxLoraFiles(FluxKeyGrammar):
    """:class:`FluxKeyGrammar` with the FLUX.1 family's name and sd-scripts' metadata values: enough of an
    architecture for the file side alone (the format tests' stand-in when no FLUX family is installed)."""

    name = ARCHITECTURE
    label = LABEL
    kohya_base_model_version = keys.KOHYA_BASE_MODEL_VERSION
    kohya_version_family = keys.KOHYA_BASE_MODEL_VERSION
    modelspec_architecture = MODELSPEC["dev"]
    modelspec_prefix = keys.MODELSPEC_FAMILY
    default_resolution = 1024
