"""Key names of every plain-LoRA style, parsed into ``(component, diffusers module path, role)``, and resolved to
module paths (building a state from them: :mod:`.plain`; alphas from configs: :mod:`.alphas`).

Styles understood (see docs/formats.md):

* kohya: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; ``lora_te_``, ``lora_te1_``,
  ``lora_te2_``; UNet names in diffusers or (SDXL) SGM spelling; also SimpleTuner's ``lycoris_`` UNet prefix;
* PEFT: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.``, ``text_encoder_2.``), with or without the
  component prefix, or with PEFT's ``base_model.model.`` prefix;
* diffusers: ``<path>.lora.down.weight`` / ``.lora.up.weight``, ``<path>.lora_linear_layer.down.weight``, and the old
  attention-processor keys ``<block>.attn1.processor.to_q_lora.down.weight`` (``to_out_lora`` is ``to_out.0``; in a text
  encoder ``self_attn.to_q_lora`` is ``self_attn.q_proj``);
* ComfyUI: ``diffusion_model.<SGM path>.lora_down.weight`` (or ``.lora_A.weight``).

Which prefix means which component is each architecture's (``Architecture.key_prefixes``; the styles above are SD's
prefixes): a file is parsed with the prefixes of the family it belongs to. kohya names join the module path with
``_``, so they are resolved back to dotted paths either from the base model's module list (exact) or, without a base
model, with the family's grammar (``Architecture.resolve_name``; SD's:
:mod:`mindone_lora_plugin.architectures.sd.keys`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.errors import LoraError

DOWN, UP, ALPHA = "down", "up", "alpha"

# suffix → (role, style); checked in this order
_SUFFIXES = (
    (".lora_down.weight", DOWN, "kohya"),
    (".lora_up.weight", UP, "kohya"),
    (".lora_A.weight", DOWN, "peft"),
    (".lora_B.weight", UP, "peft"),
    (".lora_linear_layer.down.weight", DOWN, "lora_linear_layer"),
    (".lora_linear_layer.up.weight", UP, "lora_linear_layer"),
    (".lora.down.weight", DOWN, "diffusers"),
    (".lora.up.weight", UP, "diffusers"),
    ("_lora.down.weight", DOWN, "attn_processor"),
    ("_lora.up.weight", UP, "attn_processor"),
    (".lora_magnitude_vector.weight", "lora:magnitude", "peft"),  # DoRA, as peft's modules name it
    (".alpha", ALPHA, None),
)

# ----------------------------------------------------------------------------- un-flattening kohya names


@functools.lru_cache(maxsize=16384)  # a module's three keys (down, up, alpha) share one name
def unflatten(name: str, vocabulary: frozenset) -> str | None:
    """A kohya ``_``-joined module name back in dots with a family's module-name ``vocabulary`` (at each position the
    longest word of it, or a lone number), or None when a part is no word of it."""
    longest = max(w.count("_") + 1 for w in vocabulary)
    atoms = name.split("_")
    out, i = [], 0
    while i < len(atoms):
        for j in range(min(len(atoms), i + longest), i, -1):
            cand = "_".join(atoms[i:j])
            if cand in vocabulary or (j == i + 1 and cand.isdigit()):
                out.append(cand)
                i = j
                break
        else:
            return None
    return ".".join(out)


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedKey:
    """One tensor key: which component, the module name as spelled in the file, and the role of the tensor."""

    key: str
    component: str
    name: str  # dotted path (possibly SGM), or the kohya name after the prefix when ``flat``
    role: str  # "down", "up" or "alpha"
    flat: bool
    style: str  # kohya, peft, peft_model, peft_bare, diffusers, lora_linear_layer, attn_processor, comfy


@functools.lru_cache(maxsize=8)
def _suffix_table(names: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    """The tensor-name suffixes of the installed algorithms other than plain LoRA: ``(suffix, "algo:role", style)``."""
    from mindone_lora_plugin.algorithms import get_algorithm

    out = []
    for name in names:
        algo = get_algorithm(name)
        for table, style in ((algo.kohya_names, "kohya"), (algo.peft_names or {}, "peft")):
            for role, suffix in table.items():
                if name == "lora" and role in (DOWN, UP):
                    continue  # plain LoRA's own namings are the fixed table above
                out.append(("." + suffix, f"{name}:{role}", style))
    return tuple(sorted(out, key=lambda t: -len(t[0])))


def algorithm_suffixes() -> tuple[tuple[str, str, str], ...]:
    """The suffix table of the installed algorithms (see :func:`_suffix_table`)."""
    from mindone_lora_plugin.algorithms import installed_algorithms

    return _suffix_table(tuple(sorted(installed_algorithms())))


def split_role(role: str) -> tuple[str, str]:
    """``"loha:hada_w1_a"`` → ``("loha", "hada_w1_a")``; plain LoRA's ``down``/``up`` → ``("lora", role)``."""
    algo, sep, name = role.partition(":")
    return (algo, name) if sep else ("lora", role)


