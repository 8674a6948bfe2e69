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


#: the test files that take longest (a minute or more of one core each in a full run on the 2-core machine), longest
#: first: under ``make test``'s ``--dist loadfile --no-loadscope-reorder`` the workers take files in collection order,
#: so these start first and the run ends on short files instead of one worker finishing a long one alone
SLOWEST_FIRST = ("test_cpu_backend.py", "test_algorithms.py", "test_integration.py", "test_shapes_demo.py",
                 "test_checkpointing.py", "test_lora_dropout.py", "test_train.py", "test_plugins.py",
                 "test_train_features.py", "test_ui_browser.py", "test_distributed.py", "test_train_events.py",
                 "test_interop_outputs.py", "test_train_data_features.py", "test_dora.py", "test_dreambooth.py",
                 "test_flux_model_arch.py", "test_flux_model.py", "test_flux_ops.py")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


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
