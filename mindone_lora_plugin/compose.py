"""Use trained LoRAs: several weighted LoRAs applied at once, fused into a model, or combined into one LoRA file.

This is the Python API behind ``mindone-lora generate`` and ``mindone-lora merge`` (see ``docs/using-loras.md``)::

    from mindone_lora_plugin import compose

    loras = compose.load_loras(["style.safetensors:0.8", "subject.safetensors"], base="./sd15")
    pipe = compose.load_pipeline("./sd15", loras)                  # one PEFT adapter per LoRA, weighted
    images = compose.generate_images(pipe, "a photo of sks dog", num_images=4, steps=30, seed=1)

    compose.merge_into_folder("./sd15", loras, "./sd15-merged")    # a full diffusers folder, LoRAs fused in
    one = compose.concat_loras(loras)                              # one LoRA with the same effect (ranks concatenated)

A LoRA's weight multiplies its effect: with weight ``w`` a module's weight becomes ``W + w * scale * up @ down``
(``scale = alpha / rank``). Weights may be negative or zero. Everything that computes weights here is numpy in float64
and exact up to the final cast; only :func:`apply_loras`, :func:`merge_into_models`, :func:`load_pipeline` and
:func:`generate_images` touch MindSpore (imported when called).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import warnings
from dataclasses import dataclass, field

import numpy as np

from mindone_lora_plugin.basemodel import BaseModelInfo
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.state import COMPONENTS, LoraModule, LoraState

ADAPTER_PREFIX = "lora"  # apply_loras names the adapters lora0, lora1, ...
MERGE_RECORD = "mindone_lora_merge.json"  # written at the root of a merged model folder
DTYPES = ("fp32", "fp16", "bf16")
_FLOAT_CODES = ("F16", "BF16", "F32", "F64")
# pickled or foreign weight files; left out of a merged component because they would still hold the unmerged weights
_STALE_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb",
                          ".bin.index.json", ".msgpack.index.json", ".h5.index.json")
_PATH_LIKE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".json")


# ---------------------------------------------------------------------------------------------------- LoRA specs


@dataclass
class WeightedLora:
    """A LoRA and the weight it is used with. ``path``/``format`` say where it was read from (``None`` if built)."""

    state: LoraState
    weight: float = 1.0
    path: str | None = None
    format: str | None = None

    @property
    def name(self) -> str:
        """A short display name: the file name without extension (the folder name for a diffusers folder)."""
        if not self.path:
            return "lora"
        stem = os.path.splitext(os.path.basename(os.path.normpath(self.path)))[0]
        if stem == "pytorch_lora_weights":
            stem = os.path.basename(os.path.dirname(os.path.abspath(self.path))) or stem
        return stem

    def describe(self) -> dict:
        return {"file": self.path, "name": self.name, "weight": self.weight, "format": self.format,
                "modules": len(self.state)}


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``"FILE"`` → ``(FILE, 1.0)``; ``"FILE:WEIGHT"`` → ``(FILE, WEIGHT)``.

    Only the last colon can separate a weight, so paths with colons work: a spec that names an existing file or
    folder is taken whole. Otherwise what follows the last colon must be a finite number (it may be negative); when it
    is not, the error names it — unless it looks like part of a path, in which case the file does not exist.
    """
    spec = str(spec)
    if not spec.strip():
        raise LoraError("empty --lora value: give FILE or FILE:WEIGHT, e.g. style.safetensors:0.7")
    if os.path.exists(spec) or ":" not in spec:
        return spec, 1.0
    path, raw = spec.rsplit(":", 1)
    try:
        weight = float(raw)
    except ValueError:
        if "/" in raw or os.sep in raw or raw.lower().endswith(_PATH_LIKE_SUFFIXES):
            raise LoraError(f"LoRA {spec} does not exist") from None
        raise LoraError(f"LoRA spec '{spec}': weight '{raw}' is not a number; write FILE:WEIGHT with a number such "
                        f"as 0.7 or -0.5") from None
    if not math.isfinite(weight):
        raise LoraError(f"LoRA spec '{spec}': weight '{raw}' is not a finite number")
    if not path:
        raise LoraError(f"LoRA spec '{spec}' has no file before the weight: write FILE:WEIGHT")
    return path, weight


