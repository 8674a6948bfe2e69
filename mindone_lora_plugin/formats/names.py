"""Key names of every plain-LoRA style, parsed into ``(component, diffusers module path, role)``.

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
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from mindone_lora_plugin.basemodel import BaseModelInfo
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.dtypes import as_dtype
from mindone_lora_plugin.state import LoraModule, LoraState

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
                       fallback=max(fallbacks, key=fallbacks.count) if fallbacks else None)


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
    name = _normalise_dotted(comp, stem)
    if not name:
        return None
    return ParsedKey(key, comp, name, role, False, style)


def _root_component(path: str, roots) -> str | None:
    return next((comp for root, comp in roots if path.startswith(root)), None)


_PROC_RE = re.compile(r"(?:^|\.)(?:processor\.)?(to_q|to_k|to_v|to_out)_lora$")
_TE_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _normalise_dotted(component: str, stem: str) -> str:
    name = stem.replace(".processor.", ".")
    m = _PROC_RE.search(name)
    if m:
        head = name[: m.start()]
        which = m.group(1)
        if component == "unet":
            tail = "to_out.0" if which == "to_out" else which
        else:
            tail = _TE_PROC[which]
        name = f"{head}.{tail}" if head else tail
    if name.endswith(".to_out_0") or ".to_out_0." in name:
        name = name.replace(".to_out_0", ".to_out.0")
    if name.endswith(".to_out") and component == "unet":
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


# ----------------------------------------------------------------------------- alpha from configs


@dataclass
class AdapterConfig:
    """The part of a PEFT ``LoraConfig`` that decides each module's alpha."""

    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "AdapterConfig":
        try:
            return cls(r=int(d["r"]) if d.get("r") is not None else None,
                       lora_alpha=float(d["lora_alpha"]) if d.get("lora_alpha") is not None else None,
                       rank_pattern=dict(d.get("rank_pattern") or {}),
                       alpha_pattern={k: float(v) for k, v in (d.get("alpha_pattern") or {}).items()},
                       use_rslora=bool(d.get("use_rslora", False)))
        except (TypeError, ValueError, AttributeError):
            raise LoraError(f"{where} holds a malformed LoRA config (r/lora_alpha/alpha_pattern); the file is "
                            "corrupted or was written by an incompatible tool") from None

    def alpha_for(self, path: str, rank: int) -> float:
        """The alpha in this package's convention (scale = alpha / rank) that PEFT would apply to ``path``."""
        alpha = self.lora_alpha if self.lora_alpha is not None else float(self.r if self.r is not None else rank)
        key = pattern_key(self.alpha_pattern, path)
        if key is not None:
            alpha = float(self.alpha_pattern[key])
        if self.use_rslora:
            return alpha * math.sqrt(rank)
        return alpha


def pattern_key(patterns: dict, path: str):
    """The key of ``patterns`` PEFT matches for module ``path`` (``re.match(rf"(.*\\.)?({key})$")``, first wins)."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return key
        except re.error:
            if key == path or path.endswith("." + key):
                return key
    return None


def adapter_metadata(metadata: dict[str, str] | None, where: str) -> dict | None:
    """The JSON object in a diffusers ``lora_adapter_metadata`` header entry (None when absent)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError
    except ValueError:
        raise LoraError(f"{where} has a garbage 'lora_adapter_metadata' header entry (not a JSON object); the file "
                        "is corrupted") from None
    return data


def configs_from_metadata(metadata: dict[str, str], where: str) -> dict[str, AdapterConfig] | None:
    """Per-component configs from a diffusers ``lora_adapter_metadata`` header entry (None when absent)."""
    data = adapter_metadata(metadata, where)
    if data is None:
        return None
    per: dict[str, dict] = {}
    for k, v in data.items():
        for comp in _longest_first_components():
            if k.startswith(comp + "."):
                per.setdefault(comp, {})[k[len(comp) + 1:]] = v
                break
    return {comp: AdapterConfig.from_dict(d, f"{where} (lora_adapter_metadata, {comp})") for comp, d in per.items()}


def _longest_first_components() -> list[str]:
    from mindone_lora_plugin.architectures import known_components

    return sorted(known_components(), key=lambda c: (-len(c), c))


def adapter_config_next_to(path: str) -> AdapterConfig | None:
    """PEFT's ``adapter_config.json`` beside ``path`` (written by ``PeftModel.save_pretrained``), if any."""
    cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError
    except (OSError, ValueError):
        raise LoraError(f"cannot read {cfg}: not a JSON object; fix or remove it") from None
    return AdapterConfig.from_dict(data, cfg)


