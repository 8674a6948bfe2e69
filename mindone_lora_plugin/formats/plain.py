"""Building a :class:`~mindone_lora_plugin.state.LoraState` from the tensors of a plain-LoRA file: keys parsed in
the file's family's naming (:mod:`.names`), the family judged, names resolved to module paths, each module's
algorithm, rank and alpha (:mod:`.alphas`), and, with a base model, every module checked against it."""

from __future__ import annotations

from dataclasses import dataclass, field

from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.dtypes import as_dtype
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.alphas import adapter_config_next_to, alpha_value, configs_from_metadata
from mindone_lora_plugin.formats.names import (
    ALPHA,
    DOWN,
    UP,
    NameResolver,
    ParsedKey,
    algorithm_suffixes,
    example_keys,
    parse_key,
    parse_keys,
    split_role,
)
from mindone_lora_plugin.state import LoraModule, LoraState


@dataclass
class ReadInfo:
    """What the parser learned about a file besides the weights."""

    styles: set = field(default_factory=set)
    sgm: bool = False
    alpha_source: str = ""  # "keys", "lora_adapter_metadata", "adapter_config.json", "rank", or mixed
    architecture_reason: str = ""  # why the architecture was guessed (empty when unknown or taken from the base)
    architecture_strong: bool = False


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
                            f"base model, e.g. {example_keys(unresolved)}; the LoRA was made for another model")
        raise LoraError(f"{where}: {len(unresolved)} LoRA module name(s) are not Stable Diffusion UNet/text-encoder "
                        f"modules, e.g. {example_keys(unresolved)}; "
                        f"pass --base MODEL_DIR if the model has other modules")
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
