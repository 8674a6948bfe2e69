"""The hook implementations of the ``lora_fa`` plugin (the module named by the entry point in ``setup.cfg``).

Importing this module must stay cheap and must not fail on a machine without an accelerator: MindSpore is imported
only inside the methods that need it.
"""

from __future__ import annotations

from mindone_lora_fa.peft_format import PeftFormat
from mindone_lora_fa.strategy import A_INITS, LoraFaStrategy
from mindone_lora_plugin.hookspecs import hookimpl

# ------------------------------------------------------------------ discovery hooks


@hookimpl
def mindone_lora_strategies():
    yield LoraFaStrategy()


@hookimpl
def mindone_lora_formats():
    yield PeftFormat()


@hookimpl
def mindone_lora_add_arguments(parser):
    parser.add_argument(
        "--lora_fa_init", choices=A_INITS, default=None,
        help="lora-fa strategy: how the frozen A matrices are drawn (default: as --lora_init says); "
             "'orthogonal' makes every A a random orthonormal projection")


# ------------------------------------------------------------------ operation hooks


@hookimpl(tryfirst=True)
def mindone_lora_load_weights(manager, models, options, path):
    """Load a whole PEFT adapter folder (``<name>_peft/`` with ``unet/``, ``text_encoder/`` ...).

    The generic reader opens one ``.safetensors`` file, which covers a single component's adapter folder but not the
    top folder with one subfolder per component. This implementation takes over for such folders and returns ``None``
    for anything else, so the built-in ``core`` implementation handles every other path.
    """
    fmt = PeftFormat()
    if not fmt.sniff_folder(path):
        return None
    from mindone_lora_plugin.base_model_info import BaseModelInfo

    state = fmt.read(path, base=BaseModelInfo.from_models(models))
    manager.get_strategy(options.strategy).apply(models, state, options)
    return state