def alpha_value(x, key: str, where: str) -> float:
    """An alpha tensor (int or float; 0-dim or ``[1]``) as a float."""
    arr = np.asarray(x)
    if arr.size != 1:
        raise LoraError(f"{where}: alpha '{key}' has shape {list(arr.shape)}; an alpha is a single number, the file "
                        "is corrupted")
    value = float(arr.reshape(-1)[0].astype(np.float64)) if arr.dtype.kind in "fiub" else float(arr.reshape(-1)[0])
    if not math.isfinite(value):
        raise LoraError(f"{where}: alpha '{key}' is {value}; the file is corrupted")
    return value


# ----------------------------------------------------------------------------- state building


@dataclass
class ReadInfo:
    """What the parser learned about a file besides the weights."""

    styles: set = field(default_factory=set)
    sgm: bool = False
    alpha_source: str = ""  # "keys", "lora_adapter_metadata", "adapter_config.json", "rank", or mixed
    architecture_reason: str = ""  # why the architecture was guessed (empty when unknown or taken from the base)
    architecture_strong: bool = False


def _example(keys, n=3) -> str:
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
                        f"or suffix), e.g. {_example(unknown)}; expected kohya (lora_unet_/lora_te_ ... lora_down/"
                        "lora_up/alpha) or diffusers/PEFT (unet./text_encoder. ... lora_A/lora_B) keys")
    if not parsed:
        raise LoraError(f"{where} holds no LoRA weights (no tensors); it is not a LoRA file")
    return parsed


def family_parses(keys, architectures) -> dict[str, list[ParsedKey] | None]:
    """Architecture name → ``keys`` parsed with that family's own prefixes (its component names), or None when a key
    is not in its naming (families with one table share one parse)."""
    suffixes, done, out = algorithm_suffixes(), {}, {}
    for arch in architectures:
        table = arch.key_prefixes()
        if table not in done:
            parsed = [parse_key(k, suffixes, table) for k in keys]
            done[table] = None if any(pk is None for pk in parsed) else parsed
        out[arch.name] = done[table]
    return out


def family_evidence(parses: dict, architectures, tensors, metadata: dict[str, str]):
    """The strongest :class:`~mindone_lora_plugin.architectures.base.Evidence` any architecture finds in its own parse
    of a file (None: no clue)."""
    best = None
    for arch in architectures:
        own = parses.get(arch.name)
        if own is None:
            continue
        found = arch.detect_lora(own, tensors, metadata, arch.name_layout(own)[0])
        if found is not None and (best is None or found.score > best.score):
            best = found
    return best


def _layout(parsed, architectures) -> tuple[bool, dict]:
    """The first :meth:`~mindone_lora_plugin.architectures.base.Architecture.name_layout` that finds another
    spelling in ``parsed``."""
    return next((found for found in (a.name_layout(parsed) for a in architectures) if found[0]), (False, {}))


