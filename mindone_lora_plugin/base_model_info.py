"""What a LoRA file needs to know about its base model, read cheaply.

:class:`BaseModelInfo` lists, per component, every module that owns a 2-D or 4-D ``weight`` (Linear and Conv2d; token
and position embeddings are left out) with the weight's shape, plus the architecture (``sd1``, ``sd2``, ``sdxl`` or a
plugin's) and its ``base_config`` (what its file names depend on: SD's UNet ``layers_per_block``). It is built either
from a diffusers-layout model folder — from the ``config.json`` files and the safetensors *headers* only, so even a full
SDXL folder is read in milliseconds and nothing is instantiated — or from live MindSpore models. Formats use it to
resolve names and to check every key of a LoRA file against the real modules.
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
    base_config: dict  # what the architecture's file names depend on (Architecture.base_config)
    modules: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    source: str = ""

    def components(self) -> list[str]:
        """The components present, in the architecture's order."""
        from mindone_lora_plugin.architectures import find_architecture

        arch = find_architecture(self.architecture)
        order = list(arch.component_names()) if arch is not None else []
        return [c for c in order if c in self.modules] + [c for c in self.modules if c not in order]

    @classmethod
    def from_folder(cls, path: str) -> "BaseModelInfo":
        """Read a diffusers-layout model folder (``model_index.json`` + one subfolder per component): the installed
        architecture that recognises its configs (:func:`~mindone_lora_plugin.architectures.detect_folder`) says
        which subfolders are its components. A single-file checkpoint is read through the folder it converts to
        (:func:`~mindone_lora_plugin.model_files.resolve_model`; ``source`` is that folder)."""
        from mindone_lora_plugin.architectures import (
            FolderInfo,
            detect_folder,
            get_architecture,
            installed_architectures,
        )
        from mindone_lora_plugin.model_files import resolve_model

        path = resolve_model(path)
        index = _read_model_index(path)
        listed = [c for c, v in index.items() if not c.startswith("_") and v is not None and v != [None, None]]
        configs: dict[str, dict] = {}
        for sub in listed:
            config = os.path.join(path, sub, "config.json")
            if os.path.isfile(config):
                configs[sub] = _read_json(config, f"the {sub} config")
        name = detect_folder(FolderInfo(index, configs))
        if name is None:
            raise LoraError(f"no installed architecture ({', '.join(installed_architectures())}) recognises the model "
                            f"folder {path} (components with a config: {', '.join(configs) or 'none'}); pass a "
                            "diffusers-layout Stable Diffusion model folder, or install the plugin of its model family")
        arch = get_architecture(name)
        modules: dict[str, dict[str, tuple[int, ...]]] = {}
        for comp in arch.components:
            if comp.folder not in listed:
                if not comp.optional:
                    raise LoraError(f"{path} has no {comp.folder}/ folder: pass a diffusers-layout {arch.label} model "
                                    "folder")
                continue
            if comp.folder not in configs:
                _read_json(os.path.join(path, comp.folder, "config.json"), f"the {comp.folder} config")  # the error
            modules[comp.name] = _modules_from_weights(os.path.join(path, comp.folder), comp.name)
        denoiser = configs.get(arch.component(arch.denoiser).folder, {})
        return cls(name, arch.base_config(denoiser), modules, source=path)

    @classmethod
    def from_models(cls, models) -> "BaseModelInfo":
        """Build from a :class:`mindone_lora_plugin.models.Models` bundle of live cells (LoRA wrappers are skipped)."""
        return cls(models.architecture, models.base_config, models.module_shapes(), source="<models>")

    def fit_shapes(self, state) -> None:
        """Let each module's algorithm fit its tensors to the base weight's shape (a Linear LoRA on a 1×1 conv ...),
        then :meth:`check_shapes` (what every reader does once it has a state for this base model)."""
        for comp, path, mod in state.modules():
            shape = self.modules.get(comp, {}).get(path)
            if shape is not None:
                mod.algo.fit_base_shape(mod, shape, f"{comp}.{path}")
        self.check_shapes(state)

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
