"""kohya's sshs_model_hash / sshs_legacy_hash (reference §4.2) against a straightforward computation."""

import hashlib
import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save

from mindone_lora_plugin.formats.hashes import EMPTY_SHA256, save_with_sshs, sshs_hashes
from mindone_lora_plugin.safetensors_io import header_bytes, layout


def reference_hashes(tensors, metadata):
    """kohya's precalculate_safetensors_hashes, literally: serialise with the ss_* metadata only, then hash."""
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    buf = save(tensors, metadata=ss)
    n = struct.unpack("<Q", buf[:8])[0]
    model_hash = hashlib.sha256(buf[8 + n:]).hexdigest()
    legacy = hashlib.sha256(buf[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


def make_tensors(rng, n, dtypes, max_dim=300):
    out = {}
    for i in range(n):
        dt = dtypes[int(rng.integers(0, len(dtypes)))]
        shape = tuple(int(s) for s in rng.integers(1, max_dim, size=int(rng.integers(0, 3))))
        out[f"lora_unet_m{i}.lora_down.weight"] = rng.standard_normal(shape).astype(dt)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference(seed):
    rng = np.random.default_rng(seed)
    tensors = make_tensors(rng, int(rng.integers(5, 40)), [np.float32, np.float16, ml_dtypes.bfloat16])
    meta = {"ss_network_dim": "4", "ss_tag_frequency": '{"a": {"é\\n": 3}}' * int(rng.integers(1, 50)),
            "modelspec.title": "not hashed", "ss_output_name": "x\u2028\"y\x01"}
    assert sshs_hashes(tensors, meta) == reference_hashes(tensors, meta)
    entries = layout(tensors)
    ss = {k: v for k, v in meta.items() if k.startswith("ss_")}
    assert len(header_bytes(entries, ss)) == struct.unpack("<Q", save(tensors, metadata=ss)[:8])[0]


def test_legacy_window_inside_header():
    """ss_* metadata over 1 MiB puts kohya's legacy window in the header; still matches."""
    rng = np.random.default_rng(0)
    tensors = make_tensors(rng, 10, [np.float16])
    meta = {"ss_tag_frequency": "x" * 1_100_000}
    assert sshs_hashes(tensors, meta) == reference_hashes(tensors, meta)
    meta = {"ss_tag_frequency": "y" * 1_040_000}  # the window straddles header and data
    assert sshs_hashes(tensors, meta) == reference_hashes(tensors, meta)


def test_small_file_legacy_is_empty_hash():
    tensors = {"a.alpha": np.array(1.0, np.float32)}
    assert sshs_hashes(tensors, {})[1] == EMPTY_SHA256[:8] == "e3b0c442"


def test_model_hash_ignores_non_ss_metadata_and_order():
    rng = np.random.default_rng(3)
    tensors = make_tensors(rng, 12, [np.float32, np.float16])
    reversed_tensors = dict(reversed(list(tensors.items())))
    a = sshs_hashes(tensors, {"ss_a": "1", "modelspec.title": "t1"})
    b = sshs_hashes(reversed_tensors, {"ss_a": "1", "modelspec.title": "t2"})
    assert a == b


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("dtype", [None, np.float32, np.float16, ml_dtypes.bfloat16])
def test_save_with_sshs_writes_a_valid_file(tmp_path, monkeypatch, dtype, threaded):
    from mindone_lora_plugin.formats import hashes

    monkeypatch.setattr(hashes, "THREAD_BYTES", 0 if threaded else 1 << 40)
    monkeypatch.setattr(hashes, "BATCH_BYTES", 100_000)
    rng = np.random.default_rng(5)
    tensors = make_tensors(rng, 30, [np.float32], max_dim=400)
    meta = {"ss_output_name": "n", "ss_network_dim": "4", "modelspec.title": "t"}
    path = str(tmp_path / "f.safetensors")
    model_hash, legacy = save_with_sshs(tensors, path, meta, dtype=None if dtype is None else np.dtype(dtype))
    saved = {k: v if dtype is None else v.astype(dtype) for k, v in tensors.items()}
    assert (model_hash, legacy) == reference_hashes(saved, meta)
    with safe_open(path, "numpy") as f:
        md = f.metadata()
        assert md["sshs_model_hash"] == model_hash and md["sshs_legacy_hash"] == legacy
        assert md["modelspec.title"] == "t" and md["ss_output_name"] == "n"
        for k in f.keys():
            got = f.get_tensor(k)
            assert got.dtype.name == saved[k].dtype.name
            assert np.array_equal(got.reshape(-1).view(np.uint8), saved[k].reshape(-1).view(np.uint8))
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    assert hashlib.sha256(raw[8 + n:]).hexdigest() == model_hash
    assert raw[8:8 + n] == header_bytes(layout(saved), dict(meta, sshs_model_hash=model_hash,
                                                               sshs_legacy_hash=legacy))


def test_kohya_file_hashes_match_reference(tmp_path, sd_fakes):
    from mindone_lora_plugin import safetensors_io
    from mindone_lora_plugin.formats.kohya import KohyaFormat

    random_state, tiny_sdxl = sd_fakes.random_state, sd_fakes.tiny_sdxl

    state = random_state(tiny_sdxl(), np.random.default_rng(9), ranks=(16, 32))
    for dtype in ("fp32", "fp16", "bf16"):
        path = KohyaFormat().write(state, str(tmp_path / f"k_{dtype}.safetensors"), dtype=dtype,
                                   metadata={"ss_learning_rate": "0.0001", "ss_tag_frequency": "{}"})
        tensors, meta = safetensors_io.load(path)
        assert sum(t.nbytes for t in tensors.values()) > 0x110000  # the legacy window lies in the data
        without = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
        assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == reference_hashes(tensors, without)


def test_save_with_sshs_failure_leaves_nothing(tmp_path, monkeypatch):
    """A failure half-way through writing: no file, no temporary file, the hashing thread ends."""
    import threading

    from mindone_lora_plugin.formats import hashes

    monkeypatch.setattr(hashes, "THREAD_BYTES", 0)
    monkeypatch.setattr(hashes, "BATCH_BYTES", 1)
    real, calls = hashes.as_bytes, []

    def flaky(arr):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(arr)

    monkeypatch.setattr(hashes, "as_bytes", flaky)
    tensors = {f"t{i}": np.ones(1000, np.float32) for i in range(10)}
    with pytest.raises(Exception, match="No space left"):
        save_with_sshs(tensors, str(tmp_path / "f.safetensors"), {})
    assert list(tmp_path.iterdir()) == []
    assert not any(t.name == "sshs-hash" for t in threading.enumerate())


def test_the_one_writer_matches_safetensors_byte_for_byte(tmp_path):
    """safetensors_io.save (used for diffusers files, checkpoints and caches) writes what safetensors itself writes,
    for every dtype mix and with or without metadata, and casts on the way when asked. (safetensors keeps metadata in
    a hash map, so its order of several metadata keys varies from process to process: headers are compared parsed.)"""
    from mindone_lora_plugin import safetensors_io
    from mindone_lora_plugin.dtypes import bfloat16

    rng = np.random.default_rng(3)
    tensors = {"b.w": rng.standard_normal((3, 5)).astype(np.float32), "a.w": rng.standard_normal(7).astype(np.float16),
               "c": rng.integers(0, 9, (2, 2)).astype(np.int64), "z": rng.standard_normal(4).astype(bfloat16()),
               "e": np.zeros((0, 3), np.float32)}
    for meta in (None, {"format": "pt", "ünï": "ç\"\\"}):
        path = safetensors_io.save(tensors, str(tmp_path / "f.safetensors"), meta)
        ours, theirs = open(path, "rb").read(), save(tensors, metadata=meta)
        n = struct.unpack("<Q", theirs[:8])[0]
        assert ours[:8] == theirs[:8] and ours[8 + n:] == theirs[8 + n:]
        assert json.loads(ours[8:8 + n]) == json.loads(theirs[8:8 + n])
        assert list(json.loads(ours[8:8 + n])) == list(json.loads(theirs[8:8 + n]))  # tensor order too
    cast = safetensors_io.save(tensors, str(tmp_path / "h.safetensors"), dtype=np.dtype(np.float16))
    back, _ = safetensors_io.load(cast)
    assert {k: v.dtype for k, v in back.items()} == {k: np.dtype(np.float16) for k in tensors}
    np.testing.assert_array_equal(back["b.w"], tensors["b.w"].astype(np.float16))


def test_stream_writer_refuses_short_data_and_leaves_nothing(tmp_path):
    from mindone_lora_plugin.safetensors_io import StreamWriter, as_bytes, layout

    tensors = {"a": np.ones(8, np.float32), "b": np.ones(4, np.float32)}
    with pytest.raises(AssertionError, match="header says"):
        with StreamWriter(str(tmp_path / "f.safetensors"), layout(tensors), None) as w:
            w.write(as_bytes(tensors["a"]))
    assert list(tmp_path.iterdir()) == []
