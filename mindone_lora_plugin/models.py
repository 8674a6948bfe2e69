"""The models a strategy works on: :class:`Models`, a named bundle of MindSpore cells.

A training entrypoint loads (or already has) a UNet and text encoders; it wraps them in :class:`Models` and passes
that to the operation hooks. Helpers here look at cells without knowing any strategy: which modules exist, their
weight shapes, and which of them carry LoRA adapters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

ADAPTER = "default"  # the PEFT adapter name the strategies train


class Models(Mapping):
    """``{"unet": cell, "text_encoder": cell, "text_encoder_2": cell}`` (absent components are left out).

    ``architecture`` is ``sd1``, ``sd2`` or ``sdxl``. ``unet_layers_per_block`` comes from the UNet's config.
    """

    def __init__(self, unet=None, text_encoder=None, text_encoder_2=None, *, architecture: str | None = None):
        self._cells = {k: v for k, v in (("unet", unet), ("text_encoder", text_encoder),
                                          ("text_encoder_2", text_encoder_2)) if v is not None}
        self.architecture = architecture or guess_architecture(self._cells)

    def __getitem__(self, key):
        return self._cells[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cells)

    def __len__(self) -> int:
        return len(self._cells)

    @property
    def unet_layers_per_block(self) -> int | None:
        unet = self._cells.get("unet")
        config = getattr(unet, "config", None)
        return getattr(config, "layers_per_block", None) if config is not None else None

    def __repr__(self) -> str:
        return f"Models({self.architecture}: {', '.join(self._cells)})"


def guess_architecture(cells: dict) -> str:
    """The architecture of live models (``{component: cell}``), from their configs."""
    from mindone_lora_plugin.formats.arch import from_configs

    return from_configs(getattr(cells.get("unet"), "config", None), getattr(cells.get("text_encoder"), "config", None),
                        has_text_encoder_2="text_encoder_2" in cells)


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


def load_models(folder: str, components=("unet", "text_encoder", "text_encoder_2"), dtype=None,
                variant: str | None = None) -> Models:
    """Load the UNet and text encoders of a diffusers-layout model folder with mindone's ``from_pretrained``."""
    import os

    from mindone_lora_plugin.basemodel import BaseModelInfo
    from mindone_lora_plugin.runtime import quiet_mindone_imports

    info = BaseModelInfo.from_folder(folder)  # checks the layout, one clear error if it is not a model folder
    quiet_mindone_imports()
    from mindone.diffusers import UNet2DConditionModel
    from mindone.transformers import CLIPTextModel, CLIPTextModelWithProjection

    kw = {"variant": variant} if variant else {}
    # mindone.diffusers takes the weight dtype as ``mindspore_dtype``, mindone.transformers as ``dtype``
    unet_kw = dict(kw, **({"mindspore_dtype": dtype} if dtype is not None else {}))
    te_kw = dict(kw, **({"dtype": dtype} if dtype is not None else {}))
    cells = {}
    if "unet" in components:
        cells["unet"] = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **unet_kw)
    if "text_encoder" in components and os.path.isdir(os.path.join(folder, "text_encoder")):
        cells["text_encoder"] = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **te_kw)
    if "text_encoder_2" in components and os.path.isdir(os.path.join(folder, "text_encoder_2")):
        cells["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2",
                                                                              **te_kw)
    return Models(**cells, architecture=info.architecture)
