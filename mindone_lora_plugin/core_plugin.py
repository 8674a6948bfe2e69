"""The built-in ``core`` plugin: implements the operation hooks by dispatching to named strategies and formats.

A built-in plugin (:mod:`~mindone_lora_plugin.builtin_plugins`), registered like every other plugin. Other plugins
can wrap these hooks (``@hookimpl(wrapper=True)``) or replace them (``@hookimpl(tryfirst=True)`` returning a
non-``None`` result).
"""

from __future__ import annotations

import os

from mindone_lora_plugin.hookspecs import hookimpl


def exact_format(manager, options):
    """The format checkpoints hold a run's weights in (what a resume reads): diffusers when it can hold the run's
    algorithm, else kohya (which holds every algorithm)."""
    algo = manager.get_algorithm(getattr(options, "algorithm", "lora") or "lora")
    diffusers = manager.get_format("diffusers")
    return diffusers if diffusers.supports(algo) else manager.get_format("kohya")


def check_save_formats(manager, formats, options) -> None:
    """One clear line, before any work, when a requested format is unknown or cannot hold the run's algorithm."""
    from mindone_lora_plugin.errors import LoraError

    algo = manager.get_algorithm(getattr(options, "algorithm", "lora") or "lora")
    for name in formats:
        fmt = manager.get_format(name)
        if not fmt.supports(algo):
            able = [n for n, f in manager.formats().items() if f.supports(algo)]
            raise LoraError(f"the {name} format cannot hold {algo.name} adapters; formats that can: "
                            f"{', '.join(able) or 'none installed'} (e.g. --save_formats {','.join(able[:1])})")


@hookimpl
def mindone_lora_add_adapters(manager, models, options):
    return manager.get_strategy(options.strategy).add_adapters(models, options)


@hookimpl
def mindone_lora_trainable_parameters(manager, models, options):
    return manager.get_strategy(options.strategy).trainable_parameters(models, options)


@hookimpl
def mindone_lora_save_weights(manager, models, options, output_dir, formats, output_name, metadata):
    writers = [manager.get_format(name) for name in formats]  # unknown names fail before anything is written
    state = manager.get_strategy(options.strategy).extract(models)
    state.metadata.update(metadata)
    return [fmt.write(state, os.path.join(output_dir, fmt.default_filename(output_name)), dtype=options.save_dtype,
                      metadata=metadata, output_name=output_name)
            for fmt in writers]


@hookimpl
def mindone_lora_load_weights(manager, models, options, path):
    from mindone_lora_plugin.base_model_info import BaseModelInfo
    from mindone_lora_plugin.formats.reader import read_lora

    state = read_lora(path, base=BaseModelInfo.from_models(models), formats=list(manager.formats().values()))
    manager.get_strategy(options.strategy).apply(models, state, options)
    return state
