"""Process-wide MindSpore set-up: the supported versions, device target, execution mode, the CPU backend, quiet
mindone imports.

Everything that touches MindSpore's global context lives here, so commands and tests set up the same way. Where the
running MindSpore has the replacement of a deprecated ``set_context`` key (``set_recursion_limit``,
``runtime.launch_blocking``), that is what is called, so MindSpore has no deprecation to warn about.
"""

from __future__ import annotations

import logging
import os
import platform
import warnings

from mindone_lora_plugin.errors import LoraError

_QUIETED = False
#: the releases this package runs on: every MindSpore on PyPI in this range was measured (docs/compatibility.md);
#: setup.cfg's install_requires states the same ranges (tests/runtime/test_environment.py checks that they agree)
SUPPORTED = {"mindspore": ">=2.7.0,<2.11", "mindone": ">=0.5.0,<0.6"}
#: ``MINDONE_LORA_ANY_VERSION=1`` starts on versions outside :data:`SUPPORTED` (at the user's own risk)
ANY_VERSION_ENV = "MINDONE_LORA_ANY_VERSION"
MAX_CALL_DEPTH = 20000
#: ``--mode auto`` on CPU: a denoiser (``unet/`` or ``transformer/`` weights) at least this large trains in PyNative.
#: MindSpore 2.7.1's CPU GRAPH_MODE runtime keeps far more of a step's buffers than PyNative (docs/benchmarks.md,
#: benchmark 5): a full-size SD1.5 step at 512 px passes 16 GiB in GRAPH_MODE and fits in PyNative. Every tiny model
#: of the tests and demos is far below this and keeps GRAPH_MODE, which is the faster mode for small models.
FULL_SIZE_BYTES = 256 << 20
MODES = ("auto", "graph", "pynative")


def denoiser_bytes(model_path: str | None) -> int:
    """Bytes of weights in a model folder's ``unet/`` or ``transformer/`` subfolder (a single-file checkpoint: its
    size); 0 when there is none to measure."""
    if not model_path:
        return 0
    if os.path.isfile(model_path):
        return os.path.getsize(model_path)
    total = 0
    for sub in ("unet", "transformer"):
        folder = os.path.join(model_path, sub)
        if os.path.isdir(folder):
            total += sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                         if f.endswith((".safetensors", ".bin", ".ckpt")))
    return total


def resolve_mode(requested: str, target: str, model_path: str | None) -> tuple[str, str]:
    """The execution mode for ``--mode requested`` (``auto``, ``graph`` or ``pynative``) and a line to tell the user
    (empty when there is nothing to say). ``auto`` is GRAPH_MODE, except PyNative for a full-size model on CPU;
    forcing ``graph`` on such a model gets a warning."""
    full = target == "CPU" and requested in ("auto", "graph") and denoiser_bytes(model_path) >= FULL_SIZE_BYTES
    if requested == "auto" and full:
        size = denoiser_bytes(model_path) / 2 ** 30
        return "pynative", (f"--mode auto: PyNative for this full-size model on CPU ({size:.1f} GiB of denoiser "
                            f"weights): MindSpore's CPU GRAPH_MODE keeps several times the activation memory "
                            f"(--mode graph overrides)")
    if full:
        return "graph", ("warning: GRAPH_MODE on CPU keeps several times PyNative's activation memory for a "
                         "full-size model (512 px SD1.5 passes 16 GiB); if the run is killed for memory, use "
                         "--mode auto")
    return ("graph" if requested == "auto" else requested), ""


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def unsupported_versions() -> list[str]:
    """``"mindspore 2.11.0"``-style entries for each installed distribution outside :data:`SUPPORTED`."""
    from packaging.specifiers import SpecifierSet

    found = {name: installed_version(name) for name in SUPPORTED}
    return [f"{name} {found[name] or 'not installed'}" for name, spec in SUPPORTED.items()
            if found[name] is None or found[name] not in SpecifierSet(spec, prereleases=True)]


def check_versions() -> None:
    """Refuse to start, in one line naming the supported ranges, on a MindSpore or mindone outside :data:`SUPPORTED`
    (``MINDONE_LORA_ANY_VERSION=1`` skips the check)."""
    if os.environ.get(ANY_VERSION_ENV) == "1":
        return
    bad = unsupported_versions()
    if bad:
        ranges = ", ".join(f"{name}{spec}" for name, spec in SUPPORTED.items())
        raise LoraError(f"found {', '.join(bad)}; mindone-lora runs on {ranges} (docs/compatibility.md): install "
                        f"one of those, e.g. pip install 'mindspore{SUPPORTED['mindspore']}' "
                        f"(or set {ANY_VERSION_ENV}=1 to try anyway)")