def load_loras(specs, base: BaseModelInfo | str | None = None, formats=None) -> list[WeightedLora]:
    """Read every LoRA of ``specs`` (``"FILE[:WEIGHT]"`` strings, ``(path, weight)`` pairs or :class:`WeightedLora`).

    Any format the plugin manager knows is read (this package's, kohya/A1111/civitai, diffusers/PEFT). With ``base``
    (a :class:`BaseModelInfo` or a model folder) every module and shape is checked against the base model, and a LoRA
    for another architecture is refused.
    """
    from mindone_lora_plugin.formats.reader import open_lora

    if isinstance(base, str):
        base = BaseModelInfo.from_folder(base)
    known = _formats(formats)
    out = []
    for spec in specs:
        if isinstance(spec, WeightedLora):
            out.append(spec)
            continue
        path, weight = parse_lora_spec(spec) if isinstance(spec, str) else (str(spec[0]), float(spec[1]))
        lf = open_lora(path, base=base, formats=known)
        if base is not None:
            base.check_shapes(lf.state)
        if not len(lf.state):
            raise LoraError(f"{path} holds no LoRA modules")
        out.append(WeightedLora(lf.state, weight, path, lf.format.name))
    return out


def _formats(formats=None) -> dict:
    from mindone_lora_plugin.commands.convert import available_formats

    return available_formats(formats)


def _pairs(loras) -> list[tuple[LoraState, float]]:
    """``loras`` as ``[(state, weight)]``: accepts WeightedLora, (state, weight) pairs and bare LoraStates."""
    if isinstance(loras, (LoraState, WeightedLora)):
        loras = [loras]
    out = []
    for item in loras:
        if isinstance(item, WeightedLora):
            out.append((item.state, float(item.weight)))
        elif isinstance(item, LoraState):
            out.append((item, 1.0))
        else:
            state, weight = item
            out.append((state, float(weight)))
    return out


def _arch_of(pairs) -> str | None:
    archs = {s.architecture for s, _ in pairs if s.architecture}
    if "text_encoder_2" in {c for s, _ in pairs for c in s.components}:
        archs.add("sdxl")
    if len(archs) > 1:
        raise LoraError(f"the LoRAs are for different architectures ({', '.join(sorted(archs))}); use LoRAs made for "
                        f"the same base model")
    return archs.pop() if archs else None


# ---------------------------------------------------------------------------------------------------- numpy maths


def _f64(arr) -> np.ndarray:
    """``arr`` as float64; bfloat16 arrays of any origin (ml_dtypes' or MindSpore's numpy type) included."""
    from mindone_lora_plugin.formats.hashes import as_dtype

    return as_dtype(np.asarray(arr), np.float64)


def module_delta(mod: LoraModule) -> np.ndarray:
    """``scale * up @ down`` in the base weight's layout, in float64 (exact up to rounding)."""
    up = _f64(mod.up).reshape(mod.up.shape[0], -1)
    down = _f64(mod.down).reshape(mod.rank, -1)
    return ((up @ down) * float(mod.scale)).reshape(mod.base_shape())


def combined_deltas(loras) -> dict[tuple[str, str], np.ndarray]:
    """``(component, module path) → sum of weight * delta`` over ``loras``, in float64."""
    out: dict[tuple[str, str], np.ndarray] = {}
    for state, weight in _pairs(loras):
        for comp, path, mod in state.modules():
            d = module_delta(mod) * weight
            key = (comp, path)
            if key in out:
                prev = out[key]
                if prev.size != d.size:
                    raise LoraError(f"the LoRAs disagree about the shape of {comp}.{path} ({list(prev.shape)} vs "
                                    f"{list(d.shape)}); they were made for different base models")
                out[key] = prev + d.reshape(prev.shape)
            else:
                out[key] = d
    return out


