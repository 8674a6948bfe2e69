"""Fusing LoRAs into a single-file checkpoint: the merged model written as one file in the checkpoint's own
(original) layout, what A1111, Forge and ComfyUI load.

The base file is read through a memory map and written tensor by tensor: a tensor that holds adapted weights (the
architecture says which diffusers modules each source key holds, and how: :meth:`~mindone_lora_plugin.architectures.
base.Architecture.single_file_sources`) gets each module's change added in float64, in place through views of the
same array (a fused q/k/v tensor gets three); every floating tensor is cast to ``dtype`` (fp16 by default). The
header metadata (kohya ``ss_*``, ``modelspec.*``) is kept, plus a record of the LoRAs merged. Peak memory stays near
the largest tensor.
"""

from __future__ import annotations

import json

import numpy as np

from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.compose.maths import _as_list, _f64, grouped_modules, module_change, module_shape
from mindone_lora_plugin.compose.specs import WeightedLora, _pairs
from mindone_lora_plugin.dtypes import FLOAT_CODES
from mindone_lora_plugin.errors import LoraError

RECORD_KEY = "mindone_lora.merged"


def _view(arr: np.ndarray, how):
    """The part of a source tensor that one diffusers weight is (a view, so changes land in ``arr``)."""
    if how is None:
        return arr
    if how == "linear":
        return arr.reshape(arr.shape[:2])
    if how == "t":
        return arr.T
    _, i, n = how
    part = arr.shape[0] // n
    return arr[i * part:(i + 1) * part]


def merge_into_file(model_file: str, loras, out: str, dtype: str | None = "fp16", overwrite: bool = False,
                    config: str | None = None) -> str:
    """Write ``model_file`` (a single-file checkpoint) with ``loras`` fused into its adapted components at
    ``out``, in the same layout, floating tensors in ``dtype`` (None: keep); return ``out``."""
    import os

    from mindone_lora_plugin.architectures import get_architecture
    from mindone_lora_plugin.dtypes import as_dtype, from_code, numpy_dtype, safetensors_dtype
    from mindone_lora_plugin.model_files import resolve_model
    from mindone_lora_plugin.safetensors_io import StreamWriter, as_bytes, read_header

    if os.path.lexists(out) and not overwrite:
        raise LoraError(f"the output {out} already exists; choose another --out or pass --overwrite to replace it")
    if os.path.isdir(out):
        raise LoraError(f"the output {out} is a folder; a single-file output must be a .safetensors file")
    if os.path.realpath(out) == os.path.realpath(model_file):
        raise LoraError(f"--out {out} is the base model itself; write the merged model to a new file")
    folder = resolve_model(model_file, config=config)
    info = BaseModelInfo.from_folder(folder)
    arch = get_architecture(info.architecture)
    pairs = _pairs(loras)
    for state, _ in pairs:
        info.check_shapes(state)
    changes = {(comp, path + ".weight"): (path, parts) for (comp, path), parts in grouped_modules(pairs).items()}
    header, offset = read_header(model_file)
    sources = arch.single_file_sources(model_file, header, folder)
    np_dtype = numpy_dtype(dtype) if dtype else None
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    codes = {k: safetensors_dtype(np_dtype) if np_dtype is not None and header[k]["dtype"] in FLOAT_CODES
             else header[k]["dtype"] for k in names}
    entries = [(k, codes[k], tuple(header[k]["shape"]),
                int(np.prod(header[k]["shape"], dtype=np.int64)) * from_code(codes[k]).itemsize) for k in names]
    metadata = dict(header.get("__metadata__") or {})
    metadata[RECORD_KEY] = json.dumps([lo.describe() if isinstance(lo, WeightedLora) else {"weight": w}
                                       for lo, (_, w) in zip(_as_list(loras), pairs)])
    applied = set()
    data = np.memmap(model_file, dtype=np.uint8, mode="r")
    with StreamWriter(out, entries, metadata) as w:
        for k in names:
            info_k = header[k]
            begin, end = info_k["data_offsets"]
            arr = data[offset + begin: offset + end].view(from_code(info_k["dtype"])).reshape(info_k["shape"])
            pieces = [(c, n, how) for c, n, how in sources.get(k, ()) if (c, n) in changes]
            if pieces:
                merged = _f64(arr).copy()
                for comp, name, how in pieces:
                    path, parts = changes[(comp, name)]
                    view = _view(merged, how)
                    implied = module_shape(parts)
                    if int(np.prod(implied)) != view.size:
                        raise LoraError(f"shape mismatch at {k} ({comp}.{path}) in {model_file}: the weight is "
                                        f"{list(view.shape)} but the LoRA implies {list(implied)}")
                    view += module_change(comp, path, parts, view.reshape(implied)).reshape(view.shape)
                    applied.add((comp, name))
                arr = merged
            w.write(as_bytes(as_dtype(arr, from_code(codes[k]))))
        missing = sorted(f"{c}.{n}" for c, n in set(changes) - applied)
        if missing:
            raise LoraError(f"{len(missing)} weight(s) of the LoRA were not found in {model_file}, e.g. "
                            f"{', '.join(missing[:3])}")
    return out
