"""Safe, validated safetensors I/O and atomic writes.

Only safetensors is ever read: pickle-based files (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can run code when loaded and
are refused. Headers are checked before the ``safetensors`` library sees the file, so an empty, truncated or garbage
file ends in one clear :class:`LoraError` instead of a Rust panic. Writes go to a temporary file in the same folder and
are renamed into place, so a crash never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import struct
from contextlib import contextmanager

import numpy as np

from mindone_lora_plugin.dtypes import CODE_SIZES, from_code
from mindone_lora_plugin.errors import LoraError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024


def refuse_pickle(path: str) -> None:
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise LoraError(f"{path} is a pickle-based file, which can run arbitrary code when loaded; only .safetensors "
                        f"files are read. Convert it to safetensors with a tool you trust first")


def read_header(path: str) -> tuple[dict, int]:
    """Return ``(header, data_offset)`` after checking that ``path`` is a complete safetensors file."""
    refuse_pickle(path)
    if os.path.isdir(path):
        raise LoraError(f"{path} is a directory; pass the .safetensors file inside it")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LoraError(f"{path} is {'empty' if size == 0 else 'too short'} ({size} bytes): not a safetensors "
                                f"file; re-download or re-save it")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise LoraError(f"{path} is not a safetensors file or is truncated (header length {n}, file size "
                                f"{size}); re-download or re-save it")
            raw = f.read(n)
    except FileNotFoundError:
        raise LoraError(f"{path} does not exist") from None
    except PermissionError:
        raise LoraError(f"cannot read {path}: permission denied") from None
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" "))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError):
        raise LoraError(f"{path} has a garbage safetensors header: not a safetensors file, or corrupted") from None
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            expected = math.prod(int(d) for d in info["shape"]) * CODE_SIZES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise LoraError(f"{path} has a malformed entry for '{key}' in its header: the file is corrupted") from None
        if end > data_len or end - begin != expected:
            raise LoraError(f"{path} is truncated or corrupted: tensor '{key}' lies outside the file's data "
                            f"({end} > {data_len} bytes); re-download or re-save it")
    return header, 8 + n


def read_metadata(path: str) -> dict[str, str]:
    header, _ = read_header(path)
    return dict(header.get("__metadata__") or {})


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load every tensor of a checked safetensors file as numpy arrays, plus its string metadata.

    The file is read with one ``readinto`` into a single buffer and each tensor is a view of its byte range (the
    layout the header describes, already checked by :func:`read_header`): one pass over the disk, no memory map, and
    peak memory about the file's size.
    """
    header, offset = read_header(path)
    size = os.path.getsize(path) - offset
    buf = bytearray(size)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(buf)) != size:
                raise LoraError(f"{path} changed while it was read; read it again")
    except OSError as e:
        raise LoraError(f"cannot read {path}: {e.strerror or e}") from None
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _numpy_dtype(info["dtype"], key, path)
        count = (end - begin) // dtype.itemsize
        tensors[key] = np.frombuffer(buf, dtype=dtype, count=count, offset=begin).reshape(info["shape"])
    return tensors, dict(header.get("__metadata__") or {})


def _numpy_dtype(code: str, key: str, path: str) -> np.dtype:
    found = from_code(code)
    if found is None:
        raise LoraError(f"{path}: tensor '{key}' has dtype {code}, which LoRA weights never use; the file is not a LoRA")
    return found


def save(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to ``path`` (not yet created); on success it is renamed to ``path``, on error
    removed."""
    folder = os.path.dirname(os.path.abspath(path))
    # a fresh name that the writer creates: re-opening an existing empty file with truncation makes ext4 flush the
    # data to disk on close, which costs a plain save's time again
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise LoraError(f"cannot write {path}: {e.strerror or e}; choose a writable location") from None
    try:
        yield tmp
        os.chmod(tmp, _default_mode())  # some writers (safetensors' save_file) create 0600 files: use the umask
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise LoraError(f"cannot write {path}: {e.strerror or e}; choose a writable location") from None
    except BaseException:
        _unlink(tmp)
        raise


def _default_mode() -> int:
    """``0666`` less the process umask: the permissions ``open()`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
