"""Process-wide MindSpore set-up: device target, execution mode, the CPU backend, quiet mindone imports.

Everything that touches MindSpore's global context lives here, so commands and tests set up the same way.
"""

from __future__ import annotations

import logging
import os
import warnings

_QUIETED = False
MAX_CALL_DEPTH = 20000


def quiet_mindone_imports() -> None:
    """Silence the noise importing mindone prints (no behaviour changes).

    mindone.transformers registers a ``parakeet`` model whose config transformers 4.57.1 does not know; transformers'
    docstring helper then prints a line per class. Declaring the config name for that helper removes the prints.
    """
    global _QUIETED
    if _QUIETED:
        return
    _QUIETED = True
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logging: errors only
    try:
        import importlib

        auto_docstring = importlib.import_module("transformers.utils.auto_docstring")
        auto_docstring.HARDCODED_CONFIG_FOR_MODELS.setdefault("parakeet", "ParakeetConfig")
    except Exception:  # pragma: no cover - a different transformers layout only costs some noise
        pass
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"mindone\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mindone\..*")
    logging.getLogger("mindone").setLevel(logging.ERROR)


def setup(device_target: str | None = None, mode: str = "graph", seed: int | None = None) -> str:
    """Set the MindSpore context (``mode`` is ``graph`` or ``pynative``), activate the CPU backend on CPU.

    Returns the device target in use.
    """
    quiet_mindone_imports()
    import mindspore as ms

    from mindone_lora_plugin import backends

    if device_target and ms.get_context("device_target") != device_target:
        try:
            ms.set_device(device_target)
        except (AttributeError, RuntimeError):  # older MindSpore, or the runtime already started in this process
            ms.set_context(device_target=device_target)
    target = ms.get_context("device_target")
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    # MindSpore's optimizers unroll one call per parameter when compiled: SDXL with LoHa on the UNet and both text
    # encoders (544 tensors) passes the default depth of 1000
    ms.set_context(max_call_depth=max(MAX_CALL_DEPTH, ms.get_context("max_call_depth") or 0))
    if mode == "graph":
        ms.set_context(jit_syntax_level=ms.STRICT)
    backends.activate(target)
    if seed is not None:
        import numpy as np

        ms.set_seed(seed)
        if hasattr(ms, "manual_seed"):
            ms.manual_seed(seed)  # what mint's random ops follow
        np.random.seed(seed)
    return target
