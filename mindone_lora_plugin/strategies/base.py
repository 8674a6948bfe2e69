"""The strategy plugin object: which modules get LoRA, how they train, and model ⇄ :class:`LoraState`.

A plugin offers strategies by yielding instances of a :class:`LoraStrategy` subclass from its
``mindone_lora_strategies()`` hook implementation. A strategy decides *where* adapters go (components, modules, rank
and alpha per module); the run's algorithm (``options.algorithm``: plain ``lora`` through mindone.peft, or a plugin's
LoHa/LoKr/...) decides *what* they are. A subclass usually only chooses targets (:meth:`target_modules`) or trainable
parameters (:meth:`layer_parameters`).
"""

from __future__ import annotations

from typing import ClassVar

from mindone_lora_plugin.architectures import find_architecture, text_encoders
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.models import base_layer_of, is_conv, is_linear, lora_layers
from mindone_lora_plugin.options import PRESETS, LoraOptions
from mindone_lora_plugin.state import LoraState


class LoraStrategy:
    """Base class of LoRA strategies.

    Class attributes a subclass sets: :attr:`name`, :attr:`description` (one line), :attr:`components` (the
    components it can adapt), :attr:`default_components` (adapted unless the options say otherwise) and
    :attr:`architectures` (the base architectures it fits, ``None`` for any).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    components: ClassVar[tuple[str, ...]] = ("unet",)
    default_components: ClassVar[tuple[str, ...]] = ("unet",)
    architectures: ClassVar[tuple[str, ...] | None] = None

    # ------------------------------------------------------------------ what to adapt

    def enabled_components(self, models, options: LoraOptions) -> list[str]:
        """The components this run adapts: ``options.components``, else the defaults (+ text encoders on request)."""
        if options.components:
            wanted = list(options.components)
        else:
            wanted = list(self.default_components)
            if options.trains_text_encoder:
                encoders = text_encoders(models.architecture)
                wanted += [c for c in self.adaptable_components(models) if c in encoders and c not in wanted]
        return wanted

    def adaptable_components(self, models) -> tuple[str, ...]:
        """The components this strategy can adapt on ``models`` (default: :attr:`components`)."""
        return self.components

    def check(self, models, options: LoraOptions) -> None:
        """Raise :class:`LoraError` before any work when this strategy does not fit ``models`` or ``options``."""
        if self.architectures and models.architecture not in self.architectures:
            raise LoraError(
                f"strategy '{self.name}' is for {'/'.join(self.architectures)} models but this model is "
                f"{models.architecture}; {self._suggest(models)}")
        if options.rank < 1:
            raise LoraError(f"LoRA rank must be at least 1, got {options.rank}")
        arch = find_architecture(models.architecture)
        presets = arch.presets() if arch is not None else PRESETS
        if not isinstance(options.targets, list) and options.targets not in presets:
            raise LoraError(f"unknown target preset '{options.targets}': choose one of {', '.join(presets)} or give "
                            f"a comma-separated list of module names")
        for comp in self.enabled_components(models, options):
            if comp not in self.adaptable_components(models):
                if comp in text_encoders(models.architecture) and self.preferred_strategy(models):
                    hint = self.text_encoder_hint(models)
                else:
                    hint = f"it adapts {', '.join(self.adaptable_components(models))}"
                raise LoraError(f"strategy '{self.name}' cannot adapt '{comp}': {hint}")
            if comp not in models:
                raise LoraError(f"strategy '{self.name}' needs a {comp} but the model has none "
                                f"(it has {', '.join(models) or 'nothing'})")
        if (options.trains_text_encoder and not options.components
                and not any(c in text_encoders(models.architecture)
                            for c in self.enabled_components(models, options))):
            # --train_text_encoder must not be dropped silently (e.g. the unet strategy on SDXL)
            hint = (self.text_encoder_hint(models) if self.preferred_strategy(models)
                    else f"it adapts {', '.join(self.adaptable_components(models))}")
            raise LoraError(f"strategy '{self.name}' cannot train a text encoder (--train_text_encoder): {hint}")
        for comp in self.enabled_components(models, options):
            if not self.target_modules(comp, models[comp], options):
                raise LoraError(f"no module of the {comp} matches the LoRA targets {options.targets!r}; "
                                f"check --lora_targets")

    def _suggest(self, models) -> str:
        arch = find_architecture(models.architecture)
        return f"use --lora_strategy {arch.default_strategy if arch is not None else 'unet'}"

    def preferred_strategy(self, models) -> str | None:
        """The architecture's default strategy when it is another than this one (``sdxl`` on SDXL for ``unet``)."""
        arch = find_architecture(models.architecture)
        if arch is None or arch.default_strategy == self.name:
            return None
        return arch.default_strategy

    def text_encoder_hint(self, models) -> str:
        arch = find_architecture(models.architecture)
        return f"use --lora_strategy {self.preferred_strategy(models)} to train the {arch.label} text encoders"

    def target_modules(self, component: str, cell, options: LoraOptions) -> dict[str, tuple[int, float]]:
        """Module path → ``(rank, alpha)`` for every module of ``cell`` to adapt.

        The default follows the preset in ``options.targets`` (or the explicit list) as the architecture defines it
        (:meth:`~mindone_lora_plugin.architectures.base.Architecture.target_rules`). For SD: ``attn`` = attention
        projections; ``kohya`` = every Linear/1×1 conv in the UNet's transformer blocks and every Linear of the CLIP
        attention/MLP; ``kohya-conv`` = ``kohya`` plus the ResNet, downsampler and upsampler layers, 3×3 convs with
        ``conv_rank``/``conv_alpha``.
        """
        rank, alpha = options.rank, options.effective_alpha
        crank, calpha = options.effective_conv_rank, options.effective_conv_alpha
        targets = options.targets
        if isinstance(targets, list):
            return {p: (rank, alpha) for p, _ in adaptable_layers(cell)
                    if any(p == t or p.endswith("." + t) for t in targets)}
        rule = target_rule(component, cell, options)
        out = {}
        if rule.names:
            out.update({p: (rank, alpha) for p, _ in adaptable_layers(cell)
                        if any(p.endswith("." + n) for n in rule.names)})
        if rule.containers:
            for path, layer in adaptable_layers(cell, rule.containers):
                if is_conv(layer) and tuple(layer.weight.shape[2:]) != (1, 1):
                    out[path] = (crank, calpha)
                else:
                    out[path] = (rank, alpha)
        return out

    # ------------------------------------------------------------------ operations (the algorithm decides *what*)

    def algorithm(self, options: LoraOptions | None):
        """The adapter algorithm of a run (``options.algorithm``, default plain ``lora``)."""
        from mindone_lora_plugin.algorithms import get_algorithm

        return get_algorithm(getattr(options, "algorithm", None) or "lora")

    def lora_config(self, targets: dict[str, tuple[int, float]], options: LoraOptions):
        """A mindone.peft ``LoraConfig`` adapting exactly ``targets`` (plain LoRA; see the ``lora`` algorithm)."""
        from mindone_lora_plugin.algorithms.lora import PlainLora

        return PlainLora().lora_config(targets, options)

    def add_adapters(self, models, options: LoraOptions) -> dict[str, list[str]]:
        """Add adapters to the enabled components; return the adapted module paths per component."""
        self.check(models, options)
        algo = self.algorithm(options)
        algo.check_options(options)
        plan = {c: self.target_modules(c, models[c], options) for c in self.enabled_components(models, options)}
        adapted = {}
        for comp, targets in plan.items():
            cell = models[comp]
            for p in cell.get_parameters():
                p.requires_grad = False
            algo.add_adapters(cell, targets, options)
            adapted[comp] = sorted(p for p, _ in lora_layers(cell))
        return adapted

    def trainable_parameters(self, models, options: LoraOptions) -> list[dict]:
        """Parameter groups of exactly the adapter parameters of the enabled components, unique names, fp32."""
        import mindspore as ms

        groups = []
        for comp in self.enabled_components(models, options):
            params = []
            for path, layer in lora_layers(models[comp]):
                for p in algorithm_of_layer(layer).layer_parameters(layer).values():
                    p.requires_grad = False
                for role, p in self.layer_parameters(layer).items():
                    if p.dtype != ms.float32:
                        p.set_dtype(ms.float32)
                    p.requires_grad = True
                    p.name = f"{comp}.{path}.{role}.weight"  # unique across components (SDXL's two encoders)
                    params.append(p)
            if params:
                groups.append({"params": params, "lr": options.lr_for(comp), "component": comp})
        return groups

    def layer_parameters(self, layer) -> dict:
        """The trainable parameters of one adapter layer by role (its algorithm's; a LoRA-FA strategy returns only
        B). Plain LoRA's roles are ``lora_A``/``lora_B``."""
        return algorithm_of_layer(layer).layer_parameters(layer)

    def extract(self, models) -> LoraState:
        """The adapted models' weights as a :class:`LoraState` (all components that carry adapters)."""
        state = LoraState(architecture=models.architecture, base_config=models.base_config)
        for comp, cell in models.items():
            for path, layer in lora_layers(cell):
                algo = algorithm_of_layer(layer, missing_ok=True)
                if algo is not None:
                    state.add(comp, path, algo.read_layer(layer))
        return state

    def apply(self, models, state: LoraState, options: LoraOptions | None = None) -> None:
        """Put ``state``'s weights into ``models``, adding adapters where there are none yet.

        Where adapters exist, every module of ``state`` must be adapted with the same algorithm and shapes; its
        alpha is restored.
        """
        from mindone_lora_plugin.algorithms import get_algorithm

        for comp in state.components:
            if comp not in models:
                raise LoraError(f"the LoRA has weights for {comp} but the model has no {comp}: it was made for "
                                f"another architecture ({state.architecture or 'unknown'} vs {models.architecture})")
        for comp, modules in state.components.items():
            cell = models[comp]
            layers = dict(lora_layers(cell))
            if not layers:
                known = dict(adaptable_layers(cell))
                unknown = sorted(set(modules) - set(known))
                if unknown:
                    raise LoraError(f"{len(unknown)} LoRA module(s) match no module of the {comp}, e.g. "
                                    f"{', '.join(unknown[:3])}; the LoRA was made for another model")
                by_algo: dict[str, dict] = {}
                for p, m in modules.items():
                    by_algo.setdefault(m.algorithm, {})[p] = m
                for name, mods in sorted(by_algo.items()):
                    algo = get_algorithm(name)
                    algo.add_adapters(cell, {p: (m.rank, float(m.alpha)) for p, m in mods.items()},
                                      options or LoraOptions(), modules=mods)
                layers = dict(lora_layers(cell))
            for path, mod in modules.items():
                layer = layers.get(path)
                if layer is None:
                    raise LoraError(f"{comp}.{path} has no LoRA adapter in this run; the file was trained with other "
                                    f"targets (use the same --lora_targets/--lora_strategy)")
                algo = get_algorithm(mod.algorithm)
                if not algo.owns_layer(layer):
                    here = getattr(algorithm_of_layer(layer, missing_ok=True), "name", "another algorithm")
                    raise LoraError(f"{comp}.{path} is a {mod.algorithm} module in the file but the adapter here is "
                                    f"{here}; use --lora_algo {mod.algorithm} to load it")
                algo.write_layer(layer, mod, f"{comp}.{path}")

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "components": list(self.components),
                "default_components": list(self.default_components),
                "architectures": list(self.architectures) if self.architectures else None}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def target_rule(component: str, cell, options: LoraOptions):
    """The :class:`~mindone_lora_plugin.architectures.base.TargetRule` of ``options.targets`` for ``component``: from
    ``options.architecture``, else from the architecture whose component classes ``cell`` has, else from the first
    installed architecture with such a component."""
    from mindone_lora_plugin.architectures import installed_architectures

    archs = installed_architectures()
    chosen = archs.get(options.architecture or "")
    if chosen is None or not chosen.has_component(component):
        matches = [a for a in archs.values() if (a.component_of(cell) or (0, None))[1] == component]
        having = [a for a in archs.values() if a.has_component(component)]
        chosen = (matches or having or [None])[0]
    rules = chosen.target_rules(component) if chosen is not None else {}
    if options.targets not in rules:
        where = f"the {chosen.label} {component}" if chosen is not None else f"a {component}"
        raise LoraError(f"the target preset '{options.targets}' is not defined for {where}; choose one of "
                        f"{', '.join(rules) or '(none)'} or give a comma-separated list of module names")
    return rules[options.targets]


def algorithm_of_layer(layer, missing_ok: bool = False):
    """The installed algorithm whose layer ``layer`` is (None with ``missing_ok`` when none claims it)."""
    from mindone_lora_plugin.algorithms import installed_algorithms

    for algo in installed_algorithms().values():
        if algo.owns_layer(layer):
            return algo
    if missing_ok:
        return None
    raise LoraError(f"no installed algorithm owns the adapter layer {type(layer).__name__}; is its plugin installed?")


def adaptable_layers(cell, containers: tuple[str, ...] | None = None):
    """Yield ``(path, layer)`` for the Linear/Conv2d modules of ``cell`` (inside ``containers`` classes if given).

    LoRA wrappers are looked through: an adapted module is reported with its base layer.
    """
    inside: list[str] = []
    for name, sub in cell.cells_and_names():
        if containers is not None and type(sub).__name__ in containers:
            inside.append(name + ".")
        if ".lora_A." in name + "." or ".lora_B." in name + "." or name.endswith(".base_layer"):
            continue
        layer = base_layer_of(sub)
        if not (is_linear(layer) or is_conv(layer)) or not name:
            continue
        if containers is not None and not any(name.startswith(p) for p in inside):
            continue
        yield name, layer
