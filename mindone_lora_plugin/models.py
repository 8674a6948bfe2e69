"""The models a strategy works on: :class:`Models`, a named bundle of MindSpore cells.

A training entrypoint loads (or already has) a UNet and text encoders; it wraps them in :class:`Models` and passes
that to the operation hooks. Helpers here look at cells without knowing any strategy: which modules exist, their
weight shapes, and which of them carry LoRA adapters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

ADAPTER = "default"  # the PEFT adapter name the strategies train
LINEAR_CLASSES = ("Linear", "Dense")
CONV_CLASSES = ("Conv2d",)


class Models(Mapping):
    """Cells by their architecture's component names: ``Models(unet=cell, text_encoder=cell)`` for SD,
    ``Models(transformer=cell, ..., architecture="flux")`` (absent components, or None, are left out).

    ``architecture`` is an installed architecture's name (``sd1``, ``sd2``, ``sdxl`` ...), detected from the cells'
    configs when not given. ``base_config`` is what the architecture's file names depend on in the denoiser's config.
    """

    def __init__(self, *, architecture: str | None = None, **cells):
        self._cells = {k: v for k, v in cells.items() if v is not None}
        self.architecture = architecture or guess_architecture(self._cells)

    def __getitem__(self, key):
        return self._cells[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cells)

    def __len__(self) -> int:
        return len(self._cells)

    @property
    def base_config(self) -> dict:
        """:meth:`~mindone_lora_plugin.architectures.base.Architecture.base_config` of the denoiser's config."""
        from mindone_lora_plugin.architectures import find_architecture

        arch = find_architecture(self.architecture)
        if arch is None or arch.denoiser not in self._cells:
            return {}
        return arch.base_config(_config_dict(getattr(self._cells[arch.denoiser], "config", None)))

    def module_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Component → :func:`module_weight_shapes` of its cell."""
        return {comp: module_weight_shapes(cell) for comp, cell in self._cells.items()}

    def __repr__(self) -> str:
        return f"Models({self.architecture}: {', '.join(self._cells)})"


def guess_architecture(cells: dict) -> str | None:
    """The architecture of live models (``{component: cell}``), from their configs (as for a model folder)."""
    from mindone_lora_plugin.architectures import FolderInfo, detect_folder

    return detect_folder(FolderInfo({}, {comp: _config_dict(getattr(cell, "config", None))
                                         for comp, cell in cells.items()}))


def _config_dict(config) -> dict:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config) if isinstance(config, Mapping) else dict(vars(config))


def is_peft_lora_layer(cell) -> bool:
    """True for a mindone.peft LoRA layer (the built-in ``lora`` algorithm's layers)."""
    from mindone.peft.tuners.lora.layer import LoraLayer

    return isinstance(cell, LoraLayer)


def is_lora_layer(cell) -> bool:
    """True for an adapter layer of any algorithm (mindone.peft LoRA, or an ``AdapterLayer``)."""
    from mindone_lora_plugin.algorithms.layers import is_adapter_layer

    return is_peft_lora_layer(cell) or is_adapter_layer(cell)


def base_layer_of(cell):
    """The wrapped layer of a LoRA layer (or the cell itself)."""
    return cell.get_base_layer() if hasattr(cell, "get_base_layer") else cell


def lora_layers(cell) -> Iterator[tuple[str, object]]:
    """Yield ``(module path, adapter layer)`` for every adapted module of ``cell`` (any algorithm)."""
    for name, sub in cell.cells_and_names():
        if is_lora_layer(sub):
            yield name, sub


def is_linear(cell) -> bool:
    return type(cell).__name__ in LINEAR_CLASSES


def is_conv(cell) -> bool:
    return type(cell).__name__ in CONV_CLASSES


def module_weight_shapes(cell) -> dict[str, tuple[int, ...]]:
    """Module path → weight shape for every module of ``cell`` with a 2-D/4-D weight, seen through LoRA wrappers."""
    out: dict[str, tuple[int, ...]] = {}
    skip_prefixes: list[str] = []
    for name, sub in cell.cells_and_names():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if is_lora_layer(sub):
            skip_prefixes.append(name + ".")
            sub = base_layer_of(sub)
        weight = getattr(sub, "weight", None)
        shape = getattr(weight, "shape", None)
        if shape is not None and len(shape) in (2, 4) and name:
            out[name] = tuple(int(s) for s in shape)
    return out


def load_models(folder: str, components=None, dtype=None, variant: str | None = None) -> Models:
    """Load the components (default: all the folder has) of a diffusers-layout model folder (or a single-file
    checkpoint: :func:`~mindone_lora_plugin.model_files.resolve_model`) with mindone's
    ``from_pretrained``, as its architecture says
    (:meth:`~mindone_lora_plugin.architectures.base.Architecture.load_component`)."""
    from mindone_lora_plugin.architectures import get_architecture
    from mindone_lora_plugin.base_model_info import BaseModelInfo
    from mindone_lora_plugin.runtime.process import quiet_mindone_imports

    info = BaseModelInfo.from_folder(folder)  # checks the layout, one clear error if it is not a model folder
    arch = get_architecture(info.architecture)
    quiet_mindone_imports()
    cells = {}
    for comp in arch.components:
        if (components is None or comp.name in components) and comp.name in info.modules:
            cells[comp.name] = arch.load_component(info.source, comp.name, dtype=dtype, variant=variant)
    return Models(**cells, architecture=info.architecture)
