"""Hook specifications of the ``mindone_lora`` pluggy project.

Every hook is declared here. A plugin is any module or object with functions decorated by :data:`hookimpl`, named as
below, registered through the setuptools entry-point group ``mindone_lora`` (the built-in plugins are listed in
:mod:`mindone_lora_plugin.builtin_plugins` instead)::

    [options.entry_points]
    mindone_lora =
        my_plugin = my_package.plugin

There are two kinds of hooks.

*Discovery hooks* (``mindone_lora_strategies``, ``mindone_lora_formats``, ``mindone_lora_algorithms``,
``mindone_lora_architectures``, ``mindone_lora_training_features``, ``mindone_lora_add_arguments``) are called by the
plugin manager; they yield named, typed objects (:class:`~mindone_lora_plugin.strategies.base.LoraStrategy`,
:class:`~mindone_lora_plugin.formats.base.LoraFormat`, :class:`~mindone_lora_plugin.algorithms.base.LoraAlgorithm`,
:class:`~mindone_lora_plugin.architectures.base.Architecture`, and the classes of
:class:`~mindone_lora_plugin.train.features.base.TrainingFeature`) or add command-line arguments. Names must be unique
across all installed plugins.

*Operation hooks* (``mindone_lora_add_adapters``, ``mindone_lora_trainable_parameters``, ``mindone_lora_save_weights``,
``mindone_lora_load_weights``) are what a training entrypoint calls, and all it calls, to work with LoRA. They are
``firstresult`` hooks; the built-in ``core`` plugin implements them by dispatching to the strategy and formats named in
the options. Each receives ``manager``, the calling :class:`~mindone_lora_plugin.plugins.LoraPluginManager`, to
look strategies and formats up by name; callers use the manager's methods (``pm.add_adapters(models, options)``),
which pass it. A plugin may wrap them (``@hookimpl(wrapper=True)``) to observe or adjust what happens, or implement
them with ``tryfirst=True`` to take over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    from mindone_lora_plugin.algorithms.base import LoraAlgorithm
    from mindone_lora_plugin.architectures.base import Architecture
    from mindone_lora_plugin.formats.base import LoraFormat
    from mindone_lora_plugin.models import Models
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.plugins import LoraPluginManager
    from mindone_lora_plugin.state import LoraState
    from mindone_lora_plugin.strategies.base import LoraStrategy
    from mindone_lora_plugin.train.features.base import TrainingFeature

PROJECT_NAME = "mindone_lora"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# ---------------------------------------------------------------------------------------------- discovery hooks


@hookspec
def mindone_lora_strategies() -> Iterable["LoraStrategy"]:
    """Yield the LoRA strategies this plugin offers.

    A strategy decides which modules of which model components get adapters, with which rank and alpha, which
    parameters train, and how the adapted models turn into a :class:`~mindone_lora_plugin.state.LoraState` and back.

    Example::

        from mindone_lora_plugin.hookspecs import hookimpl
        from mindone_lora_plugin.strategies.base import LoraStrategy

        class FeedForwardOnly(LoraStrategy):
            name = "ff"
            description = "LoRA on the UNet feed-forward layers only"
            components = ("unet",)

            def target_modules(self, component, cell, options):
                every = super().target_modules(component, cell, options)  # path -> (rank, alpha)
                return {p: ra for p, ra in every.items() if ".ff." in p}

        @hookimpl
        def mindone_lora_strategies():
            yield FeedForwardOnly()
    """


@hookspec
def mindone_lora_formats() -> Iterable["LoraFormat"]:
    """Yield the LoRA file formats this plugin can read and write.

    Example::

        from mindone_lora_plugin.formats.base import LoraFormat

        class NpzFormat(LoraFormat):
            name = "npz"
            description = "numpy archive (for debugging)"
            ...

        @hookimpl
        def mindone_lora_formats():
            yield NpzFormat()
    """


@hookspec
def mindone_lora_algorithms() -> Iterable["LoraAlgorithm"]:
    """Yield the adapter algorithms this plugin offers (what ``--lora_algo`` chooses).

    An algorithm decides *what* an adapter is: its tensors and their initialisation, the MindSpore layer around a
    Linear/Conv2d, the weight change it gives, shape checks, and its tensor names in kohya/LyCORIS files (and in
    PEFT/diffusers files where PEFT has a layout). Strategies keep deciding *where* adapters go.

    Example::

        import numpy as np

        from mindone_lora_plugin.algorithms.base import LoraAlgorithm, as_f64
        from mindone_lora_plugin.hookspecs import hookimpl

        class ScaledIdentity(LoraAlgorithm):
            name = "diag"
            description = "a learned diagonal weight change (square Linear layers only)"
            roles = ("diag",)
            kohya_names = {"diag": "diag_w"}
            up_roles = ("diag",)

            def rank(self, mod):
                return 1

            def base_shape(self, mod):
                n = mod.tensors["diag"].shape[0]
                return (n, n)

            def delta(self, mod, base_weight=None):
                return np.diag(as_f64(mod.tensors["diag"])) * self.scale(mod)

        @hookimpl
        def mindone_lora_algorithms():
            yield ScaledIdentity()
    """


@hookspec
def mindone_lora_architectures() -> Iterable["Architecture"]:
    """Yield the model families (architectures) this plugin adds (SD1.x, SD2.x, SDXL and FLUX.1 are built in).

    An architecture owns everything model-specific: detecting itself from a model folder's configs and from a LoRA
    file's keys or metadata, its components and how to load them, which modules the target presets adapt, the kohya
    names of its modules, the metadata its files carry, the training loss and conditioning, and its pipelines.
    A subclass of a built-in family changes only what differs.

    Example::

        from mindone_lora_plugin.architectures.base import Evidence, STRUCTURE
        from mindone_lora_plugin.architectures.sd.arch import SD1
        from mindone_lora_plugin.hookspecs import hookimpl

        class MySD(SD1):  # an SD1.x fine-tune whose folders and LoRA files say so
            name = "mysd"
            label = "MySD"
            description = "SD1.x with a custom pipeline class"

            def detect_folder(self, folder):
                return 10 if folder.class_name == "MySDPipeline" else 0

            def detect_lora(self, parsed, tensors, metadata, sgm_used=False):
                if metadata.get("mysd.version"):
                    return Evidence(self.name, STRUCTURE, "its header has mysd.version")
                return None

        @hookimpl
        def mindone_lora_architectures():
            yield MySD()
    """


@hookspec
def mindone_lora_training_features() -> Iterable[type["TrainingFeature"]]:
    """Yield the training feature classes this plugin offers (the class, not an instance: the trainer makes one per
    run).

    A training feature is one module around the training step with a small lifecycle
    (:mod:`mindone_lora_plugin.train.features.base`): its flags, their checks (before any model loads), set-up,
    per-step work, its part of checkpoints and resume, its ``ss_*`` metadata and a finish. The trainer calls every
    installed feature at each point, in ``order`` then name.

    Example::

        from mindone_lora_plugin.hookspecs import hookimpl
        from mindone_lora_plugin.train.features.base import TrainingFeature

        class LossPrinter(TrainingFeature):
            name = "loss_printer"
            description = "--print_every N: a line every N steps"

            @classmethod
            def add_arguments(cls, parser):
                parser.add_argument_group("loss printer").add_argument("--print_every", type=int, default=None)

            def after_step(self, run, global_step, writer):
                if self.args.print_every and global_step % self.args.print_every == 0:
                    run.say(f"step {global_step}")

            def metadata(self):
                return {"ss_print_every": str(self.args.print_every)}

        @hookimpl
        def mindone_lora_training_features():
            yield LossPrinter
    """


@hookspec
def mindone_lora_add_arguments(parser: "argparse._ArgumentGroup") -> None:
    """Add this plugin's command-line arguments to ``mindone-lora train`` and to scripts using the integration API.

    Parsed values reach strategies and formats through ``LoraOptions.extra`` (a dict keyed by ``dest``).
    Prefix names with the plugin's name to avoid clashes.

    Example::

        @hookimpl
        def mindone_lora_add_arguments(parser):
            parser.add_argument("--lora_fa_freeze_a", action="store_true", help="keep LoRA A matrices frozen")
    """


# ---------------------------------------------------------------------------------------------- operation hooks


@hookspec(firstresult=True)
def mindone_lora_add_adapters(manager: "LoraPluginManager", models: "Models",
                              options: "LoraOptions") -> dict[str, list[str]] | None:
    """Add LoRA adapters to ``models`` as ``options`` say; return the adapted module paths per component.

    Called once, before the optimizer is built. Must fail with a
    :class:`~mindone_lora_plugin.errors.LoraError` before changing anything when the strategy does not fit the
    models (for example ``sdxl`` on an SD1.x model).

    Example::

        adapted = pm.add_adapters(models, options)
        # {"unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", ...]}
    """


@hookspec(firstresult=True)
def mindone_lora_trainable_parameters(manager: "LoraPluginManager", models: "Models",
                                      options: "LoraOptions") -> list[dict] | None:
    """Return the parameter groups to optimize: ``[{"params": [...], "lr": float, "component": str}, ...]``.

    Exactly the LoRA parameters of the enabled components, with names unique across components, in fp32.

    Example::

        groups = pm.trainable_parameters(models, options)
        # MindSpore optimizers accept only their own group keys: drop "component"
        optimizer = nn.AdamWeightDecay([{"params": g["params"], "lr": g["lr"]} for g in groups],
                                       learning_rate=options.learning_rate)
    """


@hookspec(firstresult=True)
def mindone_lora_save_weights(manager: "LoraPluginManager", models: "Models", options: "LoraOptions", output_dir: str,
                              formats: list[str], output_name: str, metadata: dict[str, str]) -> list[str] | None:
    """Save the LoRA weights of ``models`` in every format of ``formats`` into ``output_dir``; return the paths.

    Files are written atomically. ``metadata`` holds training arguments and names as strings.

    Example::

        paths = pm.save_weights(models, options, "out", ["diffusers", "kohya"], output_name="my_lora",
                                metadata={"ss_steps": "100"})
    """


@hookspec(firstresult=True)
def mindone_lora_load_weights(manager: "LoraPluginManager", models: "Models", options: "LoraOptions",
                              path: str) -> "LoraState | None":
    """Load a LoRA file (any readable format) into ``models``' adapters (adding them if needed); return the state.

    The rank and alpha of every module are restored exactly; keys that match no module are an error.

    Example::

        state = pm.load_weights(models, options, "lora.safetensors")
    """