def concat_loras(loras, dtype=np.float32) -> LoraState:
    """One LoRA whose every module equals the weighted sum of ``loras`` — exactly, without SVD.

    For each module the down matrices are stacked (rank = sum of the ranks) and each LoRA's ``weight * alpha / rank``
    is folded into its up matrix; the combined alpha is the combined rank, so the combined scale is 1. Modules only
    some LoRAs adapt keep only those LoRAs' parts. The result is in ``dtype`` (float32 unless asked otherwise).
    """
    pairs = _pairs(loras)
    if not pairs:
        raise LoraError("no LoRA to combine")
    arch = _arch_of(pairs)
    groups: dict[tuple[str, str], list[tuple[LoraModule, float]]] = {}
    for state, weight in pairs:
        for comp, path, mod in state.modules():
            groups.setdefault((comp, path), []).append((mod, weight))
    lpb = next((s.unet_layers_per_block for s, _ in pairs if s.unet_layers_per_block), None)
    out = LoraState(architecture=arch, unet_layers_per_block=lpb)
    for (comp, path), parts in groups.items():
        conv = any(m.down.ndim == 4 for m, _ in parts)
        downs, ups = [], []
        for mod, weight in parts:
            down, up = _f64(mod.down), _f64(mod.up)
            if conv and down.ndim == 2:
                down = down[:, :, None, None]
            if conv and up.ndim == 2:
                up = up[:, :, None, None]
            if not conv and up.ndim == 4:
                up = up.reshape(up.shape[0], up.shape[1])
            if downs and (down.shape[1:] != downs[0].shape[1:] or up.shape[0] != ups[0].shape[0]):
                raise LoraError(f"the LoRAs disagree about the shape of {comp}.{path} (down {list(downs[0].shape)} vs "
                                f"{list(down.shape)}); they were made for different base models")
            downs.append(down)
            ups.append(up * (mod.scale * weight))
        down = np.concatenate(downs, axis=0)
        up = np.concatenate(ups, axis=1)
        out.add(comp, path, LoraModule(down.astype(dtype), up.astype(dtype), float(down.shape[0])))
    out.metadata["mindone_lora_concatenated_from"] = json.dumps(
        [{"name": lo.name if isinstance(lo, WeightedLora) else f"lora{i}", "weight": w}
         for i, (lo, (_, w)) in enumerate(zip(_as_list(loras), pairs))])
    return out


def _as_list(loras) -> list:
    return [loras] if isinstance(loras, (LoraState, WeightedLora)) else list(loras)


# ---------------------------------------------------------------------------------------------------- live models


def apply_loras(models, loras, prefix: str = ADAPTER_PREFIX) -> list[str]:
    """Add one PEFT adapter per LoRA to ``models`` (a :class:`~mindone_lora_plugin.models.Models`), all active at once.

    Every module keeps its own rank and alpha; the LoRA's weight is folded into the adapter's scaling
    (``weight * alpha / rank``), as mindone's ``set_adapters(names, weights)`` does. Text-encoder LoRAs are applied to
    the text encoders. Adapters already active stay active. Returns the adapter names (``lora0``, ``lora1``, …; the
    next free numbers when some exist). Change weights later with :func:`set_lora_weights`.
    """
    import mindspore as ms

    from mindone_lora_plugin.models import lora_layers
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.strategies.base import LoraStrategy, adaptable_layers

    pairs = _pairs(loras)
    for state, _ in pairs:
        for comp in state.components:
            if comp not in models:
                raise LoraError(f"the LoRA has weights for {comp} but the model has no {comp}: it was made for "
                                f"another architecture ({state.architecture or 'unknown'} vs {models.architecture})")
    used = set()
    for cell in models.values():
        used |= set(getattr(cell, "peft_config", None) or {})
    names, i = [], 0
    for _ in pairs:
        while f"{prefix}{i}" in used:
            i += 1
        names.append(f"{prefix}{i}")
        used.add(names[-1])
    before = {comp: {p: list(layer.active_adapters) for p, layer in lora_layers(cell)} for comp, cell in models.items()}
    strategy = LoraStrategy()
    for name, (state, weight) in zip(names, pairs):
        for comp, modules in state.components.items():
            if not modules:
                continue
            cell = models[comp]
            targets = {p: (m.rank, float(m.alpha)) for p, m in modules.items()}
            unknown = sorted(set(targets) - {p for p, _ in adaptable_layers(cell)})
            if unknown:
                raise LoraError(f"{len(unknown)} LoRA module(s) match no Linear/Conv2d of the {comp}, e.g. "
                                f"{', '.join(unknown[:3])}; the LoRA was made for another model")
            with warnings.catch_warnings():  # "Already found a peft_config": several adapters is the point here
                warnings.filterwarnings("ignore", message=".*peft_config.*")
                cell.add_adapter(strategy.lora_config(targets, LoraOptions(init="default")), adapter_name=name)
            layers = dict(lora_layers(cell))
            for path, mod in modules.items():
                layer = layers.get(path)
                if layer is None or name not in layer.lora_A:
                    raise LoraError(f"could not add a LoRA adapter to {comp}.{path}")
                if int(layer.r[name]) != mod.rank:
                    raise LoraError(f"{comp}.{path}: adapter rank {layer.r[name]} but the LoRA has rank {mod.rank}")
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                down, up = _fit(mod.down, a.shape, comp, path), _fit(mod.up, b.shape, comp, path)
                a.set_data(ms.Tensor(down.astype(np.float32), dtype=a.dtype))
                b.set_data(ms.Tensor(up.astype(np.float32), dtype=b.dtype))
                layer.lora_alpha[name] = float(mod.alpha)
                layer.scaling[name] = float(weight) * float(mod.alpha) / mod.rank
    for comp, cell in models.items():
        for path, layer in lora_layers(cell):
            keep = [n for n in before[comp].get(path, []) if n in layer.lora_A]
            layer.set_adapter(keep + [n for n in names if n in layer.lora_A and n not in keep])
            for n in names:  # set_adapter marks active adapters trainable; these are for inference
                if n in layer.lora_A:
                    layer.lora_A[n].weight.requires_grad = False
                    layer.lora_B[n].weight.requires_grad = False
    return names


