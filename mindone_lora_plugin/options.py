"""What a user asked for: :class:`LoraOptions`, built from command-line flags or by a script author."""

from __future__ import annotations

from dataclasses import dataclass, field

PRESETS = ("attn", "kohya", "kohya-conv")
INITS = ("gaussian", "default")


@dataclass
class LoraOptions:
    """Options every strategy understands.

    ``targets`` is a preset name (``attn``, ``kohya``, ``kohya-conv``) or an explicit list of module names (matched
    against the end of a module path, as PEFT's ``target_modules`` does). ``alpha`` defaults to ``rank``;
    ``conv_rank``/``conv_alpha`` (kohya's ``conv_dim``/``conv_alpha``) apply to 3×3 convs with ``kohya-conv`` and
    default to ``rank``/``alpha``. ``components`` switches components on or off (``None`` = the strategy's default).
    ``learning_rates`` maps a component to its own learning rate. ``algorithm`` names the adapter algorithm
(``--lora_algo``: ``lora`` or a plugin's); ``dora`` (``--lora_dora``) makes plain LoRA weight-decomposed (DoRA, Linear
layers only). ``train_text_encoder`` adds the text encoders to a strategy's default
components. ``architecture`` names the base model's architecture (what the target presets mean; ``None``: told by the
adapted cells). ``extra`` carries plugin-added arguments.
    """

    strategy: str = "unet"
    rank: int = 4
    alpha: float | None = None
    targets: str | list[str] = "attn"
    conv_rank: int | None = None
    conv_alpha: float | None = None
    init: str = "gaussian"
    components: tuple[str, ...] | None = None
    learning_rate: float = 1e-4
    learning_rates: dict[str, float] = field(default_factory=dict)
    save_dtype: str | None = None
    algorithm: str = "lora"
    dora: bool = False
    train_text_encoder: bool = False
    architecture: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def trains_text_encoder(self) -> bool:
        """``train_text_encoder`` (``--train_text_encoder``); an older caller's ``extra["train_text_encoder"]`` counts
        too."""
        return bool(self.train_text_encoder or self.extra.get("train_text_encoder"))

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def effective_conv_rank(self) -> int:
        return int(self.conv_rank or self.rank)

    @property
    def effective_conv_alpha(self) -> float:
        if self.conv_alpha is not None:
            return float(self.conv_alpha)
        return float(self.effective_conv_rank if self.alpha is None else self.alpha)

    def lr_for(self, component: str) -> float:
        return float(self.learning_rates.get(component, self.learning_rate))

    def to_metadata(self) -> dict[str, str]:
        return {"strategy": self.strategy, "rank": str(self.rank), "alpha": str(self.effective_alpha),
                "targets": self.targets if isinstance(self.targets, str) else ",".join(self.targets),
                "conv_rank": str(self.effective_conv_rank), "conv_alpha": str(self.effective_conv_alpha),
                "init": self.init, "algorithm": self.algorithm, **({"dora": "True"} if self.dora else {})}


def parse_targets(value: str) -> str | list[str]:
    """``attn`` / ``kohya`` / ``kohya-conv`` stay a preset; anything else is a comma-separated list of module names."""
    value = value.strip()
    if value in all_presets():
        return value
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        from mindone_lora_plugin.errors import LoraError

        raise LoraError(f"--lora_targets is empty: give a preset ({', '.join(PRESETS)}) or module names such as "
                        f"to_q,to_v")
    return names


def all_presets() -> tuple[str, ...]:
    """The core presets and every installed architecture's own (:meth:`Architecture.presets
    <mindone_lora_plugin.architectures.base.Architecture.presets>`)."""
    from mindone_lora_plugin.architectures import installed_architectures

    extra = [p for a in installed_architectures().values() for p in a.presets() if p not in PRESETS]
    return PRESETS + tuple(dict.fromkeys(extra))


def default_strategy(strategy: str | None, architecture: str | None) -> str:
    """The strategy asked for, else the architecture's default (``sdxl`` on an SDXL model, ``unet`` on SD1.x/2.x and
    when the architecture is unknown)."""
    from mindone_lora_plugin.architectures import find_architecture

    arch = find_architecture(architecture)
    return strategy or (arch.default_strategy if arch is not None else "unet")


def build_options(pm, architecture: str | None, *, strategy: str | None = None, algorithm: str | None = None,
                  rank: int = 4, alpha: float | None = None, targets="attn", conv_rank: int | None = None,
                  conv_alpha: float | None = None, init: str = "gaussian", components=None,
                  learning_rate: float = 1e-4, text_encoder_lr: float | None = None, save_dtype: str | None = None,
                  dora: bool = False, train_text_encoder: bool = False, extra: dict | None = None) -> LoraOptions:
    """The one builder from flag values to :class:`LoraOptions`, shared by ``mindone-lora train``
    (``train.settings.options_from_args``) and the integration API (``LoraIntegration.make_options``).

    Checks the strategy and algorithm names against the plugin manager ``pm`` (unknown names list the installed
    ones) and the rank; ``targets`` may be a flag string (parsed) or a list; ``text_encoder_lr`` applies to every
    text encoder.
    """
    from mindone_lora_plugin.errors import LoraError

    strategy = default_strategy(strategy, architecture)
    pm.get_strategy(strategy)  # unknown names list the valid ones
    algorithm = algorithm or "lora"
    pm.get_algorithm(algorithm)
    if dora and algorithm != "lora":
        raise LoraError(f"--lora_dora applies to --lora_algo lora, not {algorithm}; leave one of them out")
    if int(rank) < 1:
        raise LoraError(f"--lora_rank must be at least 1, got {rank}")
    from mindone_lora_plugin.architectures import text_encoders

    lrs = {c: text_encoder_lr for c in text_encoders(architecture)} if text_encoder_lr is not None else {}
    return LoraOptions(strategy=strategy, rank=int(rank), alpha=alpha,
                       targets=parse_targets(targets) if isinstance(targets, str) else targets,
                       conv_rank=conv_rank, conv_alpha=conv_alpha, init=init,
                       components=tuple(components) if components else None, learning_rate=learning_rate,
                       learning_rates=lrs, save_dtype=save_dtype, algorithm=algorithm, dora=bool(dora),
                       train_text_encoder=bool(train_text_encoder), architecture=architecture,
                       extra=dict(extra or {}))
