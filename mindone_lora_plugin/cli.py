"""The ``mindone-lora`` command line.

Subcommands live in their own modules (``mindone_lora_plugin.commands.<name>``), each with ``add_parser(subparsers)``
and ``run(args) -> int``; they are imported only when used, so ``mindone-lora --help`` answers quickly. A user mistake
(:class:`~mindone_lora_plugin.errors.LoraError`, a bad flag) ends in one line on stderr and exit status 2.

The command starts quietly: nothing on stderr that is not about the user's run (see :func:`entry`); ``--verbose``
(``-v``), anywhere on the command line (with ``run``: before ``run``), lets MindSpore's C++ warnings and
transformers' notices through.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from mindone_lora_plugin.errors import LoraError

PROG = "mindone-lora"
#: what :func:`entry` adds to the environment where it is not set (see there)
COMMAND_ENV = {"USE_TORCH": "0", "GLOG_v": "3", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
               "DIFFUSERS_NO_ADVISORY_WARNINGS": "1"}
#: the same with ``--verbose``: MindSpore's C++ log at WARNING, transformers' advice shown
VERBOSE_ENV = {"USE_TORCH": "0", "GLOG_v": "2"}
VERBOSE_FLAGS = ("-v", "--verbose")
# subcommand → (module, one-line help)
COMMANDS = {
    "train": ("mindone_lora_plugin.train.cli", "train a LoRA for an SD1.x/2.x, SDXL or FLUX.1 model"),
    "convert": ("mindone_lora_plugin.commands.convert", "convert a LoRA file between formats (diffusers, kohya)"),
    "inspect": ("mindone_lora_plugin.commands.inspect", "show what a LoRA file contains"),
    "generate": ("mindone_lora_plugin.commands.generate", "generate images with one or more weighted LoRAs"),
    "merge": ("mindone_lora_plugin.commands.merge", "fuse LoRAs into a model folder, or combine them into one LoRA"),
    "run": ("mindone_lora_plugin.commands.run", "run an unmodified mindone LoRA training script with this plugin"),
    "plugins": ("mindone_lora_plugin.commands.plugins", "list installed plugins and what they offer"),
    "ui": ("mindone_lora_plugin.commands.ui", "a web UI to set up, watch and use training runs"),
}


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage dump), exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


class VersionAction(argparse.Action):
    """``--version``: :func:`mindone_lora_plugin.runtime.process.version_report` (imports MindSpore to ask for the
    device)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from mindone_lora_plugin.runtime.process import version_report

        print(version_report())
        parser.exit(0)


def build_parser(commands: dict | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="LoRA training and LoRA files for Stable Diffusion on MindSpore.")
    parser.add_argument("--version", action=VersionAction,
                        help="show the versions of this package, MindSpore, mindone and Python, and the device")
    # main() takes -v/--verbose off the line before parsing (entry() acts on it), so it never reaches a command's
    # namespace, its metadata or a written config
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also show MindSpore's C++ warnings and transformers' notices (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module, help_text) in (commands or COMMANDS).items():
        if commands is None:
            sub.add_parser(name, help=help_text, add_help=False)
        else:
            importlib.import_module(module).add_parser(sub)
    return parser


def _split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``-v``/``--verbose``, and whether one was there: anywhere on the line, except after ``run``
    (``mindone-lora run SCRIPT ...`` passes what follows to the script, whose own ``-v`` it may be)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    end = argv.index(command) + 1 if command == "run" else len(argv)
    kept = [a for a in argv[:end] if a not in VERBOSE_FLAGS] + argv[end:]
    return kept, len(kept) != len(argv)


def main(argv: list[str] | None = None) -> int:
    argv = _split_verbose(list(sys.argv[1:] if argv is None else argv))[0]
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        parser = build_parser()
        if command is None and not argv:
            parser.print_help()
            return 0
        try:
            parser.parse_args(argv)  # --help / --version / an unknown command end here
        except SystemExit as e:
            return int(e.code or 0)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
        parser = build_parser({command: COMMANDS[command]})
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, or a bad flag already reported in one line
            return int(e.code or 0)
        return int(module.run(args) or 0)
    except LoraError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``mindone-lora inspect F | head``): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail again
        return 141


def entry(argv: list[str] | None = None) -> int:
    """The ``mindone-lora`` command (console script, ``python -m mindone_lora_plugin``): :func:`main` in a process
    of its own.

    It tells transformers not to import torch (``USE_TORCH=0``): where torch is installed, transformers imports it
    at start-up, about 6 s and 280 MiB on a 2-core machine, though nothing a command runs uses it (mindone brings its
    own MindSpore models); and, unless ``--verbose``, it keeps start-up quiet: MindSpore's C++ log at ERROR
    (``GLOG_v=3``: no ``[WARNING] ME`` lines) and no transformers advice: the "None of PyTorch, TensorFlow >= 2.0,
    or Flax have been found" notice that ``USE_TORCH=0`` causes goes through ``Logger.warning_advice``, which
    transformers guards with ``TRANSFORMERS_NO_ADVISORY_WARNINGS`` and mindone.diffusers, replacing it once
    imported, with ``DIFFUSERS_NO_ADVISORY_WARNINGS``. A setting the environment already has wins. Child processes
    (msrun workers, the UI's runs) inherit them. :func:`main` called from Python leaves the environment alone.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = _split_verbose(argv)[1]
    for key, value in (VERBOSE_ENV if verbose else COMMAND_ENV).items():
        os.environ.setdefault(key, value)
    return main(argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(entry())
