"""Fitting into the user's environment: the supported ranges stated once and agreeing with setup.cfg and
constraints.txt, ``--version``, refusing an unsupported MindSpore in one line, and a quiet start (real commands: the
stderr of a successful short run and of three failing ones)."""

from __future__ import annotations

import configparser
import os
import platform
import re
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from mindone_lora_plugin import __version__
from mindone_lora_plugin.runtime import process as runtime

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_MODEL = os.path.join(ROOT, "mindone_lora_plugin", "demo", "assets", "shapes-sd1")
#: a tqdm progress bar segment ("label:  50%|█████     | 1/2 [00:00<00:00,  2.22it/s]"): about the run, allowed
PROGRESS = re.compile(r"^[^|]*\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]$")


def _requirements() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    reqs = [Requirement(line) for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    return {r.name: r for r in reqs}


def _constraints() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8") as fh:
        for line in fh:
            if "==" in line and not line.startswith("#"):
                name, version = line.strip().split("==")
                pins[name.lower()] = version
    return pins


def test_ranges_not_pins_agree_with_the_runtime_check_and_the_constraints():
    reqs, pins = _requirements(), _constraints()
    for name, spec in runtime.SUPPORTED.items():
        assert str(reqs[name].specifier) == str(reqs[name].specifier.__class__(spec)), name
    for name in ("mindspore", "mindone", "transformers", "numpy"):
        assert "==" not in str(reqs[name].specifier), reqs[name]  # a range a user's environment can meet
        assert reqs[name].specifier.contains(pins[name]), (name, pins[name])  # the verified stack is in the range
    assert pins["mindspore"] == "2.7.1" and pins["mindone"] == "0.5.0"


def _command(args, env=None, timeout=600, cwd=None):
    """``mindone-lora ARGS`` as the console script runs it (``python -m``, so the checkout's code)."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("GLOG_v", "USE_TORCH", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "DIFFUSERS_NO_ADVISORY_WARNINGS")}
    base["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "mindone_lora_plugin", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(base, **(env or {})), cwd=cwd)


def _noise(stderr: str) -> list[str]:
    """The parts of ``stderr`` that are not progress bars."""
    return [part for part in re.split(r"[\r\n]+", stderr) if part.strip() and not PROGRESS.match(part.strip())]


@pytest.mark.smoke
def test_version_names_package_mindspore_mindone_python_and_device(tmp_path):
    out = _command(["--version"], cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.strip() == (f"mindone-lora {__version__} (mindspore {metadata.version('mindspore')}, "
                                  f"mindone {metadata.version('mindone')}, Python {platform.python_version()}, "
                                  f"device CPU)")


def test_verbose_lets_mindspore_warnings_through_and_the_default_does_not():
    code = ("import os, sys\nfrom mindone_lora_plugin.cli import entry\n"
            "rc = entry(sys.argv[1:])\nprint(rc, os.environ['GLOG_v'])")
    env = {k: v for k, v in os.environ.items() if k != "GLOG_v"}
    for argv, expected in ((["--help"], "0 3"), (["-v", "--help"], "0 2"), (["--help", "--verbose"], "0 2"),
                           (["run", "--help", "script.py", "-v"], "0 3")):  # run: the script's own -v
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                             env=env)
        assert out.returncode == 0 and out.stdout.splitlines()[-1] == expected, (argv, out.stdout, out.stderr)


@pytest.mark.smoke
def test_quiet_start_a_short_run_and_three_failures(tmp_path):
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    # a successful short run: models loaded, two denoising steps, an image written
    ok = _command(["generate", "--model", DEMO_MODEL, "--prompt", "a red circle", "--steps", "2", "--num_images", "1",
                   "--height", "32", "--width", "32", "--out", str(tmp_path / "images")], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert _noise(ok.stderr) == [], ok.stderr
    assert os.path.isfile(tmp_path / "images" / "grid.png")
    # the same with -v: MindSpore's warnings come through (from 2.9 one is about mindone 0.5.0 importing the
    # deprecated mindspore.common.api), and none is a deprecation of the package's own set_context calls
    verbose = _command(["-v", "generate", "--model", DEMO_MODEL, "--prompt", "a red circle", "--steps", "1",
                        "--height", "32", "--width", "32", "--out", str(tmp_path / "images-v")], cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "set_context" not in verbose.stderr and "None of PyTorch" in verbose.stderr, verbose.stderr[-3000:]
    data = make_shapes_dataset(str(tmp_path / "data"), size=32, repeats=1)
    failures = {
        # a bad flag
        "unrecognized arguments: --no_such_flag": ["train", "--demo", "--no_such_flag"],
        # a mistake found after MindSpore, mindone and the models are loaded
        "no module of the unet matches the LoRA targets": [
            "train", "--pretrained_model_name_or_path", DEMO_MODEL, "--train_data_dir", data, "--output_dir",
            str(tmp_path / "run"), "--max_train_steps", "1", "--resolution", "32", "--lora_targets", "nonsense"],
        # a missing input file
        "does not exist": ["inspect", str(tmp_path / "missing.safetensors")],
    }
    for expected, argv in failures.items():
        bad = _command(argv, cwd=tmp_path)
        assert bad.returncode == 2, (argv, bad.stderr[-3000:])
        assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("mindone-lora: error: "), bad.stderr
        assert expected in bad.stderr, bad.stderr


def test_an_unsupported_mindspore_is_refused_in_one_line(tmp_path):
    """A MindSpore outside the supported range (here: the range moved past the installed one) ends at start-up in
    one line naming the range; MINDONE_LORA_ANY_VERSION=1 lets it start."""
    code = ("import sys\nfrom mindone_lora_plugin.runtime import process\n"
            "process.SUPPORTED['mindspore'] = '>=9.0,<9.1'\n"
            "from mindone_lora_plugin.cli import entry\nsys.exit(entry(sys.argv[1:]))")
    argv = ["generate", "--model", DEMO_MODEL, "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32",
            "--out", str(tmp_path / "images")]
    env = {k: v for k, v in os.environ.items() if k != runtime.ANY_VERSION_ENV}
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count("\n") == 1, out.stderr
    assert (f"error: found mindspore {metadata.version('mindspore')}; mindone-lora runs on mindspore>=9.0,<9.1, "
            f"mindone{runtime.SUPPORTED['mindone']}") in out.stderr
    assert not os.path.exists(tmp_path / "images")


@pytest.mark.smoke
def test_cpu_backend_asks_mindspore_by_feature():
    """2.7's PyNative Generator does not step on CPU and is patched; 2.8 and later step natively and are left alone
    (they no longer have the private ``pyboost_generator`` the patch runs). No replaced primitive is missing."""
    from packaging.version import Version

    from mindone_lora_plugin.runtime import cpu  # noqa: E402
    from mindone_lora_plugin.runtime.cpu import install, primitives, rng

    assert cpu.activate("CPU")
    native = Version(metadata.version("mindspore")) >= Version("2.8")
    assert install.FEATURES["generator_step"] == ("native" if native else "patched")
    assert rng.generator_steps_natively()  # patched or not, a STEP now advances the offset
    assert primitives.ABSENT_PRIMITIVES == []


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """``mindone-lora plugins | head -0``: the pipe is closed before the command writes; no traceback, exit 141."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if k != "GLOG_v"}
    env["PYTHONPATH"] = ROOT
    try:
        done = subprocess.run([sys.executable, "-m", "mindone_lora_plugin", "plugins"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300, env=env, cwd=tmp_path)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr[-3000:]
    assert done.stderr == "", done.stderr[-3000:]
