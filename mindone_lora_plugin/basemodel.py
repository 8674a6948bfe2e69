"""What a LoRA file needs to know about its base model, read cheaply.

:class:`BaseModelInfo` lists, per component, every module that owns a 2-D or 4-D ``weight`` (Linear and Conv2d; token
and position embeddings are left out) with the weight's shape, plus the architecture (``sd1``, ``sd2``, ``sdxl``) and the UNet's
``layers_per_block``. It is built either from a diffusers-layout model folder — from the ``config.json`` files and the
safetensors *headers* only, so even a full SDXL folder is read in milliseconds and nothing is instantiated — or from live
MindSpore models. Formats use it to resolve names and to check every key of a LoRA file against the real modules.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from mindone_lora_plugin.errors import LoraError

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


@dataclass
class BaseModelInfo:
    architecture: str
    unet_layers_per_block: int | None
    modules: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    source: str = ""

    def components(self) -> list[str]:
        return [c for c in ("unet", "text_encoder", "text_encoder_2") if c in self.modules]

    @classmethod
    def from_folder(cls, path: str) -> "BaseModelInfo":
        """Read a diffusers-layout model folder (``model_index.json`` + ``unet/`` + ``text_encoder*/``)."""
        index = _read_model_index(path)
        modules: dict[str, dict[str, tuple[int, ...]]] = {}
        configs: dict[str, dict] = {}
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            if comp not in index or index[comp] is None or index[comp] == [None, None]:
                continue
            sub = os.path.join(path, comp)
            configs[comp] = _read_json(os.path.join(sub, "config.json"), f"the {comp} config")
            modules[comp] = _modules_from_weights(sub, comp)
        if "unet" not in configs:
            raise LoraError(f"{path} has no unet/ folder: pass a diffusers-layout Stable Diffusion model folder")
        arch = detect_architecture(index, configs)
        return cls(arch, configs["unet"].get("layers_per_block"), modules, source=path)

    @classmethod
    def from_models(cls, models) -> "BaseModelInfo":
        """Build from a :class:`mindone_lora_plugin.models.Models` bundle of live cells (LoRA wrappers are skipped)."""
        from mindone_lora_plugin.models import module_weight_shapes

        modules = {comp: module_weight_shapes(cell) for comp, cell in models.items()}
        return cls(models.architecture, models.unet_layers_per_block, modules, source="<models>")

    def check_shapes(self, state) -> None:
        """Raise :class:`LoraError` when a module of ``state`` does not exist here or its shapes do not fit."""
        missing = []
        for comp, path, mod in state.modules():
            shapes = self.modules.get(comp)
            if shapes is None:
                raise LoraError(
                    f"the LoRA has weights for '{comp}' but the base model ({self.architecture}) has no {comp}: "
                    f"it was made for another architecture; use a LoRA made for {self.architecture}")
            if path not in shapes:
                missing.append(f"{comp}.{path}")
                continue
            want = shapes[path]
            got = mod.base_shape()
            if len(want) == 2 and len(got) == 4 and got[2:] == (1, 1):
                got = got[:2]
            if len(want) == 4 and len(got) == 2 and want[2:] == (1, 1):
                got = got + (1, 1)
            if tuple(want) != tuple(got):
                raise LoraError(
                    f"shape mismatch at {comp}.{path}: the base weight is {list(want)} but the LoRA implies "
                    f"{list(got)} ({_shapes(mod)}); the LoRA was made for another "
                    f"base model")
        if missing:
            first = ", ".join(missing[:3])
            raise LoraError(
                f"{len(missing)} LoRA module(s) match no module of the {self.architecture} base model, e.g. {first}; "
                f"the LoRA was made for another model or architecture")


def _shapes(mod) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in mod.tensors.items())


def detect_architecture(index: dict, configs: dict[str, dict]) -> str:
    """The architecture of a model folder from its ``model_index.json`` and component configs."""
    from mindone_lora_plugin.formats.arch import from_configs

    return from_configs(configs.get("unet"), configs.get("text_encoder"),
                        has_text_encoder_2="text_encoder_2" in configs, class_name=index.get("_class_name", ""))


def _read_model_index(path: str) -> dict:
    if not os.path.isdir(path):
        raise LoraError(f"model folder {path} does not exist: pass a diffusers-layout model folder")
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise LoraError(f"{path} is not a diffusers-layout model folder (no model_index.json); save the pipeline with "
                        f"save_pretrained or convert the checkpoint first")
    return _read_json(index_path, "model_index.json")


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise LoraError(f"{what} is missing: {path}") from None
    except (OSError, ValueError) as e:
        raise LoraError(f"cannot read {what} at {path}: {e}") from None


def _modules_from_weights(folder: str, comp: str) -> dict[str, tuple[int, ...]]:
    from mindone_lora_plugin.safetensors_io import read_header

    for name in _WEIGHT_FILES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            header, _ = read_header(candidate)
            return _shapes_from_header(header)
    index = next((os.path.join(folder, n + ".index.json") for n in _WEIGHT_FILES
                  if os.path.isfile(os.path.join(folder, n + ".index.json"))), None)
    if index:
        shards = sorted(set(_read_json(index, "the weight index")["weight_map"].values()))
        out: dict[str, tuple[int, ...]] = {}
        for shard in shards:
            header, _ = read_header(os.path.join(folder, shard))
            out.update(_shapes_from_header(header))
        return out
    raise LoraError(f"no safetensors weights in {folder} for {comp}: the model folder must hold "
                    f"{' or '.join(_WEIGHT_FILES)}")


def _shapes_from_header(header: dict) -> dict[str, tuple[int, ...]]:
    out = {}
    for key, info in header.items():
        if key == "__metadata__" or not key.endswith(".weight"):
            continue
        shape = tuple(info.get("shape", ()))
        module = key[: -len(".weight")]
        if len(shape) in (2, 4) and not module.endswith("embedding"):  # token/position embeddings take no LoRA
            out[module] = shape
    return out