def build_state(tensors: dict, metadata: dict[str, str], base: BaseModelInfo | None = None,
                path: str = "", where: str | None = None) -> tuple[LoraState, ReadInfo]:
    """Turn the tensors of a plain-LoRA file into a :class:`LoraState` (rank and alpha per module, exact).

    With ``base`` every module must exist in the base model with fitting shapes, and a file for another architecture
    is refused. Raises :class:`LoraError` naming the offending keys.
    """
    from mindone_lora_plugin.architectures import installed_architectures
    from mindone_lora_plugin.formats.arch import check_architecture, guess_architecture

    where = where or path or "the LoRA file"
    parsed = parse_keys(tensors.keys(), where)  # every family's prefixes together: a key of no naming is refused
    info = ReadInfo(styles={p.style for p in parsed if p.role != ALPHA} or {p.style for p in parsed})
    archs = list(installed_architectures().values())
    parses = family_parses(list(tensors.keys()), archs)
    if any(parses.values()):  # each family judges the file in its own naming
        found = family_evidence(parses, archs, tensors, metadata)
        guess, strong, why = (found.architecture, found.strong, found.reason) if found else (None, False, "")
    else:  # no one family names every key (a mixed file): judged, and refused, in the joined naming
        guess, strong, why = guess_architecture(parsed, tensors, metadata, sgm_used=_layout(parsed, archs)[0])
    info.architecture_reason, info.architecture_strong = why, strong
    parsed = parses.get(base.architecture if base is not None else guess) or parsed
    info.sgm, layout_config = _layout(parsed, archs)

    groups: dict[tuple[str, str, bool], dict[str, ParsedKey]] = {}
    for pk in parsed:
        roles = groups.setdefault((pk.component, pk.name, pk.flat), {})
        if pk.role in roles:
            raise LoraError(f"{where}: keys '{roles[pk.role].key}' and '{pk.key}' hold the same LoRA tensor; the file "
                            "mixes two namings of one module")
        roles[pk.role] = pk

    if base is not None:
        check_architecture(guess, strong, why, base, where)
        for comp in sorted({c for c, _, _ in groups}):
            if comp not in base.modules:
                raise LoraError(
                    f"{where} has weights for {comp} but the base model ({base.architecture}) has no {comp}: the LoRA "
                    f"was made for another architecture; use a LoRA made for {base.architecture}")
    resolver = NameResolver(base, None if base is not None else layout_config, architecture=guess)

    configs = configs_from_metadata(metadata, where) or {}
    peft_cfg = None
    if not configs and info.styles & {"peft_model", "peft_bare"} and path:
        peft_cfg = adapter_config_next_to(path)

    state = LoraState(metadata=dict(metadata))
    unresolved, seen = [], {}
    alpha_sources = set()
    for (comp, name, flat), roles in groups.items():
        target = resolver.resolve(comp, name, flat)
        if target is None:
            unresolved.append(next(iter(roles.values())).key)
            continue
        if (comp, target) in seen:
            other = seen[(comp, target)]
            raise LoraError(f"{where}: keys '{other}' and '{next(iter(roles.values())).key}' name the same module "
                            f"{comp}.{target}; the file mixes two namings of one module")
        seen[(comp, target)] = next(iter(roles.values())).key
        mod = _module_from_roles(roles, tensors, comp, target, where)
        if ALPHA in roles:
            alpha = alpha_value(tensors[roles[ALPHA].key], roles[ALPHA].key, where)
            alpha_sources.add("keys")
        elif comp in configs:
            alpha = configs[comp].alpha_for(target, mod.rank)
            alpha_sources.add("lora_adapter_metadata")
        elif peft_cfg is not None:
            alpha = peft_cfg.alpha_for(target, mod.rank)
            alpha_sources.add("adapter_config.json")
        else:
            alpha = float(mod.rank)
            alpha_sources.add("rank")
        mod.alpha = alpha
        state.add(comp, target, mod)
    if unresolved:
        if base is not None:
            raise LoraError(f"{where}: {len(unresolved)} LoRA module(s) match no module of the {base.architecture} "
                            f"base model, e.g. {_example(unresolved)}; the LoRA was made for another model")
        raise LoraError(f"{where}: {len(unresolved)} LoRA module name(s) are not Stable Diffusion UNet/text-encoder "
                        f"modules, e.g. {_example(unresolved)}; pass --base MODEL_DIR if the model has other modules")
    info.alpha_source = "+".join(sorted(alpha_sources))
    if base is not None:
        base.fit_shapes(state)
        state.architecture = base.architecture
        state.base_config = dict(base.base_config)
    else:
        state.architecture = guess
        state.base_config = layout_config
    return state, info


def _module_from_roles(roles: dict, tensors: dict, comp: str, path: str, where: str) -> LoraModule:
    """The module one group of keys forms: its algorithm from the roles, its tensors, checked by the algorithm."""
    from mindone_lora_plugin.algorithms import get_algorithm

    named = {r: pk for r, pk in roles.items() if r != ALPHA}
    algos = {split_role(r)[0] for r in named}
    have = next(iter(roles.values())).key
    if not named:
        raise LoraError(f"{where}: module {comp}.{path} has '{have}' but no lora_down/lora_A weight; the file is "
                        "incomplete")
    if len(algos) > 1:
        raise LoraError(f"{where}: module {comp}.{path} mixes tensors of the {' and '.join(sorted(algos))} algorithms "
                        f"(e.g. '{have}'); the file is corrupted")
    name = algos.pop()
    algo = get_algorithm(name)
    if name == "lora" and (DOWN not in named or UP not in named):
        missing = "lora_down/lora_A" if DOWN not in named else "lora_up/lora_B"
        raise LoraError(f"{where}: module {comp}.{path} has '{have}' but no {missing} weight; the file is "
                        "incomplete")
    mod_tensors = {split_role(r)[1]: as_dtype(tensors[pk.key]) for r, pk in named.items()}
    mod = LoraModule(algorithm=name, tensors=mod_tensors, alpha=1.0)
    if not algo.claims(set(mod_tensors)):
        raise LoraError(f"{where}: module {comp}.{path} has the {name} tensors {sorted(mod_tensors)}, which are not a "
                        f"complete {name} module; the file is incomplete")
    algo.validate(mod, f"{where}: module {comp}.{path}")
    mod.settings = algo.settings_from_tensors(mod)
    return mod
