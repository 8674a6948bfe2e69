"""The wheels, as a user installs them: ``python -m build`` of this package and of ``mindone-lora-lycoris`` (a wheel
and an sdist each, the wheel built from the sdist), installed into a venv that already holds MindSpore and mindone,
then ``mindone-lora train --demo`` and ``mindone-lora plugins`` run from it, outside the checkout.

It changes the venv it runs in, so it runs only where asked: ``make smoke`` sets ``MINDONE_LORA_INSTALL_WHEELS=1``
in the smoke venv (``.venv-smoke``, the newest MindSpore that works).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "plugins", "mindone-lora-lycoris")

pytestmark = [pytest.mark.smoke, pytest.mark.skipif(
    os.environ.get("MINDONE_LORA_INSTALL_WHEELS") != "1",
    reason="installs the wheels into the running venv: make smoke runs it (MINDONE_LORA_INSTALL_WHEELS=1)")]


def _clean_env() -> dict:
    """The environment of a user's shell: no PYTHONPATH pointing into the checkout, the venv's bin first."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MINDONE_LORA_INSTALL_WHEELS")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _run(cmd, cwd, timeout=900):
    return subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


def _version(distribution: str, cwd) -> str:
    out = _run([sys.executable, "-c", f"from importlib import metadata; print(metadata.version({distribution!r}))"],
               cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def _build(source: str, name: str, work) -> list[str]:
    """``python -m build`` of a copy of ``source`` (the build's egg-info stays out of the checkout): the wheel and
    sdist of distribution ``name``."""
    tree = os.path.join(work, name + "-src")
    shutil.copytree(source, tree, ignore=shutil.ignore_patterns(
        ".venv*", "dist", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".git", "plugins", "examples",
        "benchmarks"))
    dist = os.path.join(work, "dist")
    out = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, tree], work)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return sorted(glob.glob(os.path.join(dist, f"{name.replace('-', '_')}-*")))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Both wheels built and installed; the MindSpore version from before and after."""
    work = str(tmp_path_factory.mktemp("wheels"))
    before = _version("mindspore", work)
    built = _build(ROOT, "mindone-lora-plugin", work) + _build(PLUGIN, "mindone-lora-lycoris", work)
    wheels = [p for p in built if p.endswith(".whl")]
    assert len(wheels) == 2 and len([p for p in built if p.endswith(".tar.gz")]) == 2, built
    out = _run([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", *wheels], work)
    assert out.returncode == 0, out.stderr[-3000:]
    out = _run([sys.executable, "-m", "pip", "install", "-q", *wheels], work)  # the dependencies, as pip resolves them
    assert out.returncode == 0, out.stderr[-3000:]
    return work, before, _version("mindspore", work)


def test_install_leaves_mindspore_alone_and_ships_the_package_data(installed):
    work, before, after = installed
    assert after == before
    code = ("import os, mindone_lora_plugin as m; d = os.path.dirname(m.__file__); print(d); "
            "print(sorted(os.listdir(os.path.join(d, 'ui', 'static'))))")
    out = _run([sys.executable, "-c", code], work)
    assert out.returncode == 0, out.stderr[-2000:]
    where, static = out.stdout.splitlines()
    assert where == os.path.join(sysconfig.get_paths()["purelib"], "mindone_lora_plugin")  # the installed copy
    assert static == str(sorted(os.listdir(os.path.join(ROOT, "mindone_lora_plugin", "ui", "static"))))
    shipped = os.path.join(ROOT, "mindone_lora_plugin", "demo", "assets", "shapes-sd1")
    for root, _, files in os.walk(shipped):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), shipped)
            assert os.path.isfile(os.path.join(where, "demo", "assets", "shapes-sd1", rel)), rel


def test_installed_command_trains_the_demo_and_lists_the_plugin(installed):
    work = installed[0]
    command = os.path.join(os.path.dirname(sys.executable), "mindone-lora")
    out = _run([command, "plugins"], work, timeout=300)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
    assert "lycoris" in out.stdout and "kohya" in out.stdout, out.stdout
    out = _run([command, "train", "--demo", "--max_train_steps", "10", "--output_dir", os.path.join(work, "demo")],
               work)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pytorch_lora_weights.safetensors" in os.listdir(os.path.join(work, "demo"))
    assert "LoRA weight 0 reproduces the base images exactly: yes" in out.stdout, out.stdout[-2000:]
