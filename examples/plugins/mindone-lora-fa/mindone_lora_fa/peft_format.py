"""The ``peft`` format: one PEFT adapter folder per model component.

What ``PeftModel.save_pretrained`` writes, for each adapted component::

    <output_name>_peft/
        unet/
            adapter_config.json         {"peft_type": "LORA", "r": 4, "lora_alpha": 4.0, "target_modules": [...],
                                         "rank_pattern": {...}, "alpha_pattern": {...}, ...}
            adapter_model.safetensors   base_model.model.<module path>.lora_A.weight / .lora_B.weight
        text_encoder/
            ...

``target_modules`` lists the full module paths, so the adapter fits exactly the modules that were trained;
``rank_pattern``/``alpha_pattern`` hold every module whose rank or alpha differs from ``r``/``lora_alpha``. Hugging Face
peft loads each folder onto the matching torch module with ``PeftModel.from_pretrained(unet, "<folder>/unet")``.

The training metadata (strings) and the base architecture go into the safetensors header, next to peft's own
``"format": "pt"``. Like every format, this one is pure numpy.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid

import numpy as np

from mindone_lora_plugin import safetensors_io
from mindone_lora_plugin.dtypes import as_dtype, numpy_dtype
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.base import LoraFormat
from mindone_lora_plugin.formats.diffusers import adapter_config as core_adapter_config
from mindone_lora_plugin.state import COMPONENTS, LoraModule, LoraState

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# base_model.model.<path>.lora_A.weight, also with an adapter name (lora_A.default.weight) as some tools write it
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_META_ARCH = "mindone_lora.architecture"
_META_LPB = "mindone_lora.unet_layers_per_block"


class PeftFormat(LoraFormat):
    name = "peft"
    description = "PEFT adapter folders (adapter_config.json + adapter_model.safetensors), one per component"

    # ------------------------------------------------------------------ naming

    def default_filename(self, output_name: str) -> str:
        return f"{output_name}_peft"  # a folder

    def output_path(self, out: str, output_name: str = "lora") -> str:
        """``out`` itself is the adapter folder, unless it is an existing folder of something else (or ends in /)."""
        if out.endswith(os.sep) or (os.path.isdir(out) and os.listdir(out) and not is_peft_folder(out)):
            return os.path.join(out, self.default_filename(output_name))
        return out

    # ------------------------------------------------------------------ reading

    def sniff(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """A single ``adapter_model.safetensors``: every key is ``base_model.model.<path>.lora_A/B.weight``."""
        return bool(keys) and all(_KEY.match(k) for k in keys)

    def sniff_folder(self, path: str) -> bool:
        """A folder in this format: an adapter folder, or a folder of per-component adapter folders."""
        return os.path.isdir(path) and is_peft_folder(path)

    def read(self, path: str, base=None) -> LoraState:
        folders = component_folders(path)
        state = LoraState()
        for comp, folder in folders.items():
            meta = self._read_component(comp, folder, state)
            state.metadata.update({k: v for k, v in meta.items() if k not in (_META_ARCH, _META_LPB, "format")})
            state.architecture = state.architecture or meta.get(_META_ARCH) or None
            lpb = meta.get(_META_LPB)
            if not state.base_config and lpb and lpb.isdigit():
                state.base_config = {"layers_per_block": int(lpb)}
        if base is not None:
            state.architecture = state.architecture or base.architecture
            state.base_config = state.base_config or dict(base.base_config)
            base.check_shapes(state)
        return state

    def _read_component(self, comp: str, folder: str, state: LoraState) -> dict[str, str]:
        config = read_config(os.path.join(folder, CONFIG))
        tensors, meta = safetensors_io.load(os.path.join(folder, WEIGHTS))
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for key, value in tensors.items():
            m = _KEY.match(key)
            if m is None:
                raise LoraError(f"{os.path.join(folder, WEIGHTS)} has the key '{key}', which is not a PEFT LoRA weight "
                                f"(base_model.model.<module>.lora_A.weight / lora_B.weight); LoRA biases, DoRA "
                                f"magnitudes and modules_to_save are not supported")
            pairs.setdefault(m["path"], {})[m["ab"]] = value
        if not pairs:
            raise LoraError(f"{os.path.join(folder, WEIGHTS)} holds no LoRA weights")
        r, alpha = int(config["r"]), float(config["lora_alpha"])
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        for path, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                missing = "lora_B" if "A" in ab else "lora_A"
                raise LoraError(f"{os.path.join(folder, WEIGHTS)} has no {missing} weight for {path}: the file is "
                                f"incomplete")
            down, up = ab["A"], ab["B"]
            rank = int(_pattern_value(rank_pattern, path, r))
            if down.shape[0] != rank or up.shape[1] != rank:
                raise LoraError(f"{comp}.{path} has rank {down.shape[0]} in {WEIGHTS} but {rank} in {CONFIG}: the "
                                f"adapter folder is inconsistent")
            if down.ndim == 4 and up.ndim == 2:
                up = up[:, :, None, None]
            a = float(_pattern_value(alpha_pattern, path, alpha))
            if config.get("use_rslora"):  # peft scales by alpha / sqrt(r); keep the same scale with alpha / r
                a = a * math.sqrt(rank)
            state.add(comp, path, LoraModule(down, up, a))
        return meta

    # ------------------------------------------------------------------ writing

    def write(self, state: LoraState, out: str, *, dtype: str | None = None,
              metadata: dict[str, str] | None = None, output_name: str = "lora") -> str:
        target = self.output_path(out, output_name)
        if os.path.exists(target) and not os.path.isdir(target):
            raise LoraError(f"cannot write the peft adapter folder {target}: a file of that name is in the way")
        if not len(state):
            raise LoraError("there are no LoRA weights to write")
        cast = _caster(dtype)
        meta = {k: str(v) for k, v in {**state.metadata, **(metadata or {})}.items()}
        meta["format"] = "pt"
        if state.architecture:
            meta[_META_ARCH] = state.architecture
        if state.base_config.get("layers_per_block") is not None:
            meta[_META_LPB] = str(state.base_config["layers_per_block"])
        parent = os.path.dirname(os.path.abspath(target))
        try:
            os.makedirs(parent, exist_ok=True)
            # a plain mkdir (not mkdtemp, whose folder is private): the result gets an ordinary folder's permissions
            tmp = os.path.join(parent, f".{os.path.basename(target)}.{uuid.uuid4().hex[:12]}.tmp")
            os.mkdir(tmp)
        except OSError as e:
            raise LoraError(f"cannot write {target}: {e.strerror or e}; choose a writable location") from None
        try:
            for comp, modules in state.components.items():
                if not modules:
                    continue
                folder = os.path.join(tmp, comp)
                os.makedirs(folder)
                tensors = {}
                for path, mod in modules.items():
                    up = mod.up[:, :, 0, 0] if mod.up.ndim == 4 and mod.down.ndim == 2 else mod.up
                    tensors[f"{PREFIX}{path}.lora_A.weight"] = cast(mod.down)
                    tensors[f"{PREFIX}{path}.lora_B.weight"] = cast(up)
                safetensors_io.save(tensors, os.path.join(folder, WEIGHTS), metadata=meta)
                config = json.dumps(adapter_config(modules), indent=2, sort_keys=True)
                safetensors_io.write_bytes_atomic(os.path.join(folder, CONFIG), config.encode("utf-8"))
            _swap_in(tmp, target)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise LoraError(f"cannot write {target}: {e.strerror or e}; choose a writable location") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def adapter_config(modules: dict[str, LoraModule]) -> dict:
    """The ``adapter_config.json`` of one component: the core's ``LoraConfig`` fields (every module listed, ranks and
    alphas that differ in the patterns) plus the fields of peft's saved config, with the pattern keys escaped."""
    cfg = core_adapter_config(modules)
    return {
        **cfg,
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "lora_alpha": float(cfg["lora_alpha"]),
        "use_dora": False,
        "modules_to_save": None,
        # peft matches pattern keys as regular expressions: escape the dots of the module paths
        "rank_pattern": {re.escape(p): r for p, r in cfg["rank_pattern"].items()},
        "alpha_pattern": {re.escape(p): float(a) for p, a in cfg["alpha_pattern"].items()},
    }


