"""Shared fixtures: tiny SD1.x/SDXL model folders (built once per test session, from config, no hub)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GLOG_v", "3")


def pytest_configure(config):
    """PyNative's synchronous launches on CPU, as the ``mindone-lora`` commands set them: it has to happen before
    the first operator of a test process (a fixture building a tiny model), or it never takes effect there."""
    from mindone_lora_plugin.runtime.process import launch_synchronously

    launch_synchronously("CPU")


#: the test files (paths under tests/) that take longest (a minute or more of one core each in a full run on the
#: 2-core machine), longest first: under ``make test``'s ``--dist loadfile --no-loadscope-reorder`` the workers take
#: files in collection order, so these start first and the run ends on short files instead of one worker finishing a
#: long one alone
SLOWEST_FIRST = ("runtime/cpu/test_cpu_backend.py", "algorithms/test_algorithms.py", "scripts/test_integration.py",
                 "demo/test_shapes_demo.py", "runtime/test_checkpointing.py", "algorithms/test_lora_dropout.py",
                 "train/test_train.py", "test_plugins.py", "train/features/test_train_features.py",
                 "ui/test_ui_browser.py", "train/test_distributed.py", "train/test_train_events.py",
                 "compose/test_interop_outputs.py", "train/data/test_train_data_features.py", "algorithms/test_dora.py",
                 "train/test_dreambooth.py", "architectures/flux/test_flux_model_arch.py",
                 "architectures/flux/test_flux_model.py", "architectures/flux/test_flux_ops.py")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    def where(item) -> str:  # the file's path under tests/, with forward slashes
        return os.path.relpath(str(item.path), HERE).replace(os.sep, "/")

    items.sort(key=lambda item: rank.get(where(item), len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> str:
    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model

    return ensure_tiny_model("sd1", str(tmp_path_factory.mktemp("models") / "tiny-sd1"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model

    return ensure_tiny_model("sdxl", str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


@pytest.fixture
def plugin_manager():
    """A fresh process-wide plugin manager for the test, forgotten afterwards."""
    from mindone_lora_plugin.plugins import get_plugin_manager, reset_plugin_manager

    reset_plugin_manager()
    yield get_plugin_manager()
    reset_plugin_manager()
