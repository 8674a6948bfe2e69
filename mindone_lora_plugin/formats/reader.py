"""Read any LoRA file into a :class:`~mindone_lora_plugin.state.LoraState`, picking its format by sniffing.

Only safetensors is read (pickles are refused before they are opened); a tensor holding NaN or Inf is refused with one
line naming it; modules of an algorithm no installed plugin provides are refused with an error naming the algorithm and
the plugin that reads it. The formats to choose from are passed in (the plugin manager's); without them the two built-in
formats are used. Every format says how strongly it claims a file (:meth:`~.base.LoraFormat.claim`, 0 = not mine); the
strongest claim wins whichever plugin offers the format, a tie is an error naming both, and ``format=`` chooses
explicitly. A format that only sniffs claims weakly, so the built-ins keep the plain-LoRA namings they read unless a
plugin claims a file more strongly. A folder is offered first to formats with a ``sniff_folder(path)`` method (formats
whose files are folders); otherwise the LoRA file inside it is read.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from mindone_lora_plugin import safetensors_io
from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.base import LoraFormat
from mindone_lora_plugin.state import LoraState


def builtin_formats() -> list[LoraFormat]:
    """The formats the built-in plugins offer (what the reader chooses among when given no formats)."""
    from mindone_lora_plugin.plugins import builtin_objects

    return list(builtin_objects("formats").values())


def _as_list(formats) -> list[LoraFormat]:
    if formats is None:
        return builtin_formats()
    if isinstance(formats, dict):
        formats = list(formats.values())
    return list(formats)


def get_format(name_or_format, formats=None) -> LoraFormat:
    """A format object by name (or the object itself)."""
    if isinstance(name_or_format, LoraFormat):
        return name_or_format
    found = {f.name: f for f in _as_list(formats)}
    if name_or_format not in found:
        raise LoraError(f"unknown LoRA format '{name_or_format}'; choose one of: {', '.join(sorted(found))}")
    return found[name_or_format]


def find_weights_file(path: str) -> str:
    """``path`` itself, or the LoRA weights file inside a folder (``pytorch_lora_weights.safetensors`` or the only
    ``.safetensors`` file)."""
    if not os.path.exists(path):
        raise LoraError(f"{path} does not exist")
    if not os.path.isdir(path):
        return path
    preferred = os.path.join(path, "pytorch_lora_weights.safetensors")
    if os.path.isfile(preferred):
        return preferred
    found = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(os.path.basename(f) for f in found[:4])
        raise LoraError(f"{path} holds several .safetensors files ({names}); pass the one to read")
    pickles = sorted(f for f in os.listdir(path) if f.lower().endswith(safetensors_io.PICKLE_SUFFIXES))
    if pickles:
        raise LoraError(f"{path} has no .safetensors LoRA weights, only pickle-based files ({', '.join(pickles[:3])}), "
                        "which are not read because they can run code; convert them to safetensors first")
    raise LoraError(f"{path} is a folder with no LoRA weights file (.safetensors); pass the LoRA file or its folder")


def format_claims(keys, metadata: dict[str, str], formats=None) -> list[tuple[int, LoraFormat]]:
    """``(claim, format)`` for every format claiming the file (``claim > 0``), strongest first."""
    out = []
    for fmt in _ordered(formats):
        strength = _claim(fmt, list(keys), dict(metadata))
        if strength > 0:
            out.append((strength, fmt))
    return sorted(out, key=lambda c: -c[0])


def detect_format(keys, metadata: dict[str, str], formats=None, where: str = "the LoRA file") -> LoraFormat | None:
    """The format with the strongest :meth:`~.base.LoraFormat.claim` on the file, whichever plugin offers it; None
    when no format claims it. Equal top claims raise one :class:`LoraError` line naming both formats."""
    claims = format_claims(keys, metadata, formats)
    if not claims:
        return None
    top = [fmt for strength, fmt in claims if strength == claims[0][0]]
    if len(top) > 1:
        names = " and ".join(f"'{f.name}'" for f in top)
        raise LoraError(f"{where}: the formats {names} claim it equally (strength {claims[0][0]}); pass the format "
                        f"to read it with (format=NAME), or uninstall one of the plugins")
    return top[0]


def _claim(fmt, keys, metadata) -> int:
    """``fmt.claim(...)`` as an int (a broken third-party claim counts as 0, never stops reading)."""
    try:
        return max(0, int(fmt.claim(keys, metadata)))
    except LoraError:
        raise
    except Exception:
        return 0


def _ordered(formats) -> list[LoraFormat]:
    """The plain-LoRA formats first (a folder is offered to the others after them)."""
    from mindone_lora_plugin.formats.common import PlainLoraFormat

    return sorted(_as_list(formats), key=lambda f: not isinstance(f, PlainLoraFormat))


def _safe(fn, *args) -> bool:
    try:
        return bool(fn(*args))
    except LoraError:
        raise
    except Exception:  # a broken third-party sniff must not stop reading
        return False


@dataclass
class LoraFile:
    """A LoRA file as read: where, which format, the weights, and (built-in formats) what the parser learned."""

    path: str
    format: LoraFormat
    state: LoraState
    info: object | None = None


def open_lora(path: str, base=None, format=None, formats=None) -> LoraFile:
    """Read ``path`` (a file, or a folder holding one) — see :func:`read_lora`; also returns the format used."""
    from mindone_lora_plugin.formats.common import PlainLoraFormat, read_plain_lora
    from mindone_lora_plugin.formats.variants import refuse_variants

    if isinstance(base, str):
        base = BaseModelInfo.from_folder(base)
    if format is not None and not isinstance(get_format(format, formats), PlainLoraFormat):
        fmt = get_format(format, formats)
        return LoraFile(path, fmt, _finite(fmt.read(path, base), path), None)
    if os.path.isdir(path):
        for fmt in _ordered(formats):
            sniff_folder = getattr(fmt, "sniff_folder", None)
            if sniff_folder is not None and _safe(sniff_folder, path):
                return LoraFile(path, fmt, _finite(fmt.read(path, base), path), None)
    safetensors_io.refuse_pickle(path)
    path = find_weights_file(path)
    try:
        header, _ = safetensors_io.read_header(path)
    except LoraError:
        _refuse_pickle_content(path)
        raise
    metadata = dict(header.get("__metadata__") or {})
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        raise LoraError(f"{path} holds no tensors; it is not a LoRA file")
    refuse_variants(keys, metadata, path, set(_algorithm_names()))
    if format is not None:
        fmt = get_format(format, formats)
    else:
        fmt = detect_format(keys, metadata, formats, where=path)
        if fmt is None:
            shown = ", ".join(f"'{k}'" for k in keys[:3])
            raise LoraError(f"{path}: no known LoRA format matches its keys (unknown prefixes), e.g. {shown}; "
                            "expected kohya (lora_unet_/lora_te_ ...) or diffusers/PEFT (unet./text_encoder. ...) "
                            "keys")
    if isinstance(fmt, PlainLoraFormat) and type(fmt).read is PlainLoraFormat.read:
        state, info = read_plain_lora(path, base)
        return LoraFile(path, fmt, state, info)
    state = _finite(fmt.read(path, base), path)
    return LoraFile(path, fmt, state, None)


def _finite(state: LoraState, path: str) -> LoraState:
    """``state``, after refusing NaN/Inf in any tensor (named ``component.module.tensor``) of a plugin format's read."""
    from mindone_lora_plugin.algorithms.base import check_finite

    check_finite({f"{c}.{p}.{r}": t for c, p, m in state.modules() for r, t in m.tensors.items()}, path)
    return state


def _algorithm_names():
    from mindone_lora_plugin.algorithms import installed_algorithms

    return installed_algorithms()


def _refuse_pickle_content(path: str) -> None:
    """Name a pickle or ``torch.save`` zip file even when it carries a ``.safetensors`` name."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return  # read_header reports it
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head == b"PK\x03\x04":
        raise LoraError(f"{path} is a pickle-based (PyTorch) file, not safetensors; it is not read because loading "
                        "pickles can run code; convert it to safetensors with a tool you trust first")


def read_lora(path: str, base: BaseModelInfo | str | None = None, format=None, formats=None) -> LoraState:
    """Read a LoRA file (or the weights file in a folder) into a :class:`LoraState` keyed by diffusers module paths.

    ``base`` (a :class:`BaseModelInfo` or a model folder) makes every key be checked against the real modules and
    shapes, and refuses a LoRA made for another architecture. ``format`` forces a format (name or object); otherwise
    it is sniffed among ``formats`` (format objects, or a name → format dict; default: the built-ins). Raises
    :class:`LoraError` with one clear line for anything wrong.
    """
    return open_lora(path, base, format, formats).state
