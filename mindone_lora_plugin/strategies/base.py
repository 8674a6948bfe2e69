"""The strategy plugin object: which modules get LoRA, how they train, and model ⇄ :class:`LoraState`.

A plugin offers strategies by yielding instances of a :class:`LoraStrategy` subclass from its
``mindone_lora_strategies()`` hook implementation. The base class does the work through mindone.peft
(``LoraConfig`` + ``add_adapter``); a subclass usually only chooses targets (:meth:`target_modules`) or trainable
parameters (:meth:`trainable_parameters`).
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import numpy as np

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.models import ADAPTER, base_layer_of, lora_layers
from mindone_lora_plugin.options import PRESETS, LoraOptions
from mindone_lora_plugin.state import LoraModule, LoraState, most_common

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
TE_MLP = ("fc1", "fc2")
# kohya's target containers (networks/lora.py): every Linear/Conv2d below them is adapted.
UNET_TRANSFORMER_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
LINEAR_CLASSES = ("Linear", "Dense")
CONV_CLASSES = ("Conv2d",)


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
            if options.extra.get("train_text_encoder"):
                wanted += [c for c in self.adaptable_components(models) if c in TEXT_ENCODERS and c not in wanted]
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
        if not isinstance(options.targets, list) and options.targets not in PRESETS:
            raise LoraError(f"unknown target preset '{options.targets}': choose one of {', '.join(PRESETS)} or give "
                            f"a comma-separated list of module names")
        for comp in self.enabled_components(models, options):
            if comp not in self.adaptable_components(models):
                if comp in TEXT_ENCODERS and models.architecture == "sdxl":
                    hint = "use --lora_strategy sdxl to train the SDXL text encoders"
                else:
                    hint = f"it adapts {', '.join(self.adaptable_components(models))}"
                raise LoraError(f"strategy '{self.name}' cannot adapt '{comp}': {hint}")
            if comp not in models:
                raise LoraError(f"strategy '{self.name}' needs a {comp} but the model has none "
                                f"(it has {', '.join(models) or 'nothing'})")
        if (options.extra.get("train_text_encoder") and not options.components
                and not any(c in TEXT_ENCODERS for c in self.enabled_components(models, options))):
            # --train_text_encoder must not be dropped silently (e.g. the unet strategy on SDXL)
            hint = ("use --lora_strategy sdxl to train the SDXL text encoders" if models.architecture == "sdxl"
                    else f"it adapts {', '.join(self.adaptable_components(models))}")
            raise LoraError(f"strategy '{self.name}' cannot train a text encoder (--train_text_encoder): {hint}")
        for comp in self.enabled_components(models, options):
            if not self.target_modules(comp, models[comp], options):
                raise LoraError(f"no module of the {comp} matches the LoRA targets {options.targets!r}; "
                                f"check --lora_targets")

    def _suggest(self, models) -> str:
        return "use --lora_strategy sdxl" if models.architecture == "sdxl" else "use --lora_strategy unet"

    def target_modules(self, component: str, cell, options: LoraOptions) -> dict[str, tuple[int, float]]:
        """Module path → ``(rank, alpha)`` for every module of ``cell`` to adapt.

        The default follows the preset in ``options.targets`` (or the explicit list): ``attn`` = attention
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
        te = component in TEXT_ENCODERS
        if targets == "attn":
            names = TE_ATTN if te else UNET_ATTN
            return {p: (rank, alpha) for p, _ in adaptable_layers(cell) if any(p.endswith("." + n) for n in names)}
        containers = TE_CLASSES if te else UNET_TRANSFORMER_CLASSES
        if targets == "kohya-conv" and not te:
            containers = containers + UNET_CONV_CLASSES
        out = {}
        for path, layer in adaptable_layers(cell, containers):
            if is_conv(layer) and tuple(layer.weight.shape[2:]) != (1, 1):
                out[path] = (crank, calpha)
            else:
                out[path] = (rank, alpha)
        return out

    # ------------------------------------------------------------------ operations

    def lora_config(self, targets: dict[str, tuple[int, float]], options: LoraOptions):
        """A mindone.peft ``LoraConfig`` adapting exactly ``targets`` with their per-module rank and alpha."""
        from mindone.peft import LoraConfig

        r = most_common(Counter(rk for rk, _ in targets.values()))
        a = most_common(Counter(al for _, al in targets.values()))
        init = "gaussian" if options.init == "gaussian" else True
        return LoraConfig(r=int(r), lora_alpha=a, init_lora_weights=init, target_modules=sorted(targets),
                          rank_pattern={p: rk for p, (rk, _) in targets.items() if rk != r},
                          alpha_pattern={p: al for p, (_, al) in targets.items() if al != a})

    def add_adapters(self, models, options: LoraOptions) -> dict[str, list[str]]:
        """Add adapters to the enabled components; return the adapted module paths per component."""
        self.check(models, options)
        plan = {c: self.target_modules(c, models[c], options) for c in self.enabled_components(models, options)}
        adapted = {}
        for comp, targets in plan.items():
            cell = models[comp]
            for p in cell.get_parameters():
                p.requires_grad = False
            cell.add_adapter(self.lora_config(targets, options), adapter_name=ADAPTER)
            adapted[comp] = sorted(p for p, _ in lora_layers(cell))
        return adapted

    def trainable_parameters(self, models, options: LoraOptions) -> list[dict]:
        """Parameter groups of exactly the LoRA parameters of the enabled components, unique names, fp32."""
        import mindspore as ms

        groups = []
        for comp in self.enabled_components(models, options):
            params = []
            for path, layer in lora_layers(models[comp]):
                for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight):
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
        """The trainable parameters of one LoRA layer by role (A and B; a LoRA-FA strategy returns only B)."""
        return {"lora_A": layer.lora_A[ADAPTER].weight, "lora_B": layer.lora_B[ADAPTER].weight}

    def extract(self, models) -> LoraState:
        """The adapted models' LoRA weights as a :class:`LoraState` (all components that carry adapters)."""
        state = LoraState(architecture=models.architecture, unet_layers_per_block=models.unet_layers_per_block)
        for comp, cell in models.items():
            for path, layer in lora_layers(cell):
                if ADAPTER not in layer.lora_A:
                    continue
                down = layer.lora_A[ADAPTER].weight.asnumpy().astype(np.float32)
                up = layer.lora_B[ADAPTER].weight.asnumpy().astype(np.float32)
                if up.ndim == 2 and down.ndim == 4:  # keep kohya/PEFT layouts
                    up = up[:, :, None, None]
                state.add(comp, path, LoraModule(down, up, float(layer.lora_alpha[ADAPTER])))
        return state

    def apply(self, models, state: LoraState, options: LoraOptions | None = None) -> None:
        """Put ``state``'s weights into ``models``, adding adapters where there are none yet.

        Where adapters exist, every module of ``state`` must be adapted with the same rank; its alpha is restored.
        """
        import mindspore as ms

        for comp in state.components:
            if comp not in models:
                raise LoraError(f"the LoRA has weights for {comp} but the model has no {comp}: it was made for "
                                f"another architecture ({state.architecture or 'unknown'} vs {models.architecture})")
        for comp, modules in state.components.items():
            cell = models[comp]
            layers = dict(lora_layers(cell))
            if not layers:
                targets = {p: (m.rank, float(m.alpha)) for p, m in modules.items()}
                known = dict(adaptable_layers(cell))
                unknown = sorted(set(targets) - set(known))
                if unknown:
                    raise LoraError(f"{len(unknown)} LoRA module(s) match no module of the {comp}, e.g. "
                                    f"{', '.join(unknown[:3])}; the LoRA was made for another model")
                cell.add_adapter(self.lora_config(targets, options or LoraOptions()), adapter_name=ADAPTER)
                layers = dict(lora_layers(cell))
            for path, mod in modules.items():
                layer = layers.get(path)
                if layer is None:
                    raise LoraError(f"{comp}.{path} has no LoRA adapter in this run; the file was trained with other "
                                    f"targets (use the same --lora_targets/--lora_strategy)")
                if int(layer.r[ADAPTER]) != mod.rank:
                    raise LoraError(f"{comp}.{path} has rank {mod.rank} in the file but {layer.r[ADAPTER]} here; use "
                                    f"--lora_rank {mod.rank} (and the same targets) to load it")
                a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                up = mod.up.reshape(b.shape) if mod.up.size == int(np.prod(b.shape)) else mod.up
                if tuple(mod.down.shape) != tuple(a.shape) or tuple(up.shape) != tuple(b.shape):
                    raise LoraError(f"shape mismatch at {comp}.{path}: the file has down {list(mod.down.shape)} / up "
                                    f"{list(mod.up.shape)} but the model expects {list(a.shape)} / {list(b.shape)}")
                a.set_data(ms.Tensor(np.asarray(mod.down, dtype=np.float32), dtype=a.dtype))
                b.set_data(ms.Tensor(np.asarray(up, dtype=np.float32), dtype=b.dtype))
                layer.lora_alpha[ADAPTER] = float(mod.alpha)
                layer.scaling[ADAPTER] = float(mod.alpha) / mod.rank

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "components": list(self.components),
                "default_components": list(self.default_components),
                "architectures": list(self.architectures) if self.architectures else None}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def is_linear(cell) -> bool:
    return type(cell).__name__ in LINEAR_CLASSES


def is_conv(cell) -> bool:
    return type(cell).__name__ in CONV_CLASSES


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