def version_report() -> str:
    """One line: this package's, MindSpore's, mindone's and Python's versions and the device MindSpore sees."""
    from mindone_lora_plugin import __version__

    ms_version = installed_version("mindspore")
    device = "none (MindSpore is not installed)"
    if ms_version:
        os.environ.setdefault("GLOG_v", "3")
        import mindspore as ms

        device = ms.get_context("device_target")
    bad = unsupported_versions()
    note = f"; unsupported: {', '.join(bad)}, see docs/compatibility.md" if bad else ""
    return (f"mindone-lora {__version__} (mindspore {ms_version or 'not installed'}, "
            f"mindone {installed_version('mindone') or 'not installed'}, Python {platform.python_version()}, "
            f"device {device}{note})")


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


def launch_synchronously(device_target: str) -> bool:
    """On CPU, make PyNative launch each operator synchronously (``MINDONE_LORA_PYNATIVE_ASYNC=1`` keeps MindSpore's
    asynchronous queue); return whether it was asked for.

    PyNative's asynchronous pipeline costs more than it overlaps on CPU, where its queue threads compete with the
    kernels for the same cores: synchronous launches make a tiny UNet LoRA step 6 to 10 times faster. It only takes
    effect before the process's first operator: MindSpore 2.7.1 keeps the asynchronous pipeline once one has run
    (measured: 4.4 s against 0.44 s for a tiny UNet forward and backward, the context reading True either way), so
    an entry point calls this, or :func:`setup`, before it builds or runs anything.
    """
    if str(device_target).upper() != "CPU" or os.environ.get("MINDONE_LORA_PYNATIVE_ASYNC") == "1":
        return False
    import mindspore as ms

    runtime = getattr(ms, "runtime", None)
    if hasattr(runtime, "launch_blocking"):
        runtime.launch_blocking()  # 2.7's replacement of set_context(pynative_synchronize=True): same speed-up
    else:
        ms.set_context(pynative_synchronize=True)
    return True


def launches_synchronously() -> bool:
    """Whether PyNative launches operators synchronously in this process (either way of asking for it)."""
    import mindspore as ms

    try:
        from mindspore._c_expression import RuntimeConf  # what runtime.launch_blocking() sets

        if RuntimeConf.get_instance().is_launch_blocking():
            return True
    except (ImportError, AttributeError):
        pass
    return bool(ms.get_context("pynative_synchronize"))


def setup(device_target: str | None = None, mode: str = "graph", seed: int | None = None,
          model_path: str | None = None) -> str:
    """Set the MindSpore context (``mode`` is ``graph``, ``pynative`` or ``auto``: :func:`resolve_mode` on
    ``model_path``), activate the CPU backend on CPU, where PyNative also launches operators synchronously
    (:func:`launch_synchronously`: call this before the process's first operator).

    Refuses versions outside :data:`SUPPORTED` (:func:`check_versions`). Returns the device target in use.
    """
    check_versions()
    quiet_mindone_imports()
    import mindspore as ms

    from mindone_lora_plugin.runtime import cpu

    if device_target and ms.get_context("device_target") != device_target:
        try:
            ms.set_device(device_target)
        except (AttributeError, RuntimeError):  # older MindSpore, or the runtime already started in this process
            ms.set_context(device_target=device_target)
    target = ms.get_context("device_target")
    mode = resolve_mode(mode, target, model_path)[0]
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    # MindSpore's optimizers unroll one call per parameter when compiled: SDXL with LoHa on the UNet and both text
    # encoders (544 tensors) passes the default depth of 1000
    if hasattr(ms, "set_recursion_limit"):
        ms.set_recursion_limit(MAX_CALL_DEPTH)
    else:
        ms.set_context(max_call_depth=max(MAX_CALL_DEPTH, ms.get_context("max_call_depth") or 0))
    if mode == "graph":
        ms.set_context(jit_syntax_level=ms.STRICT)
    launch_synchronously(target)
    cpu.activate(target)
    if seed is not None:
        import numpy as np

        ms.set_seed(seed)
        if hasattr(ms, "manual_seed"):
            ms.manual_seed(seed)  # what mint's random ops follow
        np.random.seed(seed)
    return target


def current_mode() -> str:
    """``graph`` or ``pynative``: the mode the MindSpore context is in."""
    import mindspore as ms

    return "graph" if ms.get_context("mode") == ms.GRAPH_MODE else "pynative"
