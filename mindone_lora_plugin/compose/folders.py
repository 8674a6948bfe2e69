"""Fusing LoRAs into a diffusers-layout model folder (numpy only, written atomically)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.compose._constants import _STALE_WEIGHT_SUFFIXES, MERGE_RECORD
from mindone_lora_plugin.compose.maths import _as_list, _f64, grouped_modules, module_change, module_shape
from mindone_lora_plugin.compose.specs import WeightedLora, _pairs
from mindone_lora_plugin.dtypes import FLOAT_CODES
from mindone_lora_plugin.errors import LoraError


def merge_into_folder(model_dir: str, loras, out: str, dtype: str | None = None, overwrite: bool = False) -> str:
    """Write a copy of the diffusers-layout folder ``model_dir`` at ``out`` with ``loras`` fused into the UNet and text
    encoder weights; return ``out``.

    Pure numpy: each weights file is rewritten one tensor at a time (``W + sum(weight * delta)`` in float64, cast to
    the file's dtype, or to ``dtype`` = ``fp32``/``fp16``/``bf16``, which casts every floating tensor of the folder);
    a module's change is computed when its tensor is reached, from that tensor (DoRA's depends on it).
    Everything else (tokenizers, scheduler, VAE, configs) is copied. The folder is written under a temporary name and
    renamed into place, so ``out`` is either complete or absent. An ``out`` that exists and is not empty is refused
    unless ``overwrite``. Pickled weight files in merged components (they would keep the unmerged weights) are left out.
    """
    from mindone_lora_plugin.architectures import get_architecture
    from mindone_lora_plugin.dtypes import numpy_dtype

    info = BaseModelInfo.from_folder(model_dir)
    folders = {c.folder: c.name for c in get_architecture(info.architecture).components}  # subfolder → component
    np_dtype = numpy_dtype(dtype) if dtype else None
    pairs = _pairs(loras)
    for state, _ in pairs:
        info.check_shapes(state)
    src_real, out_real = os.path.realpath(model_dir), os.path.realpath(out)
    if src_real == out_real or _inside(src_real, out_real) or _inside(out_real, src_real):
        raise LoraError(f"--out {out} must be a new folder outside the model folder {model_dir}")
    _check_out(out, overwrite)
    by_comp: dict[str, dict[str, tuple[str, list]]] = {}  # component → weight name → (module path, its parts)
    for (comp, path), parts in grouped_modules(pairs).items():
        by_comp.setdefault(comp, {})[path + ".weight"] = (path, parts)

    parent = os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        applied: dict[str, set[str]] = {c: set() for c in by_comp}
        for root, dirs, files in os.walk(model_dir, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(root, model_dir)
            comp = folders.get(rel.split(os.sep)[0], "") if rel != "." else ""
            os.makedirs(os.path.join(tmp, rel), exist_ok=True)
            for fname in sorted(files):
                src = os.path.join(root, fname)
                dst = os.path.join(tmp, rel, fname)
                lower = fname.lower()
                if fname.startswith(".") or (fname == MERGE_RECORD and rel == "."):
                    continue
                if rel == "." and lower.endswith((".safetensors",) + _STALE_WEIGHT_SUFFIXES):
                    continue  # a single-file checkpoint next to the diffusers folders: not merged, so not copied
                if comp and lower.endswith(_STALE_WEIGHT_SUFFIXES):
                    continue
                if lower.endswith(".safetensors") and (comp in by_comp or np_dtype is not None):
                    done = _rewrite_weights(src, dst, comp, by_comp.get(comp, {}), np_dtype)
                    if comp in applied:
                        applied[comp] |= done
                elif np_dtype is not None and fname == "config.json" and comp:
                    _write_config_dtype(src, dst, np_dtype)
                else:
                    shutil.copyfile(src, dst)
        for comp, keys in by_comp.items():
            missing = sorted(set(keys) - applied.get(comp, set()))
            if missing:
                raise LoraError(f"{len(missing)} weight(s) of the LoRA were not found in {model_dir}/"
                                f"{get_architecture(info.architecture).component(comp).folder}, e.g. "
                                f"{', '.join(missing[:3])}")
        record = {"base_model": os.path.abspath(model_dir), "dtype": dtype,
                  "loras": [lo.describe() if isinstance(lo, WeightedLora) else {"weight": w}
                            for lo, (_, w) in zip(_as_list(loras), pairs)]}
        with open(os.path.join(tmp, MERGE_RECORD), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        _move_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LoraError(f"cannot write the merged model to {out}: {e.strerror or e}; check the space and permissions "
                        f"there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def output_is_taken(out: str) -> bool:
    """True when ``out`` exists and is a file or a non-empty folder."""
    if not os.path.lexists(out):
        return False
    return not (os.path.isdir(out) and not os.listdir(out))


def _check_out(out: str, overwrite: bool) -> None:
    if output_is_taken(out) and not overwrite:
        raise LoraError(f"the output {out} already exists; choose another --out or pass --overwrite to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise LoraError(f"the output {out} is a file, not a folder; choose another --out")


def _move_into_place(tmp: str, out: str) -> None:
    old = None
    if os.path.isdir(out):
        if os.listdir(out):
            old = f"{tmp}.old"
            os.replace(out, old)
        else:
            os.rmdir(out)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _np_dtype(code: str):
    from mindone_lora_plugin.dtypes import from_code

    found = from_code(code)
    if found is None:
        raise LoraError(f"tensor dtype {code} is not supported when merging")
    return found


def _rewrite_weights(src: str, dst: str, comp: str, changes: dict[str, tuple[str, list]], dtype) -> set[str]:
    """Copy the safetensors file ``src`` to ``dst`` adding to each weight ``changes`` names (weight name → module path
    and its ``[(module, weight)]`` parts) the module's change, computed from that weight, and casting floating tensors
    to ``dtype`` (None: keep). One tensor and its change are in memory at a time. Returns the names changed."""
    from mindone_lora_plugin.dtypes import as_dtype, safetensors_dtype
    from mindone_lora_plugin.safetensors_io import StreamWriter, as_bytes, read_header

    header, offset = read_header(src)
    names = [k for k in header if k != "__metadata__"]
    order = sorted(names, key=lambda k: header[k]["data_offsets"][0])  # the source's own order: one forward pass
    out_codes = {k: (safetensors_dtype(dtype) if dtype is not None and header[k]["dtype"] in FLOAT_CODES
                     else header[k]["dtype"]) for k in names}
    entries = [(k, out_codes[k], tuple(header[k]["shape"]),
                int(np.prod(header[k]["shape"], dtype=np.int64)) * _np_dtype(out_codes[k]).itemsize) for k in order]
    changed = set()
    data = np.memmap(src, dtype=np.uint8, mode="r")
    try:
        with StreamWriter(dst, entries, header.get("__metadata__")) as w:
            for k in order:
                arr = _tensor(data, offset, header[k])
                if k in changes:
                    path, parts = changes[k]
                    implied = module_shape(parts)
                    if int(np.prod(implied)) != arr.size:
                        raise LoraError(f"shape mismatch at {k} in {src}: the weight is {list(arr.shape)} but the "
                                        f"LoRA implies {list(implied)}")
                    d = module_change(comp, path, parts, arr.reshape(implied))
                    arr = as_dtype(_f64(arr) + d.reshape(arr.shape), arr.dtype)
                    changed.add(k)
                w.write(as_bytes(as_dtype(arr, _np_dtype(out_codes[k]))))
    finally:
        del data
    return changed


def _tensor(data, offset: int, info: dict) -> np.ndarray:
    """One tensor of a memory-mapped safetensors file (``info``: its header entry), without a copy."""
    begin, end = info["data_offsets"]
    return np.frombuffer(data[offset + begin: offset + end], dtype=_np_dtype(info["dtype"])).reshape(info["shape"])


class FolderWeights:
    """The base weights of a diffusers-layout model folder, read on demand one tensor at a time:
    ``get((component, module path))`` → the module's weight (float64) or ``None``. For :func:`combined_deltas` and
    :func:`svd_reduce` where a DoRA module needs its base weight and no model is loaded."""

    def __init__(self, model_dir: str):
        from mindone_lora_plugin.architectures import get_architecture

        info = BaseModelInfo.from_folder(model_dir)
        self._dirs = {c.name: os.path.join(model_dir, c.folder) for c in get_architecture(info.architecture).components}
        self._where: dict[str, dict[str, tuple[str, dict, int]]] = {}

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        comp, path = key
        found = self._files(comp).get(path + ".weight")
        if found is None:
            return None
        src, header, offset = found
        data = np.memmap(src, dtype=np.uint8, mode="r")
        try:
            return _f64(_tensor(data, offset, header[path + ".weight"]))
        finally:
            del data

    def _files(self, comp: str) -> dict[str, tuple[str, dict, int]]:
        """Weight name → (the safetensors file of ``comp`` holding it, its header, its data offset): the main file,
        or the shards of its index."""
        from mindone_lora_plugin.base_model_info import _WEIGHT_FILES
        from mindone_lora_plugin.safetensors_io import read_header

        if comp not in self._where:
            folder, found = self._dirs.get(comp, ""), {}
            files = [n for n in _WEIGHT_FILES if os.path.isfile(os.path.join(folder, n))][:1]
            for name in () if files else _WEIGHT_FILES:
                index = os.path.join(folder, name + ".index.json")
                if os.path.isfile(index):
                    with open(index, encoding="utf-8") as f:
                        files = sorted(set(json.load(f)["weight_map"].values()))
                    break
            for name in files:
                src = os.path.join(folder, name)
                header, offset = read_header(src)
                found.update({k: (src, header, offset) for k in header if k != "__metadata__"})
            self._where[comp] = found
        return self._where[comp]


def _write_config_dtype(src: str, dst: str, np_dtype) -> None:
    """Copy a component's config.json, updating the transformers ``dtype``/``torch_dtype`` entry when it has one."""
    try:
        with open(src, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        shutil.copyfile(src, dst)
        return
    name = np.dtype(np_dtype).name
    for key in ("dtype", "torch_dtype"):
        if key in config and config[key] is not None:
            config[key] = name
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
