"""What the built-in formats share: reading any plain-LoRA safetensors file, save dtypes, and header metadata."""

from __future__ import annotations

from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.base import LoraFormat
from mindone_lora_plugin.state import LoraState

# header entries that describe one particular file and must not be copied into another
FILE_SPECIFIC_KEYS = frozenset({"format", "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash",
                                "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                                "modelspec.hash_sha256"})



def merged_metadata(state: LoraState, metadata: dict[str, str] | None) -> dict[str, str]:
    """The state's metadata overlaid with ``metadata``, as strings, without entries that describe another file."""
    out = {}
    for src in (state.metadata or {}, metadata or {}):
        for k, v in src.items():
            if k in FILE_SPECIFIC_KEYS:
                continue
            out[str(k)] = v if isinstance(v, str) else str(v)
    return out


def is_v_prediction(meta: dict[str, str]) -> bool:
    return (meta.get("ss_v_parameterization") == "True" or meta.get("modelspec.prediction_type") == "v"
            or meta.get("ss_base_model_version", "").endswith("_v"))


def names_for(state: LoraState, metadata: dict[str, str] | None, output_name: str) -> tuple[str, str]:
    """``(output name, title)`` for a file: an explicit ``output_name`` wins; with the default ``"lora"`` the names the
    LoRA already carries are kept. An explicit ``modelspec.title`` in ``metadata`` wins for the title."""
    old = state.metadata or {}
    if output_name == "lora":
        output_name = (metadata or {}).get("ss_output_name") or old.get("ss_output_name") or output_name
        title = old.get("modelspec.title") or output_name
    else:
        title = output_name
    return output_name, (metadata or {}).get("modelspec.title") or title


def modelspec(arch: str, meta: dict[str, str], title: str, implementation: str, v_pred: bool,
              state: LoraState | None = None) -> dict[str, str]:
    """The MUST keys of SAI ModelSpec 1.0.1 for a LoRA for the architecture ``arch`` (its
    :meth:`~mindone_lora_plugin.architectures.base.Architecture.modelspec`), keeping the date/resolution already in
    ``meta``."""
    from mindone_lora_plugin.architectures import get_architecture

    return get_architecture(arch).modelspec(state, meta, title, implementation, v_pred)


def read_plain_lora(path: str, base: BaseModelInfo | None = None):
    """Read any plain-LoRA safetensors file: ``(LoraState, ReadInfo)``. Refuses pickles and non-plain variants."""
    from mindone_lora_plugin import safetensors_io
    from mindone_lora_plugin.algorithms import installed_algorithms
    from mindone_lora_plugin.formats.plain import build_state
    from mindone_lora_plugin.formats.variants import refuse_variants

    header, _ = safetensors_io.read_header(path)
    metadata = dict(header.get("__metadata__") or {})
    keys = [k for k in header if k != "__metadata__"]
    refuse_variants(keys, metadata, path, set(installed_algorithms()))
    tensors, metadata = safetensors_io.load(path)
    from mindone_lora_plugin.algorithms.base import check_finite

    check_finite(tensors, path)
    from mindone_lora_plugin.architectures import installed_architectures

    families = installed_architectures()
    first = families.get(base.architecture) if base is not None else None
    # the base model's family first, then those the file's header names, then the rest
    named = [a for a in families.values() if a is not first and a.detect_metadata(metadata)]
    rest = [a for a in families.values() if a is not first and a not in named]
    for family in ([first] if first is not None else []) + named + rest:
        done = family.read_file(tensors, metadata, base, path)  # a family with its own key layout
        if done is not None:
            return done
    return build_state(tensors, metadata, base=base, path=path, where=path)


class PlainLoraFormat(LoraFormat):
    """A format whose files are one safetensors file of plain-LoRA-style keys, read by the common parser
    (:func:`read_plain_lora`): the reader checks such a file for pickles and unknown algorithms first and keeps what
    the parser learned (:class:`~mindone_lora_plugin.formats.plain.ReadInfo`)."""

    def read(self, path: str, base: BaseModelInfo | None = None) -> LoraState:
        state, _ = read_plain_lora(path, base)
        return state


def _names_every_module(arch, state: LoraState) -> bool:
    try:
        for comp, path, _ in state.modules():
            arch.kohya_name(comp, path, state.base_config)
    except (LoraError, ValueError, KeyError):
        return False
    return True


def writer_architecture(state: LoraState, what: str, required: bool = True) -> str | None:
    """The architecture a writer must know: the state's, else the only installed one that has all its components
    (SDXL for a LoRA with a second text encoder) and, among several, names all its modules. When it cannot be told:
    an error, or None unless ``required``."""
    from mindone_lora_plugin.architectures import find_architecture, installed_architectures

    comps = set(state.components)
    fits = {n: a for n, a in installed_architectures().items() if comps <= set(a.component_names())}
    arch = find_architecture(state.architecture)
    if arch is not None:
        missing = sorted(comps - set(arch.component_names()))
        if missing:
            owners = " / ".join(a.label for a in fits.values()) or "no installed architecture"
            raise LoraError(f"the LoRA has {missing[0]} weights but is marked {state.architecture}; only {owners} has "
                            f"a {missing[0]}")
        return arch.name
    if len(fits) > 1:  # several have the components: those whose key grammar names every module (FLUX's single blocks)
        fits = {n: a for n, a in fits.items() if _names_every_module(a, state)} or fits
    if len(fits) == 1:
        return next(iter(fits))
    if not required:
        return None
    labels = [a.label for a in (fits or installed_architectures()).values()]
    choices = ", ".join(labels[:-1]) + (" or " if len(labels) > 1 else "") + labels[-1] if labels else "any model"
    raise LoraError(f"cannot tell whether this LoRA is for {choices}, and {what} depends on it; pass "
                    "--base MODEL_DIR (the base model folder)")
