"""Shared by the MindSpore-level tests: tensors from arrays, the PyNative/GRAPH_MODE context switches they use."""

from __future__ import annotations

import contextlib

import numpy as np


def T(array, dtype=None):
    """A MindSpore tensor of ``array`` (``dtype``: a MindSpore dtype, None keeps numpy's)."""
    import mindspore as ms

    return ms.Tensor(np.asarray(array), dtype=dtype)


@contextlib.contextmanager
def pynative():
    """PyNative for the block (whatever an earlier test module left behind); the previous mode comes back."""
    import mindspore as ms

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=mode)


@contextlib.contextmanager
def graph_mode():
    """GRAPH_MODE with the STRICT syntax level mindone's scripts use; the previous context comes back afterwards."""
    import mindspore as ms

    mode, level = ms.get_context("mode"), ms.get_context("jit_syntax_level")
    ms.set_context(mode=ms.GRAPH_MODE, jit_syntax_level=ms.STRICT)
    try:
        yield
    finally:
        ms.set_context(mode=mode, jit_syntax_level=level)