def key_prefixes(architectures=None):
    """The :class:`~mindone_lora_plugin.architectures.base.KeyPrefixes` of ``architectures`` (default: every installed
    one) together. A prefix two families give different components (``lora_unet_``: SD's ``unet``, FLUX's
    ``transformer``) parses as the component most of them give it (the first one's on a tie): what the format claims
    need, and the reader when it cannot tell the family; the reader parses a file with its family's own table
    (:func:`build_state`)."""
    from mindone_lora_plugin.architectures import installed_architectures

    archs = installed_architectures().values() if architectures is None else architectures
    return _joined(tuple(a.key_prefixes() for a in archs))


@functools.lru_cache(maxsize=32)
def _joined(tables: tuple):
    from mindone_lora_plugin.architectures.base import KeyPrefixes

    if len(tables) == 1:
        return tables[0]

    def join(kind):
        votes: dict[str, dict] = {}
        for table in tables:
            for prefix, comp in getattr(table, kind):
                counts = votes.setdefault(prefix, {})
                counts[comp] = counts.get(comp, 0) + 1
        return tuple((prefix, max(counts, key=counts.get)) for prefix, counts in votes.items())

    fallbacks = [t.fallback for t in tables if t.fallback]
    return KeyPrefixes(flat=join("flat"), dotted=join("dotted"), roots=join("roots"),
                       fallback=max(fallbacks, key=fallbacks.count) if fallbacks else None,
                       text_encoders=tuple(dict.fromkeys(c for t in tables for c in t.text_encoders)))


def parse_key(key: str, suffixes=None, prefixes=None) -> ParsedKey | None:
    """Parse one tensor key of an adapter file; None when it follows no known style.

    ``suffixes`` is the installed algorithms' table (:func:`algorithm_suffixes`, the default); ``prefixes`` the
    :class:`~mindone_lora_plugin.architectures.base.KeyPrefixes` to parse with (:func:`key_prefixes`, the default).
    """
    prefixes = key_prefixes() if prefixes is None else prefixes
    flat_prefixes = sorted(prefixes.flat, key=lambda t: -len(t[0]))
    dotted = sorted(prefixes.dotted, key=lambda t: -len(t[0]))
    for suffix, role, style in _SUFFIXES + (algorithm_suffixes() if suffixes is None else tuple(suffixes)):
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None
    if not stem:
        return None
    if style == "attn_processor":
        stem += "_lora"  # the suffix took it: "…to_q_lora.down.weight"
    for prefix, comp in flat_prefixes:
        if stem.startswith(prefix) and "." not in stem:
            name = stem[len(prefix):]
            return ParsedKey(key, comp, name, role, True, "kohya") if name else None
    comp = None
    for prefix, pcomp in dotted:
        if stem.startswith(prefix):
            rest = stem[len(prefix):]
            if pcomp is None:
                comp = _root_component(rest, prefixes.roots) or prefixes.fallback
                if comp is None:
                    return None
                style = style if style != "peft" else "peft_model"
            else:
                comp = pcomp
                if prefix.endswith("diffusion_model."):
                    style = "comfy"
            stem = rest
            break
    else:
        comp = _root_component(stem, prefixes.roots)
        if comp is None:
            return None
        if style == "peft":
            style = "peft_bare"
    if style is None:  # an alpha key: the style comes from the module's other keys
        style = "comfy" if key.startswith(("diffusion_model.", "model.diffusion_model.")) else "diffusers"
    name = _normalise_dotted(comp in prefixes.text_encoders, stem)
    if not name:
        return None
    return ParsedKey(key, comp, name, role, False, style)


