"""kohya's ``sshs_model_hash`` / ``sshs_legacy_hash``, and a safetensors writer that computes them on the way.

kohya (``library/train_util.py``, ``precalculate_safetensors_hashes``) serialises the final tensors — after the save
dtype cast — together with only the ``ss_*`` metadata into an in-memory safetensors buffer, then:

* ``sshs_model_hash`` = hex sha256 of that buffer after the header (the data section). It depends only on the tensors
  (names, dtypes, shapes, bytes), so it equals the data-section hash of the final file. A1111 uses it as the file hash.
* ``sshs_legacy_hash`` = the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB of that buffer (empty input,
  ``e3b0c442``, for buffers shorter than 1 MiB). The header is part of the buffer, so this depends on the length of the
  ``ss_*``-only header.

Neither needs the buffer: the data section is hashed straight from the tensors in safetensors' data order (dtype
alignment, then name), and the ``ss_*``-only header is built here only to learn its length (and its bytes, in the
unlikely case the 1 MiB window reaches into it). :func:`save_with_sshs` writes the final file with the package's one
writer (:class:`~mindone_lora_plugin.safetensors_io.StreamWriter`) in one pass over the tensors, hashing in a second
thread while writing, and patches the two hashes into the header at the end (hex digests have a fixed length, so the
header does not move). Memory stays at the tensors plus the one being cast.
"""

from __future__ import annotations

import hashlib
import queue
import struct
import threading

import numpy as np

from mindone_lora_plugin.dtypes import as_dtype
from mindone_lora_plugin.safetensors_io import StreamWriter, as_bytes, header_bytes, layout, tensor_json

#: bytes read per hashing batch; files of at least THREAD_BYTES hash in a thread pool
BATCH_BYTES = 4 << 20
THREAD_BYTES = 16 << 20
LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class _SshsHasher:
    """Feeds tensor bytes in data order; knows where kohya's 1 MiB legacy window falls."""

    def __init__(self, ss_header: bytes):
        self.sha = hashlib.sha256()
        prefix = struct.pack("<Q", len(ss_header)) + ss_header
        # window in buffer coordinates; the part inside the header comes from the header bytes
        self.legacy = bytearray(prefix[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH])
        self.win_begin = max(0, LEGACY_OFFSET - len(prefix))  # in data coordinates
        self.win_end = LEGACY_OFFSET + LEGACY_LENGTH - len(prefix)
        self.pos = 0

    def update(self, buf: np.ndarray) -> None:
        n = buf.size
        self.sha.update(memoryview(buf))
        lo, hi = max(self.win_begin, self.pos), min(self.win_end, self.pos + n)
        if lo < hi:
            self.legacy += buf[lo - self.pos:hi - self.pos].tobytes()
        self.pos += n

    def digests(self) -> tuple[str, str]:
        return self.sha.hexdigest(), hashlib.sha256(bytes(self.legacy)).hexdigest()[:8]


def ss_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}


def sshs_hashes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` of ``tensors`` (already in their save dtype), as kohya computes them."""
    entries = layout(tensors)
    hasher = _SshsHasher(header_bytes(entries, ss_metadata(metadata)))
    for name, *_ in entries:
        hasher.update(as_bytes(tensors[name]))
    return hasher.digests()


def save_with_sshs(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str], dtype=None) -> tuple[str, str]:
    """Write a safetensors file atomically with ``metadata`` plus kohya's ``sshs_model_hash``/``sshs_legacy_hash``.

    ``dtype`` (a numpy dtype or None) casts every tensor, one at a time, while writing. Returns the two hashes.
    """
    entries = layout(tensors, dtype)
    meta = {k: str(v) for k, v in metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    hasher = _SshsHasher(header_bytes(entries, ss_metadata(meta), tensor_json(entries)))
    placeholder = dict(meta, sshs_model_hash="0" * 64, sshs_legacy_hash="0" * 8)

    # the hashing thread gets the written buffers in batches of ~4 MiB (few hand-overs, little memory held)
    work: queue.Queue = queue.Queue(maxsize=8)
    failure: list[BaseException] = []

    def consume():
        try:
            while True:
                batch = work.get()
                if batch is None:
                    return
                for buf in batch:
                    hasher.update(buf)
        except BaseException as e:  # reported by the writer below
            failure.append(e)
            while work.get() is not None:
                pass

    threaded = sum(e[3] for e in entries) >= THREAD_BYTES  # small files: a thread costs more than it saves
    worker = threading.Thread(target=consume, name="sshs-hash", daemon=True)
    if threaded:
        worker.start()
    done = not threaded
    try:
        with StreamWriter(path, entries, placeholder) as w:
            batch, batch_bytes = [], 0
            for name, *_ in entries:
                buf = as_bytes(as_dtype(tensors[name], dtype))
                w.write(buf)
                if not threaded:
                    hasher.update(buf)
                    continue
                batch.append(buf)
                batch_bytes += buf.size
                if batch_bytes >= BATCH_BYTES:
                    work.put(batch)
                    batch, batch_bytes = [], 0
            if threaded:
                work.put(batch)
                work.put(None)
                done = True
                worker.join()
            if failure:
                raise failure[0]
            model_hash, legacy_hash = hasher.digests()
            w.rewrite_metadata(dict(meta, sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash))
    finally:
        if not done:
            work.put(None)
        if threaded:
            worker.join()
    return model_hash, legacy_hash
