"""Safe, validated safetensors I/O and atomic writes.

Only safetensors is ever read: pickle-based files (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can run code when loaded and
are refused. Headers are checked before the ``safetensors`` library sees the file, so an empty, truncated or garbage
file ends in one clear :class:`LoraError` instead of a Rust panic. Writes go to a temporary file in the same folder and
are renamed into place, so a crash never leaves a half-written file where a good one was.

This module holds the package's one safetensors writer (:class:`StreamWriter`): it writes the header safetensors
itself would write, then the tensors one at a time, so a file is never built in memory. :func:`save` (LoRA files,
checkpoints, caches), kohya's hashing writer (``formats/hashes.py``) and ``merge``'s weight rewrite all use it.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import uuid
from contextlib import contextmanager

import numpy as np

from mindone_lora_plugin.dtypes import CODE_SIZES, SAFETENSORS_ENUM_ORDER, as_dtype, from_code, safetensors_dtype
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
    buf = np.empty(size, np.uint8)  # not zeroed: every byte is read into it
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
        tensors[key] = buf[begin:begin + count * dtype.itemsize].view(dtype).reshape(info["shape"])
    return tensors, dict(header.get("__metadata__") or {})


def _numpy_dtype(code: str, key: str, path: str) -> np.dtype:
    found = from_code(code)
    if found is None:
        raise LoraError(f"{path}: tensor '{key}' has dtype {code}, which LoRA weights never use; "
                        f"the file is not a LoRA")
    return found


def save(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None, dtype=None) -> str:
    """Write ``tensors`` to ``path`` atomically, byte for byte as ``safetensors.numpy.save_file`` would (``dtype``: a
    numpy dtype every tensor is cast to, one at a time, while writing; None keeps each tensor's own)."""
    metadata = {k: str(v) for k, v in metadata.items()} if metadata else None
    entries = layout(tensors, dtype)
    with StreamWriter(path, entries, metadata) as w:
        for name, *_ in entries:
            w.write(as_bytes(as_dtype(tensors[name], dtype)))
    return path


# ---------------------------------------------------------------------------------------------- the one writer

_RANK = {code: i for i, code in enumerate(SAFETENSORS_ENUM_ORDER)}


def layout(tensors: dict, dtype=None) -> list[tuple[str, str, tuple, int]]:
    """``[(name, dtype code, shape, nbytes)]`` in safetensors' data order (descending dtype, then name) for
    ``tensors`` saved in ``dtype`` (None: each tensor's own dtype)."""
    specs = {}
    for k, v in tensors.items():
        dt = np.dtype(dtype if dtype is not None else v.dtype)
        specs[k] = (safetensors_dtype(dt), tuple(int(s) for s in np.shape(v)), dt.itemsize)
    order = sorted(specs, key=lambda n: (-_RANK[specs[n][0]], n))
    return [(k, specs[k][0], specs[k][1], math.prod(specs[k][1]) * specs[k][2]) for k in order]


def tensor_json(entries) -> str:
    """The tensor part of a header for ``entries`` (in the order their data is written)."""
    out, offset = [], 0
    for name, code, shape, nbytes in entries:
        shape_s = ",".join(str(int(s)) for s in shape)
        out.append(f'{_js(name)}:{{"dtype":"{code}","shape":[{shape_s}],"data_offsets":[{offset},{offset + nbytes}]}}')
        offset += nbytes
    return ",".join(out)


def header_bytes(entries, metadata: dict[str, str] | None, tensor_part: str | None = None) -> bytes:
    """The padded JSON header safetensors writes for ``entries`` and ``metadata`` (None: no ``__metadata__``).

    ``tensor_part`` (from :func:`tensor_json`) saves rebuilding the tensor part when only the metadata changes.
    """
    parts = []
    if metadata is not None:
        inner = ",".join(f"{_js(k)}:{_js(v)}" for k, v in sorted(metadata.items()))
        parts.append(f'"__metadata__":{{{inner}}}')
    tj = tensor_part if tensor_part is not None else tensor_json(entries)
    if tj:
        parts.append(tj)
    raw = ("{" + ",".join(parts) + "}").encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


_PLAIN = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII without '"' and '\\': JSON needs no escapes


def _js(s: str) -> str:
    if not isinstance(s, str):
        raise TypeError(f"safetensors metadata must be strings, got {type(s).__name__}")
    if _PLAIN.fullmatch(s):
        return f'"{s}"'
    return json.dumps(s, ensure_ascii=False)


def as_bytes(arr: np.ndarray) -> np.ndarray:
    """``arr``'s little-endian bytes as a flat uint8 view (a copy only when the byte order must change)."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.reshape(-1).view(np.uint8)


class StreamWriter:
    """An atomic safetensors file written tensor by tensor::

        with StreamWriter(path, entries, metadata) as w:   # entries from layout(), or any order of your own
            for name, *_ in entries:
                w.write(as_bytes(tensor_of(name)))
            w.rewrite_metadata(final)                      # optional: same header length, patched in place

    The header is written first; the data must come in the order of ``entries`` and add up to their sizes (checked on
    exit). On any error the temporary file is removed and ``path`` is untouched.
    """

    def __init__(self, path: str, entries, metadata: dict[str, str] | None):
        self.path, self.entries = path, list(entries)
        self._tensor_part = tensor_json(self.entries)
        self.header = header_bytes(self.entries, metadata, self._tensor_part)
        self._expected = sum(e[3] for e in self.entries)
        self._written = 0

    def __enter__(self) -> "StreamWriter":
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        try:
            self._f = open(tmp, "wb")
            self._f.write(struct.pack("<Q", len(self.header)))
            self._f.write(self.header)
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, buf: np.ndarray) -> None:
        self._f.write(memoryview(buf))
        self._written += buf.size

    def rewrite_metadata(self, metadata: dict[str, str] | None) -> None:
        header = header_bytes(self.entries, metadata, self._tensor_part)
        if len(header) != len(self.header):
            raise ValueError("rewrite_metadata must keep the header's length")
        pos = self._f.tell()
        self._f.seek(8)
        self._f.write(header)
        self._f.seek(pos)
        self.header = header

    def __exit__(self, exc_type, exc, tb):
        try:
            self._f.close()
            if exc_type is None and self._written != self._expected:
                raise AssertionError(f"{self.path}: wrote {self._written} bytes of tensor data, the header says "
                                     f"{self._expected}")
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())  # removes the temporary file (and may turn OSError into LoraError)
            raise
        return self._atomic.__exit__(exc_type, exc, tb)


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