def _fit(arr, shape, comp, path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind == "V" or arr.dtype.name == "bfloat16":
        from mindone_lora_plugin.formats.hashes import as_dtype

        arr = as_dtype(arr, np.float32)
    if tuple(arr.shape) != tuple(shape):
        if arr.size != int(np.prod(shape)):
            raise LoraError(f"shape mismatch at {comp}.{path}: the LoRA has {list(arr.shape)} but the model expects "
                            f"{list(shape)}")
        arr = arr.reshape(tuple(shape))
    return arr


def set_lora_weights(models, weights: dict[str, float]) -> None:
    """Change the weight of adapters added by :func:`apply_loras` (``{"lora0": 0.5, "lora1": -1.0}``)."""
    from mindone_lora_plugin.models import lora_layers

    found = set()
    for cell in models.values():
        for _, layer in lora_layers(cell):
            for name, w in weights.items():
                if name in layer.lora_A:
                    layer.scaling[name] = float(w) * float(layer.lora_alpha[name]) / int(layer.r[name])
                    found.add(name)
    missing = sorted(set(weights) - found)
    if missing:
        raise LoraError(f"no adapter named {', '.join(missing)} in these models")


def active_deltas(models) -> dict[tuple[str, str], np.ndarray]:
    """``(component, module path) → sum over the active adapters of scaling * B @ A`` as the models hold them
    (float64): what the adapters add to each base weight."""
    from mindone_lora_plugin.models import base_layer_of, lora_layers

    out = {}
    for comp, cell in models.items():
        for path, layer in lora_layers(cell):
            shape = tuple(base_layer_of(layer).weight.shape)
            total = np.zeros(shape, np.float64)
            for name in layer.active_adapters:
                if name not in layer.lora_A:
                    continue
                a = _f64(layer.lora_A[name].weight.asnumpy())
                b = _f64(layer.lora_B[name].weight.asnumpy())
                d = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1) * float(layer.scaling[name])
                total += d.reshape(shape)
            out[(comp, path)] = total
    return out


def merge_into_models(models, loras) -> None:
    """Fuse ``loras`` into the base weights of live ``models``: ``W += sum(weight * delta)`` (float64, cast back).

    Adapters already on the models are left as they are (only their base weights change).
    """
    import mindspore as ms

    from mindone_lora_plugin.models import base_layer_of

    pairs = _pairs(loras)
    for comp in {c for s, _ in pairs for c in s.components}:
        if comp not in models:
            raise LoraError(f"the LoRA has weights for {comp} but the model has no {comp}: it was made for another "
                            f"architecture ({_arch_of(pairs) or 'unknown'} vs {models.architecture})")
    deltas = combined_deltas(pairs)
    cells = {comp: dict(cell.cells_and_names()) for comp, cell in models.items()
             if any(c == comp for c, _ in deltas)}
    for (comp, path), delta in deltas.items():
        layer = cells[comp].get(path)
        weight = getattr(base_layer_of(layer), "weight", None) if layer is not None else None
        if weight is None:
            raise LoraError(f"{comp}.{path} is not a module with a weight in this model; the LoRA was made for "
                            f"another model")
        w = _f64(weight.asnumpy())
        if delta.size != w.size:
            raise LoraError(f"shape mismatch at {comp}.{path}: the base weight is {list(w.shape)} but the LoRA "
                            f"implies {list(delta.shape)}; the LoRA was made for another base model")
        weight.set_data(ms.Tensor((w + delta.reshape(w.shape)).astype(np.float32), dtype=weight.dtype))


