"""The one dtype table: user-facing names (``fp32``/``fp16``/``bf16`` and aliases), numpy and MindSpore dtypes, and
safetensors' dtype codes, with bfloat16 of any origin (ml_dtypes' or MindSpore's numpy type) handled.

Every module that turns a dtype name, a safetensors code or a bfloat16 array into something else asks this module.
"""

from __future__ import annotations

import functools

import numpy as np

from mindone_lora_plugin.errors import LoraError

SAVE_DTYPES = ("fp32", "fp16", "bf16")  # what --save_dtype / --dtype accept everywhere

# any spelling a user or a file may use → the canonical numpy name
ALIASES = {"fp32": "float32", "float32": "float32", "float": "float32", "fp16": "float16", "float16": "float16",
           "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}

# safetensors code → numpy dtype string (BF16 and the 8-bit floats come from ml_dtypes, see :func:`from_code`)
_CODE_TO_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                  "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8"}
# safetensors code → bytes per element
CODE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
# numpy dtype name → safetensors code
_NUMPY_TO_CODE = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
                  "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32", "float64": "F64",
                  "int64": "I64", "uint64": "U64", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3"}
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
# safetensors' Rust Dtype enum in declaration order: a file's data is laid out by descending enum value, then by name
SAFETENSORS_ENUM_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16",
                          "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")


def canonical(name: str) -> str | None:
    """``fp16``/``half``/... → ``float16`` (None for a name that is no floating save dtype)."""
    return ALIASES.get(str(name).lower())


def numpy_dtype(name: str | None):
    """``fp32``/``fp16``/``bf16`` (or an alias; None: keep → None) → a numpy dtype (bf16 through ml_dtypes)."""
    if name is None:
        return None
    key = canonical(name)
    if key is None:
        raise LoraError(f"unknown save dtype '{name}'; choose one of: {', '.join(SAVE_DTYPES)}")
    if key == "bfloat16":
        return bfloat16()
    return np.dtype(key)


def mindspore_dtype(name: str | None):
    """``fp32``/``fp16``/``bf16`` (or an alias; None → float32) → the MindSpore dtype."""
    import mindspore as ms

    key = "float32" if name is None else canonical(name)
    if key is None:
        raise LoraError(f"unknown dtype '{name}'; choose one of: {', '.join(SAVE_DTYPES)}")
    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[key]


def bfloat16() -> np.dtype:
    """ml_dtypes' numpy bfloat16."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def from_code(code: str) -> np.dtype | None:
    """A safetensors dtype code → numpy dtype; None for codes LoRA and model weights never use (8-bit floats...)."""
    if code == "BF16":
        return bfloat16()
    found = _CODE_TO_NUMPY.get(code)
    return None if found is None else np.dtype(found)


@functools.lru_cache(maxsize=None)
def safetensors_dtype(dtype) -> str:
    """A numpy dtype → its safetensors code."""
    name = np.dtype(dtype).name
    if name not in _NUMPY_TO_CODE:
        raise ValueError(f"dtype {name} cannot be stored in safetensors")
    return _NUMPY_TO_CODE[name]


@functools.lru_cache(maxsize=None)
def standard_dtype(dtype) -> np.dtype:
    """``dtype``, with any bfloat16 as ml_dtypes' (MindSpore registers a second numpy bfloat16 that numpy cannot cast
    to or from ml_dtypes' one; the bytes are the same)."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return bfloat16()
    return dtype


def as_dtype(arr: np.ndarray, dtype=None) -> np.ndarray:
    """``arr`` cast to ``dtype`` (None: kept), with bfloat16 arrays of any origin handled."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "V":
        std = standard_dtype(arr.dtype)
        if std is not arr.dtype and std != arr.dtype:
            arr = arr.view(std)
    if dtype is None:
        return arr
    dtype = standard_dtype(dtype)
    return arr if arr.dtype == dtype else arr.astype(dtype)