def _root_component(path: str, roots) -> str | None:
    return next((comp for root, comp in roots if path.startswith(root)), None)


_PROC_RE = re.compile(r"(?:^|\.)(?:processor\.)?(to_q|to_k|to_v|to_out)_lora$")
_TE_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _normalise_dotted(text_encoder: bool, stem: str) -> str:
    """Old diffusers attention-processor names as module paths: ``to_q_lora`` is ``to_q`` in a denoiser's attention
    and ``q_proj`` in a (CLIP) text encoder's; ``to_out`` is ``to_out.0`` outside text encoders."""
    name = stem.replace(".processor.", ".")
    m = _PROC_RE.search(name)
    if m:
        head = name[: m.start()]
        which = m.group(1)
        if text_encoder:
            tail = _TE_PROC[which]
        else:
            tail = "to_out.0" if which == "to_out" else which
        name = f"{head}.{tail}" if head else tail
    if name.endswith(".to_out_0") or ".to_out_0." in name:
        name = name.replace(".to_out_0", ".to_out.0")
    if name.endswith(".to_out") and not text_encoder:
        name += ".0"
    return name


# ----------------------------------------------------------------------------- resolution


class NameResolver:
    """Resolves parsed names to module paths: from the base model's module list (plus the spellings its architecture
    knows for them, :meth:`~mindone_lora_plugin.architectures.base.Architecture.base_aliases`), or without a base
    model with the architecture's grammar (:meth:`~mindone_lora_plugin.architectures.base.Architecture.resolve_name`;
    every installed architecture's in turn when the architecture is unknown)."""

    def __init__(self, base: BaseModelInfo | None = None, base_config: dict | None = None,
                 architecture: str | None = None):
        from mindone_lora_plugin.architectures import find_architecture, installed_architectures

        self.base = base
        self.base_config = (base.base_config if base is not None else None) or base_config or {}
        arch = find_architecture(base.architecture if base is not None else architecture)
        self.grammars = [arch] if arch is not None else list(installed_architectures().values())
        self._flat: dict[str, dict[str, str]] = {}
        self._alias: dict[str, dict[str, str]] = {}
        if base is not None:
            for comp, mods in base.modules.items():
                table = {}
                for path in mods:
                    table.setdefault(path.replace(".", "_"), path)
                aliases = arch.base_aliases(comp, mods, self.base_config) if arch is not None else {}
                for spelling, path in aliases.items():
                    table.setdefault(spelling.replace(".", "_"), path)
                self._flat[comp] = table
                self._alias[comp] = aliases

    def resolve(self, component: str, name: str, flat: bool) -> str | None:
        if self.base is not None:
            mods = self.base.modules.get(component)
            if mods is None:
                return None
            if flat:
                return self._flat[component].get(name)
            if name in mods:
                return name
            return self._alias[component].get(name)
        for arch in self.grammars:
            if arch.has_component(component):
                path = arch.resolve_name(component, name, flat, self.base_config)
                if path is not None:
                    return path
        return None


def example_keys(keys, n=3) -> str:
    """The first ``n`` keys quoted, and how many more (for error lines)."""
    keys = list(keys)
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def parse_keys(keys, where: str) -> list[ParsedKey]:
    parsed, unknown = [], []
    suffixes, prefixes = algorithm_suffixes(), key_prefixes()
    for k in keys:
        pk = parse_key(k, suffixes, prefixes)
        (parsed if pk is not None else unknown).append(pk or k)
    if unknown:
        raise LoraError(f"{where}: {len(unknown)} key(s) are not plain-LoRA weights of a known naming (unknown prefix "
                        f"or suffix), e.g. {example_keys(unknown)}; expected kohya (lora_unet_/lora_te_ ... lora_down/"
                        "lora_up/alpha) or diffusers/PEFT (unet./text_encoder. ... lora_A/lora_B) keys")
    if not parsed:
        raise LoraError(f"{where} holds no LoRA weights (no tensors); it is not a LoRA file")
    return parsed