# ---------------------------------------------------------------------------------------------------- model folders


def merge_into_folder(model_dir: str, loras, out: str, dtype: str | None = None, overwrite: bool = False) -> str:
    """Write a copy of the diffusers-layout folder ``model_dir`` at ``out`` with ``loras`` fused into the UNet and text
    encoder weights; return ``out``.

    Pure numpy: each weights file is rewritten one tensor at a time (``W + sum(weight * delta)`` in float64, cast to
    the file's dtype, or to ``dtype`` = ``fp32``/``fp16``/``bf16``, which casts every floating tensor of the folder).
    Everything else (tokenizers, scheduler, VAE, configs) is copied. The folder is written under a temporary name and
    renamed into place, so ``out`` is either complete or absent. An ``out`` that exists and is not empty is refused
    unless ``overwrite``. Pickled weight files in merged components (they would keep the unmerged weights) are left out.
    """
    from mindone_lora_plugin.formats.plain import resolve_dtype

    info = BaseModelInfo.from_folder(model_dir)
    np_dtype = resolve_dtype(dtype) if dtype else None
    pairs = _pairs(loras)
    for state, _ in pairs:
        info.check_shapes(state)
    src_real, out_real = os.path.realpath(model_dir), os.path.realpath(out)
    if src_real == out_real or _inside(src_real, out_real) or _inside(out_real, src_real):
        raise LoraError(f"--out {out} must be a new folder outside the model folder {model_dir}")
    _check_out(out, overwrite)
    deltas = combined_deltas(pairs)
    by_comp: dict[str, dict[str, np.ndarray]] = {}
    for (comp, path), d in deltas.items():
        by_comp.setdefault(comp, {})[path + ".weight"] = d

    parent = os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        applied: dict[str, set[str]] = {c: set() for c in by_comp}
        for root, dirs, files in os.walk(model_dir, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(root, model_dir)
            comp = rel.split(os.sep)[0] if rel != "." else ""
            os.makedirs(os.path.join(tmp, rel), exist_ok=True)
            for fname in sorted(files):
                src = os.path.join(root, fname)
                dst = os.path.join(tmp, rel, fname)
                lower = fname.lower()
                if fname.startswith(".") or (fname == MERGE_RECORD and rel == "."):
                    continue
                if rel == "." and lower.endswith((".safetensors",) + _STALE_WEIGHT_SUFFIXES):
                    continue  # a single-file checkpoint next to the diffusers folders: not merged, so not copied
                if comp in COMPONENTS and lower.endswith(_STALE_WEIGHT_SUFFIXES):
                    continue
                if lower.endswith(".safetensors") and (comp in by_comp or np_dtype is not None):
                    done = _rewrite_weights(src, dst, by_comp.get(comp, {}), np_dtype)
                    if comp in applied:
                        applied[comp] |= done
                elif np_dtype is not None and fname == "config.json" and comp in COMPONENTS:
                    _write_config_dtype(src, dst, np_dtype)
                else:
                    shutil.copyfile(src, dst)
        for comp, keys in by_comp.items():
            missing = sorted(set(keys) - applied.get(comp, set()))
            if missing:
                raise LoraError(f"{len(missing)} weight(s) of the LoRA were not found in {model_dir}/{comp}, e.g. "
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
    if code == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
             "BOOL": np.bool_}
    if code not in table:
        raise LoraError(f"tensor dtype {code} is not supported when merging")
    return np.dtype(table[code])


def _rewrite_weights(src: str, dst: str, deltas: dict[str, np.ndarray], dtype) -> set[str]:
    """Copy the safetensors file ``src`` to ``dst`` adding ``deltas`` (weight name → float64 array) to the weights they
    name and casting floating tensors to ``dtype`` (None: keep). One tensor is in memory at a time. Returns the names
    changed."""
    from mindone_lora_plugin.formats.hashes import as_dtype, safetensors_dtype
    from mindone_lora_plugin.safetensors_io import read_header

    header, offset = read_header(src)
    metadata = header.get("__metadata__")
    names = [k for k in header if k != "__metadata__"]
    order = sorted(names, key=lambda k: header[k]["data_offsets"][0])
    out_codes = {k: (safetensors_dtype(dtype) if dtype is not None and header[k]["dtype"] in _FLOAT_CODES
                     else header[k]["dtype"]) for k in names}
    new_header: dict = {}
    if metadata is not None:
        new_header["__metadata__"] = metadata
    pos = 0
    for k in order:
        n = int(np.prod(header[k]["shape"], dtype=np.int64)) * _np_dtype(out_codes[k]).itemsize
        new_header[k] = {"dtype": out_codes[k], "shape": header[k]["shape"], "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(new_header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    changed = set()
    data = np.memmap(src, dtype=np.uint8, mode="r")
    try:
        with open(dst, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for k in order:
                info = header[k]
                begin, end = info["data_offsets"]
                src_dt = _np_dtype(info["dtype"])
                arr = np.frombuffer(data[offset + begin: offset + end], dtype=src_dt).reshape(info["shape"])
                if k in deltas:
                    d = deltas[k]
                    if d.size != arr.size:
                        raise LoraError(f"shape mismatch at {k} in {src}: the weight is {list(arr.shape)} but the "
                                        f"LoRA implies {list(d.shape)}")
                    arr = as_dtype(_f64(arr) + d.reshape(arr.shape), src_dt)
                    changed.add(k)
                target = _np_dtype(out_codes[k])
                if arr.dtype != target:
                    arr = as_dtype(arr, target)
                f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
    finally:
        del data
    return changed


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


# ---------------------------------------------------------------------------------------------------- one LoRA file


def pick_format(out: str, format: str | None = None, formats=None):
    """The format to write a combined LoRA with: ``format`` by name; else diffusers for a folder (or a
    ``pytorch_lora_weights.safetensors`` name), kohya for any other ``.safetensors`` file."""
    known = _formats(formats)
    if format is None:
        base = os.path.basename(out.rstrip(os.sep))
        ext = os.path.splitext(base)[1].lower()
        if base == "pytorch_lora_weights.safetensors" or not ext or os.path.isdir(out):
            format = "diffusers"
        elif ext == ".safetensors":
            format = "kohya"
        else:
            raise LoraError(f"cannot tell the format from {out}: give a .safetensors file (kohya), a folder "
                            f"(diffusers) or --format")
    if format not in known:
        raise LoraError(f"unknown LoRA format '{format}'; choose one of: {', '.join(sorted(known))}")
    return known[format]


def write_lora(state: LoraState, out: str, format: str | None = None, dtype: str | None = None,
               overwrite: bool = False, formats=None, output_name: str | None = None) -> str:
    """Write ``state`` to ``out`` with a format (see :func:`pick_format`), refusing an existing file unless
    ``overwrite``; return the path written."""
    fmt = pick_format(out, format, formats)
    name = output_name or os.path.splitext(os.path.basename(out.rstrip(os.sep)))[0] or "lora"
    if name == "pytorch_lora_weights":
        name = "lora"
    target = fmt.output_path(out, name) if hasattr(fmt, "output_path") else out
    if not overwrite and output_is_taken(target):
        raise LoraError(f"the output {target} already exists; choose another --out or pass --overwrite to replace it")
    return fmt.write(state, out, dtype=dtype, output_name=name)


def write_concatenated(loras, out: str, format: str | None = None, dtype: str | None = None,
                       overwrite: bool = False, formats=None, output_name: str | None = None) -> str:
    """:func:`concat_loras` written with :func:`write_lora`; return the path written."""
    return write_lora(concat_loras(loras), out, format, dtype, overwrite, formats, output_name)


# ---------------------------------------------------------------------------------------------------- generation


@dataclass
class GeneratedImage:
    image: object  # PIL.Image
    seed: int
    metadata: dict[str, str] = field(default_factory=dict)


def load_pipeline(model_dir: str, loras=(), dtype: str | None = None):
    """A mindone ``StableDiffusionPipeline`` (SD1.x/2.x) or ``StableDiffusionXLPipeline`` from a diffusers-layout
    folder, with ``loras`` applied at once (:func:`apply_loras`). No safety checker is loaded.

    Call :func:`mindone_lora_plugin.runtime.setup` first (it turns the CPU backend on when the target is CPU).
    """
    from mindone_lora_plugin.runtime import quiet_mindone_imports

    info = BaseModelInfo.from_folder(model_dir)
    quiet_mindone_imports()
    from mindone.diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kw = {}
    if dtype:
        import mindspore as ms

        kw["mindspore_dtype"] = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[dtype]
    if info.architecture == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, **kw)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, **kw)
    pipe.lora_adapter_names = []
    if loras:
        pipe.lora_adapter_names = apply_loras(pipeline_models(pipe, info.architecture), loras)
    return pipe


def pipeline_models(pipe, architecture: str | None = None):
    """The UNet and text encoders of a pipeline as :class:`~mindone_lora_plugin.models.Models`."""
    from mindone_lora_plugin.models import Models

    return Models(unet=pipe.unet, text_encoder=getattr(pipe, "text_encoder", None),
                  text_encoder_2=getattr(pipe, "text_encoder_2", None), architecture=architecture)


def generate_images(pipe, prompt: str, negative_prompt: str | None = None, num_images: int = 1, steps: int = 30,
                    guidance_scale: float = 7.5, seed: int = 0, height: int | None = None, width: int | None = None,
                    batch_size: int = 4, progress: bool = True) -> list[GeneratedImage]:
    """Generate ``num_images`` images, ``batch_size`` per pipeline call.

    Image ``i`` starts from the noise of seed ``seed + i`` (one numpy generator per image), so ``--num_images 1
    --seed S`` reproduces any image alone. Runs in PyNative mode; shows the pipeline's progress bar per batch unless
    ``progress`` is False.
    """
    import mindspore as ms

    if num_images < 1 or steps < 1 or batch_size < 1:
        raise LoraError("the number of images, steps and the batch size must be at least 1")
    for what, v in (("--height", height), ("--width", width)):
        if v is not None and (v < 8 or v % 8):
            raise LoraError(f"{what} {v} must be a positive multiple of 8")
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    out = []
    try:
        for start in range(0, num_images, batch_size):
            seeds = [int(seed) + i for i in range(start, min(num_images, start + batch_size))]
            desc = f"images {start + 1}-{start + len(seeds)}/{num_images}" if len(seeds) > 1 else \
                f"image {start + 1}/{num_images}"
            pipe.set_progress_bar_config(disable=not progress, desc=desc)
            gens = [np.random.Generator(np.random.PCG64(s)) for s in seeds]
            result = pipe([prompt] * len(seeds), negative_prompt=[negative_prompt] * len(seeds) if negative_prompt
                          else None, num_inference_steps=int(steps), guidance_scale=float(guidance_scale),
                          height=height, width=width, num_images_per_prompt=1,
                          generator=gens if len(gens) > 1 else gens[0])
            images = result[0] if isinstance(result, (tuple, list)) else result.images
            out.extend(GeneratedImage(im, s) for im, s in zip(images, seeds))
    finally:
        ms.set_context(mode=mode)
    return out


def image_metadata(prompt: str, negative_prompt: str | None, seed: int, steps: int, guidance_scale: float,
                   size: tuple[int, int], model: str, loras, sampler: str = "") -> dict[str, str]:
    """The PNG text chunks written with every image: separate keys, plus an A1111-style ``parameters`` entry (the
    LoRAs as ``<lora:name:weight>`` tags) that A1111/Forge "PNG info" tools read."""
    from mindone_lora_plugin import __version__

    loras = _as_list(loras)
    listed = [lo.describe() if isinstance(lo, WeightedLora) else {"weight": w}
              for lo, (_, w) in zip(loras, _pairs(loras))]
    tags = " ".join(f"<lora:{d.get('name', 'lora')}:{_num(d['weight'])}>" for d in listed)
    w, h = size
    params = (f"{prompt}{' ' + tags if tags else ''}\nNegative prompt: {negative_prompt or ''}\n"
              f"Steps: {steps}, Sampler: {sampler or 'default'}, CFG scale: {_num(guidance_scale)}, Seed: {seed}, "
              f"Size: {w}x{h}, Model: {os.path.basename(os.path.normpath(model))}")
    return {"parameters": params, "prompt": prompt, "negative_prompt": negative_prompt or "", "seed": str(seed),
            "steps": str(steps), "guidance_scale": _num(guidance_scale), "width": str(w), "height": str(h),
            "model": os.path.abspath(model), "loras": json.dumps(listed), "software": f"mindone-lora {__version__}"}


def _num(x: float) -> str:
    return f"{float(x):g}"


def save_png(image, path: str, metadata: dict[str, str] | None = None) -> str:
    """Save a PIL image as PNG with text metadata, atomically."""
    from PIL import PngImagePlugin

    from mindone_lora_plugin.safetensors_io import atomic_path

    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