def read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise LoraError(f"{path} is missing: a PEFT adapter folder needs {CONFIG} next to {WEIGHTS}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LoraError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise LoraError(f"{path} is not a PEFT adapter config (a JSON object)")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path} is a {config.get('peft_type')} adapter; only LORA adapters are supported")
    if config.get("use_dora"):
        raise LoraError(f"{path} is a DoRA adapter (use_dora); only plain LoRA is supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise LoraError(f"{path} has no numeric '{key}': not a PEFT LoRA adapter config")
    return config


def _is_adapter(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in (CONFIG, WEIGHTS))


def is_peft_folder(path: str) -> bool:
    """An adapter folder, or a folder of per-component adapter folders (a missing half is reported on reading)."""
    return os.path.isdir(path) and (_is_adapter(path) or any(_is_adapter(os.path.join(path, c)) for c in COMPONENTS))


def component_folders(path: str) -> dict[str, str]:
    """Component → adapter folder for ``path``: the top folder, one adapter folder, or its ``adapter_model`` file."""
    if os.path.isfile(path) and os.path.basename(path) in (WEIGHTS, CONFIG):
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        raise LoraError(f"{path} is not a PEFT adapter folder (expected a folder with unet/{CONFIG} or {CONFIG})")
    found = {c: os.path.join(path, c) for c in COMPONENTS if _is_adapter(os.path.join(path, c))}
    if found:
        return found
    if _is_adapter(path):
        return {_guess_component(path): path}
    raise LoraError(f"{path} is not a PEFT adapter folder: it has neither {CONFIG} nor unet/{CONFIG}, "
                    f"text_encoder/{CONFIG}")


def _guess_component(folder: str) -> str:
    """A single adapter folder: its name if it is a component's, else a text encoder when the modules say so."""
    name = os.path.basename(os.path.normpath(folder))
    if name in COMPONENTS:
        return name
    try:
        keys = list(safetensors_io.read_header(os.path.join(folder, WEIGHTS))[0])
    except LoraError:
        return "unet"
    return "text_encoder" if any(k.startswith(PREFIX + "text_model.") for k in keys) else "unet"


def _pattern_value(pattern: dict, path: str, default):
    """peft's ``get_pattern_key`` rule: a key matches a module path when the path ends with it (regex match)."""
    for key, value in pattern.items():
        try:
            if key == path or re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error:
            raise LoraError(f"the rank/alpha pattern '{key}' in {CONFIG} is not a valid regular expression") from None
    return default


def _caster(dtype: str | None):
    """``--save_dtype`` → a function casting one array (the core's dtype table; None/"keep": no cast)."""
    if dtype in (None, "", "keep"):
        return np.asarray
    target = numpy_dtype(dtype)
    return lambda a: as_dtype(a, target)


def _swap_in(tmp: str, target: str) -> None:
    """Put the finished folder ``tmp`` at ``target``; an older ``target`` is replaced only once ``tmp`` is complete."""
    if not os.path.exists(target):
        os.replace(tmp, target)
        return
    old = tmp + ".old"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
