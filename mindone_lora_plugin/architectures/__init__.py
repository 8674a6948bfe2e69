"""Model families (architectures): the :class:`~.base.Architecture` plugin object and the detectors that ask every
installed one. SD1.x, SD2.x and SDXL (:mod:`.sd`) and FLUX.1 (:mod:`.flux`) are built in, each family a plugin of its
own registering through the ``mindone_lora_architectures`` hook like any third-party family.
"""

from __future__ import annotations

from mindone_lora_plugin.architectures.base import Architecture, Component, Evidence, FolderInfo, TargetRule

__all__ = ["Architecture", "Component", "Evidence", "FolderInfo", "TargetRule", "get_architecture",
           "installed_architectures", "detect_folder", "detect_lora", "component_of", "label", "known_components",
           "text_encoders"]


def installed_architectures() -> dict:
    """Name → architecture object for every installed architecture (through the process-wide plugin manager)."""
    from mindone_lora_plugin.plugins import get_plugin_manager

    return get_plugin_manager().architectures()


def get_architecture(name: str) -> Architecture:
    """The installed architecture called ``name``; an unknown name is a :class:`PluginError` listing the valid ones."""
    from mindone_lora_plugin.plugins import get_plugin_manager

    return get_plugin_manager().get_architecture(name)


def find_architecture(name: str | None) -> Architecture | None:
    """Like :func:`get_architecture`, but None for None or a name no installed plugin offers."""
    return installed_architectures().get(name) if name else None


def label(name: str | None) -> str:
    """``SDXL`` for ``sdxl``; ``an unknown architecture`` for None or an architecture not installed."""
    arch = find_architecture(name)
    return arch.label if arch is not None else "an unknown architecture"


def detect_folder(folder: FolderInfo) -> str | None:
    """The architecture whose :meth:`~.base.Architecture.detect_folder` scores highest (None when none claims it;
    a tie goes to the first by name)."""
    best, best_score = None, 0
    for name, arch in installed_architectures().items():
        score = int(arch.detect_folder(folder) or 0)
        if score > best_score:
            best, best_score = name, score
    return best


def detect_lora(parsed, tensors, metadata: dict[str, str], sgm_used: bool = False) -> Evidence | None:
    """The strongest :class:`~.base.Evidence` any installed architecture finds in a LoRA file (None: no clue)."""
    best = None
    for arch in installed_architectures().values():
        found = arch.detect_lora(parsed, tensors, metadata, sgm_used)
        if found is not None and (best is None or found.score > best.score):
            best = found
    return best


def component_of(cell) -> str | None:
    """The component a live cell is (``unet``, ``text_encoder``, ``transformer`` ...) by its class, asking every
    installed architecture (the longest matching class name wins), or None."""
    best = None
    for arch in installed_architectures().values():
        found = arch.component_of(cell)
        if found is not None and (best is None or found[0] > best[0]):
            best = found
    return best[1] if best else None


def text_encoders(architecture: str | None = None) -> tuple[str, ...]:
    """The components of ``architecture`` that are text encoders (by their kind: what ``--train_text_encoder`` and
    ``--text_encoder_lr`` concern), or of every installed architecture when it is None or not installed."""
    arch = find_architecture(architecture)
    archs = [arch] if arch is not None else installed_architectures().values()
    return tuple(dict.fromkeys(c.name for a in archs for c in a.components if c.is_text_encoder))


def known_components() -> tuple[str, ...]:
    """Every component name of every installed architecture, the denoisers first, then in the architectures'
    declared order (duplicates once): an SD state lists unet before its text encoders whatever other families are
    installed."""
    archs = list(installed_architectures().values())
    seen: dict[str, None] = dict.fromkeys(a.denoiser for a in archs if a.has_component(a.denoiser))
    for arch in archs:
        seen.update(dict.fromkeys(arch.component_names()))
    return tuple(seen)
