"""What ``mindone-lora run`` knows about one script run (:class:`ScriptSession`): the request, the script's models,
the checks made where the script has built everything, and the files written. The seams that hand the script's
calls to it are in :mod:`~mindone_lora_plugin.scripts.seams`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import replace

from mindone_lora_plugin.architectures import text_encoders
from mindone_lora_plugin.errors import LoraError

log = logging.getLogger("mindone_lora.run")

_LAYER_ARGS = {"unet": "unet_lora_layers", "text_encoder": "text_encoder_lora_layers",
               "text_encoder_2": "text_encoder_2_lora_layers"}


def component_of(cell) -> str | None:
    """The component a script's cell is (``unet``, ``text_encoder``, ``text_encoder_2`` ...), by its class, as the
    installed architectures define them (:func:`mindone_lora_plugin.architectures.component_of`), else ``None``."""
    from mindone_lora_plugin.architectures import component_of as by_class

    return by_class(cell)


class ScriptSession:
    """What ``mindone-lora run`` knows about one script run: the request, the script's models, what was saved."""

    def __init__(self, lora, script: str = "the script", script_args=()):
        self.lora = lora  # a LoraIntegration: strategy, alpha, targets, formats, resume file, plugin options
        self.pm = lora.pm
        self.script = script
        self.script_name = os.path.basename(script) or "the script"
        self.script_args = list(script_args)
        self.models: dict[str, object] = {}
        self.options: dict[str, object] = {}
        self.trainable: dict[str, list] = {}
        self.adapted: dict[str, list[str]] = {}
        self.script_configs: dict[str, dict] = {}
        self.started = False
        self.resumed_from: str | None = None
        self.saved: list[str] = []
        self.last_saved: list[str] = []
        self.saves = 0
        self._depth = 0

    # ------------------------------------------------------------------ helpers

    @property
    def inside(self) -> bool:
        """True while the plugin itself calls into mindone (its own ``add_adapter`` calls pass straight through)."""
        return self._depth > 0

    @contextlib.contextmanager
    def plugin_call(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def architecture(self, cells: dict | None = None) -> str:
        from mindone_lora_plugin.models import guess_architecture

        return guess_architecture(dict(self.models if cells is None else cells))

    def bundle(self, components=None):
        from mindone_lora_plugin.models import Models

        comps = list(self.models) if components is None else list(components)
        return Models(**{c: self.models[c] for c in comps}, architecture=self.architecture())

    def full_options(self, architecture: str | None = None):
        """The options as one run: rank/alpha/init of the first adapted component, text encoders on if adapted."""
        arch = architecture or self.architecture()
        first = next(iter(self.script_configs.values()), {})
        return self.lora.make_options(arch, rank=first.get("r"), alpha=first.get("lora_alpha"),
                                      init=first.get("init"),
                                      train_text_encoder=any(c in text_encoders(arch) for c in self.models))

    # ------------------------------------------------------------------ seam: add_adapter

    def on_add_adapter(self, cell, config, adapter_name, original):
        from mindone_lora_plugin.models import ADAPTER, Models

        comp = component_of(cell)
        if comp is None:
            log.warning("mindone-lora run: %s.add_adapter is left to the script (only UNets and CLIP text encoders "
                        "are switched to the plugin)", type(cell).__name__)
            return original()
        if adapter_name not in (None, ADAPTER):
            raise LoraError(f"{self.script_name} names its adapter '{adapter_name}'; mindone-lora run handles "
                            f"the default adapter only")
        if type(config).__name__ != "LoraConfig":
            raise LoraError(f"{self.script_name} adds a {type(config).__name__} adapter to its {comp}; mindone-lora "
                            f"run switches LoRA adapters (LoraConfig) only")
        if comp in self.models and self.models[comp] is not cell and self.started:
            log.warning("mindone-lora run: after training started %s adds adapters to another %s; left to the "
                        "script", self.script_name, comp)
            return original()
        if comp in self.models:
            what = "a second adapter to its" if self.models[comp] is cell else "adapters to a second"
            raise LoraError(f"{self.script_name} adds {what} {comp}; mindone-lora run supports one LoRA adapter "
                            f"per model")
        cells = dict(self.models)
        cells[comp] = cell
        arch = self.architecture(cells)
        init = "gaussian" if getattr(config, "init_lora_weights", True) == "gaussian" else "default"
        targets = getattr(config, "target_modules", None)
        script_cfg = {"r": int(config.r), "lora_alpha": float(config.lora_alpha), "init": init,
                      "target_modules": sorted(targets) if isinstance(targets, (list, tuple, set)) else str(targets)}
        full = self.lora.make_options(arch, rank=script_cfg["r"], alpha=script_cfg["lora_alpha"], init=init,
                                      train_text_encoder=any(c in text_encoders(arch) for c in cells))
        strategy = self.pm.get_strategy(full.strategy)
        if comp not in strategy.enabled_components(Models(**cells, architecture=arch), full):
            raise LoraError(self._not_adapted(strategy, comp, Models(**cells, architecture=arch)))
        options = replace(full, components=(comp,))
        single = Models(**{comp: cell}, architecture=arch)
        with self.plugin_call():
            adapted = self.pm.add_adapters(single, options) or {}
            groups = self.pm.trainable_parameters(single, options) or []
        self.models[comp] = cell
        self.options[comp] = options
        self.script_configs[comp] = script_cfg
        self.adapted[comp] = list(adapted.get(comp, []))
        self.trainable[comp] = [p for g in groups for p in g["params"]]
        say(f"{comp}: strategy '{options.strategy}' adapted {len(self.adapted[comp])} modules (targets "
             f"{_targets_text(options.targets)}, rank {options.rank}, alpha {options.effective_alpha:g}) instead of "
             f"the script's {_targets_text(script_cfg['target_modules'])}")
        return None

    def _not_adapted(self, strategy, comp: str, models) -> str:
        from mindone_lora_plugin.options import default_strategy

        name = strategy.name
        if comp == "unet":
            return (f"strategy '{name}' does not train the unet, but {self.script_name} adds LoRA adapters to its "
                    f"unet and trains them; choose a strategy that trains the unet "
                    f"(--lora_strategy {default_strategy(None, models.architecture)})")
        if strategy.preferred_strategy(models) and comp not in strategy.adaptable_components(models):
            hint = strategy.text_encoder_hint(models)
        else:
            hint = "choose a strategy that trains the text encoders"
        return (f"strategy '{name}' does not train the {comp}, but {self.script_name} adds LoRA adapters to it "
                f"(its --train_text_encoder); {hint}, or run the script without --train_text_encoder")

    # ------------------------------------------------------------------ seam: the training step is built

    def on_training_start(self, train_step) -> None:
        if self.started:
            return
        self.started = True
        if not self.models:
            raise LoraError(f"{self.script_name} builds its training step without adding LoRA adapters to a UNet or "
                            f"text encoder (no add_adapter call); mindone-lora run works with mindone's LoRA "
                            f"training scripts")
        arch = self.architecture()
        full = self.full_options(arch)
        strategy = self.pm.get_strategy(full.strategy)
        wanted = strategy.enabled_components(self.bundle(), full)
        missing = [c for c in wanted if c not in self.models]
        if missing:
            them = "it" if len(missing) == 1 else "them"
            raise LoraError(f"strategy '{strategy.name}' trains the {' and '.join(missing)}, but "
                            f"{self.script_name} never adds LoRA adapters to {them} (it adapts only the "
                            f"{' and '.join(self.models)}); choose a strategy for the "
                            f"{' and '.join(self.models)}, or a script option that trains the text encoders "
                            f"(e.g. its --train_text_encoder)")
        optimizer = getattr(train_step, "optimizer", None)
        if optimizer is not None and hasattr(optimizer, "parameters"):
            held = {id(p) for p in optimizer.parameters}
            for comp, params in self.trainable.items():
                left = [p for p in params if id(p) not in held]
                if left:
                    part = "them" if len(left) == len(params) else f"{len(left)} of its {len(params)} LoRA parameters"
                    raise LoraError(f"{self.script_name} adds LoRA adapters to its {comp} but never optimizes {part} "
                                    f"(its optimizer leaves them out), so strategy '{strategy.name}' cannot train the "
                                    f"{comp}; run the script without adapting the {comp} (e.g. without its "
                                    f"--train_text_encoder) or fix its optimizer")
        if self.lora.resume_from:
            from mindone_lora_plugin.integration import load_into

            with self.plugin_call():
                state = load_into(self.pm, self.bundle(), full, self.lora.resume_from, self.adapted)
            self.resumed_from = self.lora.resume_from
            say(f"warm start from {self.lora.resume_from} ({len(state)} modules)")

    # ------------------------------------------------------------------ seam: save_lora_weights

    def on_save(self, arguments: dict, original):
        from mindone_lora_plugin.formats.diffusers import WEIGHT_NAME
        from mindone_lora_plugin.integration import output_name_for

        if not self.models:
            return original()
        if not arguments.get("is_main_process", True):
            return original()  # mindone writes nothing off the main process; neither do we
        passed = [c for c, arg in _LAYER_ARGS.items() if arguments.get(arg)]
        unknown = [c for c in passed if c not in self.models]
        if unknown or not passed:
            log.warning("mindone-lora run: %s saves LoRA weights of %s, which it did not adapt through add_adapter; "
                        "leaving this save to mindone", self.script_name, ", ".join(unknown) or "nothing")
            return original()
        directory = str(arguments["save_directory"])
        if os.path.isfile(directory):
            raise LoraError(f"{self.script_name} saves LoRA weights into {directory}, which is a file")
        os.makedirs(directory, exist_ok=True)
        safe = arguments.get("safe_serialization", True)
        formats = list(self.lora.save_formats)
        algorithm = self.pm.get_algorithm(self.lora.algorithm)
        if safe and self.pm.get_format("diffusers").supports(algorithm):  # the file the script means to write
            formats = ["diffusers"] + [f for f in formats if f != "diffusers"]
        elif safe and self.saves == 0:
            say(f"{WEIGHT_NAME} is not written: the diffusers layout cannot hold {algorithm.name} adapters "
                 f"(written: {', '.join(formats)})")
        else:  # the script asked for a MindSpore checkpoint: let mindone write that, add the requested formats
            original()
        name = self.lora.output_name or output_name_for(directory)
        metadata = {"ss_output_name": name,
                    "ss_training_comment": f"trained with {self.script_name} through mindone-lora run",
                    "mindone_lora.script": self.script_name,
                    "mindone_lora.script_args": json.dumps(self.script_args)}
        models = self.bundle(passed)
        options = replace(self.full_options(), components=tuple(passed))
        with self.plugin_call():
            paths = list(self.pm.save_weights(models, options, directory, formats, output_name=name,
                                              metadata=metadata) or [])
        weight_name = arguments.get("weight_name")
        if safe and weight_name and weight_name != WEIGHT_NAME:
            src = os.path.join(directory, WEIGHT_NAME)
            if src in paths:
                dst = os.path.join(directory, weight_name)
                os.replace(src, dst)
                paths[paths.index(src)] = dst
        self.saved.extend(paths)
        self.last_saved = list(paths)
        self.saves += 1
        say(f"wrote {', '.join(paths)}")
        return None


def say(message: str) -> None:
    print(f"mindone-lora run: {message}", file=sys.stderr, flush=True)


def _targets_text(targets) -> str:
    if isinstance(targets, str):
        return targets
    items = list(targets)
    return ",".join(items) if len(items) <= 6 else ",".join(items[:6]) + f",... ({len(items)})"


