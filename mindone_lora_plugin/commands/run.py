"""``mindone-lora run SCRIPT.py [script arguments] [--lora_* flags]``: run an unmodified mindone LoRA script.

The script runs in this Python process (as ``python SCRIPT.py ...`` would run it) with the plugin switched in at the
seams mindone's LoRA scripts share (:mod:`mindone_lora_plugin.scripts.seams`): the ``--lora_*`` flags are taken out of
the
argument list before the script parses it, its ``add_adapter(LoraConfig)`` calls get the chosen strategy's adapters,
and its ``save_lora_weights`` calls write every ``--lora_save_formats`` format. On CPU the CPU backend is active.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from dataclasses import dataclass, field

from mindone_lora_plugin.errors import LoraError

EXAMPLE = """\
example (mindone's text-to-image LoRA script, kohya targets, alpha 8, both formats at every save):
  mindone-lora run mindone/examples/diffusers/text_to_image/train_text_to_image_lora.py \\
      --pretrained_model_name_or_path ./stable-diffusion-v1-5 --train_data_dir ./my-images \\
      --resolution 512 --train_batch_size 1 --max_train_steps 2000 --lora_rank 16 --output_dir ./my-lora \\
      --lora_targets kohya --lora_alpha 8 --lora_save_formats diffusers,kohya

The --lora_* flags above may stand anywhere after SCRIPT (or before it); every other argument goes to the script
unchanged (its own --lora_rank sets the rank). Arguments after a lone -- all go to the script."""


@dataclass
class RunResult:
    exit_code: int
    session: object
    files: list[str] = field(default_factory=list)


def add_parser(subparsers):
    from mindone_lora_plugin.integration import add_lora_arguments

    p = subparsers.add_parser(
        "run", help="run an unmodified mindone LoRA training script with this plugin",
        description="Run a mindone LoRA training script (train_text_to_image_lora.py, ..._sdxl.py, the DreamBooth "
                    "LoRA scripts) in this process with the plugin's strategies and formats switched in: its "
                    "add_adapter calls get the chosen strategy's adapters and every save_lora_weights call also "
                    "writes the --lora_save_formats files. Requests the script cannot honour are refused before "
                    "training starts.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", help="the training script (a .py file)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="...",
                   help="the script's own arguments, with --lora_* flags anywhere among them")
    add_lora_arguments(p)
    return p


def run(args) -> int:
    from mindone_lora_plugin.integration import FLAG_DESTS, LoraIntegration, split_lora_args

    before = argparse.Namespace(**{d: getattr(args, d) for d in
                                   list(FLAG_DESTS) + list(getattr(args, "_lora_plugin_dests", []) or [])
                                   if hasattr(args, d)})
    lora_args, script_argv = split_lora_args(args.script_args, namespace=before)
    lora = LoraIntegration.from_args(lora_args, rank=4, train_text_encoder=False)
    result = run_script(args.script, script_argv, lora)
    if result.files:
        print(f"mindone-lora run: {os.path.basename(args.script)} saved LoRA weights {result.session.saves} time(s); "
              f"the last save wrote {', '.join(result.session.last_saved)}", file=sys.stderr)
    return result.exit_code


def check_script(script: str) -> str:
    path = os.path.abspath(script)
    if not os.path.isfile(path):
        raise LoraError(f"{script}: no such script; give the path of a mindone training script (.py)")
    if not path.endswith(".py"):
        raise LoraError(f"{script} is not a Python script (.py)")
    return path


def run_script(script: str, script_argv, lora, *, cpu_backend: bool = True) -> RunResult:
    """Run ``script`` with ``script_argv`` in this process, its LoRA seams switched to ``lora`` (a LoraIntegration).

    Returns the script's exit status and the session (its models, the files written). A request the script cannot
    honour raises :class:`LoraError` before its first training step; everything patched is restored afterwards.
    """
    from mindone_lora_plugin.runtime.process import quiet_mindone_imports
    from mindone_lora_plugin.scripts.seams import patched
    from mindone_lora_plugin.scripts.session import ScriptSession

    path = check_script(script)
    session = ScriptSession(lora, path, script_argv)
    quiet_mindone_imports()
    import mindspore as ms

    if cpu_backend:
        from mindone_lora_plugin.runtime import cpu
        from mindone_lora_plugin.runtime.process import launch_synchronously

        if cpu.activate():  # only on a CPU device target
            launch_synchronously("CPU")  # before the script's first operator, or never

    saved_argv, saved_path = sys.argv[:], sys.path[:]
    # the script sets its own mode; an in-process caller gets its own back
    saved_context = {k: ms.get_context(k) for k in ("mode", "jit_syntax_level")}
    code = 0
    with patched(session):
        sys.argv = [path] + list(script_argv)
        sys.path.insert(0, os.path.dirname(path))
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            code = _exit_code(e.code)
        finally:
            sys.argv = saved_argv
            sys.path[:] = saved_path
            ms.set_context(**saved_context)
    if code == 0 and lora.resume_from and not session.resumed_from:
        raise LoraError(f"--lora_resume_from was not applied: {os.path.basename(path)} never built a mindone "
                        f"TrainStep, the point where mindone-lora run loads it")
    return RunResult(code, session, list(session.saved))


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
