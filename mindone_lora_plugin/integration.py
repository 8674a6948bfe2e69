"""The script-author API: this plugin's LoRA flags and operations inside an existing mindone training script.

A mindone LoRA training script touches LoRA at four seams: it builds a ``LoraConfig`` and calls ``add_adapter`` on
its models, collects the parameters to optimize with ``filter(lambda p: p.requires_grad, ...)``, saves with
``save_lora_weights(convert_state_dict_to_diffusers(get_peft_model_state_dict(...)))`` and (on resume) loads LoRA
weights back. :func:`add_lora_arguments` adds the plugin's flags to the script's ``argparse`` parser and
:class:`LoraIntegration` replaces those four seams with calls to the plugin hooks, so every installed strategy and
format works in the script::

    parser = argparse.ArgumentParser()
    ...                                            # the script's own flags, e.g. --lora_rank
    add_lora_arguments(parser)                     # --lora_strategy, --lora_alpha, --lora_targets, ...
    args = parser.parse_args()
    lora = LoraIntegration.from_args(args)         # rank from --lora_rank/--rank, --train_text_encoder, --learning_rate

    lora.add_adapters(unet=unet, text_encoder=text_encoder)      # instead of LoraConfig(...) + unet.add_adapter(...)
    optimizer = nn.AdamWeightDecay(lora.trainable_parameters(), learning_rate=lr)   # instead of filter(requires_grad)
    ...
    lora.save(save_path)                           # instead of StableDiffusionPipeline.save_lora_weights(...)
    lora.load(path)                                # load a LoRA file of any readable format into the adapters

``mindone-lora run`` (:mod:`mindone_lora_plugin.commands.run`) uses the same flags and options to switch the plugin
into scripts that were not changed at all (see :mod:`mindone_lora_plugin.scripts.seams`).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import replace

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.options import PRESETS, LoraOptions, build_options, default_strategy, parse_targets

__all__ = ["add_lora_arguments", "lora_argument_parser", "split_lora_args", "LoraIntegration", "DEFAULT_FORMATS",
           "FLAG_DESTS"]

DEFAULT_FORMATS = "diffusers,kohya"
#: The ``dest`` of every flag :func:`add_lora_arguments` adds itself (plugins add more, see ``_lora_plugin_dests``).
FLAG_DESTS = ("lora_strategy", "lora_algo", "lora_dora", "lora_alpha", "lora_targets", "lora_save_formats",
              "lora_resume_from", "lora_output_name")
_CHECKPOINT_DIR = re.compile(r"^checkpoint[-_]?\d+$")


def add_lora_arguments(parser, *, plugins: bool = True):
    """Add the plugin's ``--lora_*`` flags (and the flags plugins add through their hook) to ``parser``.

    Returns the argument group. The script keeps its own rank flag (mindone's scripts have ``--lora_rank``);
    nothing here clashes with it. Plugin-added ``dest`` names are recorded in ``args._lora_plugin_dests``.
    """
    group = parser.add_argument_group("LoRA (mindone-lora-plugin)")
    group.add_argument("--lora_strategy", type=str, default=None,
                       help="LoRA strategy: unet, text_encoder, sdxl or a plugin's (default: unet, or sdxl on SDXL)")
    group.add_argument("--lora_algo", type=str, default="lora",
                       help="adapter algorithm: lora (default) or a plugin's (loha, lokr from mindone-lora-lycoris)")
    group.add_argument("--lora_dora", action="store_true",
                       help="DoRA (weight-decomposed LoRA) on the lora algorithm; Linear layers only")
    group.add_argument("--lora_alpha", type=float, default=None,
                       help="LoRA alpha (default: the rank, i.e. scale 1, as mindone's scripts hard-code)")
    group.add_argument("--lora_targets", type=str, default="attn",
                       help=f"modules to adapt: a preset ({', '.join(PRESETS)}) or module names such as "
                            f"to_q,to_v,ff.net.2 (default: attn, the script's own choice)")
    group.add_argument("--lora_save_formats", type=str, default=DEFAULT_FORMATS,
                       help=f"formats written at every save, comma-separated (default: {DEFAULT_FORMATS})")
    group.add_argument("--lora_resume_from", type=str, default=None,
                       help="warm start: load this LoRA file (diffusers or kohya) into the adapters before training")
    group.add_argument("--lora_output_name", type=str, default=None,
                       help="name of the kohya file (default: the output folder's name)")
    if plugins:
        from mindone_lora_plugin.plugins import get_plugin_manager

        container = getattr(parser, "_actions", None)
        before = {a.dest for a in container} if container is not None else set()
        get_plugin_manager().add_arguments(group)
        after = {a.dest for a in container} if container is not None else set()
        parser.set_defaults(_lora_plugin_dests=sorted(after - before))
    return group


class _RaisingParser(argparse.ArgumentParser):
    """A parser whose mistakes are :class:`LoraError` (one line, exit status 2 on the command line)."""

    def error(self, message):  # noqa: D401 - argparse API
        raise LoraError(f"{message} (LoRA flags: see mindone-lora run --help)")


def lora_argument_parser() -> argparse.ArgumentParser:
    """A parser of only the ``--lora_*`` flags (no abbreviations, no ``--help``), for splitting a command line."""
    parser = _RaisingParser(prog="mindone-lora run", add_help=False, allow_abbrev=False)
    add_lora_arguments(parser)
    return parser


def split_lora_args(argv, namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Take the ``--lora_*`` flags (and plugin flags) out of ``argv``; return ``(their values, the rest in order)``.

    Only flags this plugin defines are taken: a script's own ``--lora_rank`` stays in the rest. Everything after a
    ``--`` goes to the rest untouched. Values already in ``namespace`` are kept unless ``argv`` gives them again.
    """
    argv = list(argv)
    tail: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    parser = lora_argument_parser()
    ns, rest = parser.parse_known_args(argv, namespace=namespace)
    return ns, rest + tail


def output_name_for(save_directory: str) -> str:
    """The kohya file's default name: the output folder's name (its parent's for a ``checkpoint-N`` folder)."""
    path = os.path.abspath(save_directory)
    name = os.path.basename(path)
    if _CHECKPOINT_DIR.match(name):
        name = os.path.basename(os.path.dirname(path)) or name
    return name or "lora"


def _formats_list(value) -> list[str]:
    names = [f.strip() for f in (value.split(",") if isinstance(value, str) else value) if f and f.strip()]
    if not names:
        raise LoraError("--lora_save_formats is empty: give at least one format, e.g. diffusers,kohya")
    return list(dict.fromkeys(names))


class LoraIntegration:
    """The plugin inside a training script: add adapters, trainable parameters, save, load — all through the hooks.

    Built from parsed flags (:meth:`from_args`) or directly. Names (strategy, formats), targets and the resume file
    are checked when the object is built, so a bad request fails before any model is loaded. The strategy defaults
    to ``unet`` (``sdxl`` on an SDXL model) and is resolved when the models are known.
    """

    def __init__(self, *, strategy: str | None = None, rank: int = 4, alpha: float | None = None,
                 targets="attn", save_formats=DEFAULT_FORMATS, resume_from: str | None = None,
                 output_name: str | None = None, train_text_encoder: bool = False, learning_rate: float = 1e-4,
                 text_encoder_lr: float | None = None, init: str = "gaussian", save_dtype: str | None = None,
                 extra: dict | None = None, manager=None, algorithm: str = "lora", dora: bool = False):
        from mindone_lora_plugin.plugins import get_plugin_manager

        self.pm = manager or get_plugin_manager()
        self.strategy = strategy or None
        if self.strategy:
            self.pm.get_strategy(self.strategy)  # an unknown name lists the valid ones
        self.algorithm = algorithm or "lora"
        self.pm.get_algorithm(self.algorithm)  # an unknown name lists the installed ones
        self.dora = bool(dora)
        if self.dora and self.algorithm != "lora":
            raise LoraError(f"--lora_dora applies to --lora_algo lora, not {self.algorithm}; leave one of them out")
        self.rank = int(rank)
        if self.rank < 1:
            raise LoraError(f"LoRA rank must be at least 1, got {rank}")
        if alpha is not None and not float(alpha) > 0:
            raise LoraError(f"--lora_alpha must be positive, got {alpha}")
        self.alpha = None if alpha is None else float(alpha)
        self.targets = parse_targets(targets) if isinstance(targets, str) else list(targets)
        self.save_formats = _formats_list(save_formats)
        from mindone_lora_plugin.core_plugin import check_save_formats

        check_save_formats(self.pm, self.save_formats, self)  # unknown formats, or ones that cannot hold the algo
        if resume_from is not None and not os.path.isfile(resume_from):
            raise LoraError(f"--lora_resume_from {resume_from}: no such file; give a LoRA .safetensors file")
        self.resume_from = resume_from
        self.output_name = output_name or None
        self.train_text_encoder = bool(train_text_encoder)
        self.learning_rate = float(learning_rate)
        self.text_encoder_lr = None if text_encoder_lr is None else float(text_encoder_lr)
        self.init = init
        self.save_dtype = save_dtype
        self.extra = dict(extra or {})
        self.models = None
        self.options: LoraOptions | None = None
        self.adapted: dict[str, list[str]] = {}

    @classmethod
    def from_args(cls, args, *, rank: int | None = None, train_text_encoder: bool | None = None,
                  learning_rate: float | None = None, text_encoder_lr: float | None = None, manager=None):
        """Build from a namespace parsed by a parser that :func:`add_lora_arguments` extended.

        ``rank``, ``train_text_encoder``, ``learning_rate`` and ``text_encoder_lr`` default to the script's own
        flags of those names (``args.lora_rank`` or ``args.rank``; ``args.train_text_encoder``; ...).
        """
        def get(name, default=None):
            return getattr(args, name, default)

        if rank is None:
            rank = get("lora_rank") or get("rank") or 4
        extra = {d: get(d) for d in (get("_lora_plugin_dests") or []) if hasattr(args, d)}
        return cls(strategy=get("lora_strategy"), algorithm=get("lora_algo") or "lora", rank=rank,
                   dora=bool(get("lora_dora", False)),
                   alpha=get("lora_alpha"),
                   targets=get("lora_targets") or "attn", save_formats=get("lora_save_formats") or DEFAULT_FORMATS,
                   resume_from=get("lora_resume_from"), output_name=get("lora_output_name"),
                   train_text_encoder=bool(get("train_text_encoder", False) if train_text_encoder is None
                                           else train_text_encoder),
                   learning_rate=get("learning_rate", 1e-4) if learning_rate is None else learning_rate,
                   text_encoder_lr=get("text_encoder_lr") if text_encoder_lr is None else text_encoder_lr,
                   extra=extra, manager=manager)

    # ------------------------------------------------------------------ options

    def strategy_for(self, architecture: str) -> str:
        return default_strategy(self.strategy, architecture)

    def make_options(self, architecture: str, *, rank: int | None = None, alpha: float | None = None,
                     init: str | None = None, components=None, train_text_encoder: bool | None = None) -> LoraOptions:
        """The :class:`LoraOptions` of this request for a model of ``architecture``.

        ``alpha`` is used only when ``--lora_alpha`` was not given (default: the rank).
        """
        tte = self.train_text_encoder if train_text_encoder is None else bool(train_text_encoder)
        return build_options(self.pm, architecture, strategy=self.strategy, algorithm=self.algorithm,
                             rank=int(rank or self.rank),
                             alpha=self.alpha if self.alpha is not None else (None if alpha is None else float(alpha)),
                             targets=self.targets, init=init or self.init, components=components,
                             learning_rate=self.learning_rate, text_encoder_lr=self.text_encoder_lr,
                             save_dtype=self.save_dtype, dora=self.dora, train_text_encoder=tte, extra=self.extra)

    # ------------------------------------------------------------------ the four seams

    def add_adapters(self, *, architecture: str | None = None, **cells):
        """Add LoRA adapters to the models as the strategy says (hook ``mindone_lora_add_adapters``).

        Pass every model the script has; the strategy picks the components to adapt (the text encoders only with
        ``train_text_encoder``). Base weights are frozen, the strategy's trainable LoRA parameters get
        ``requires_grad=True``. With ``--lora_resume_from`` the file is loaded into the new adapters. Returns the
        adapted module paths per component. Components are passed by their architecture's names (SD: ``unet=``,
        ``text_encoder=``, ``text_encoder_2=``; FLUX.1: ``transformer=`` ...).
        """
        from mindone_lora_plugin.models import Models

        if self.models is not None:
            raise LoraError("add_adapters was already called; call it once with all models")
        models = Models(architecture=architecture, **cells)
        if not len(models):
            raise LoraError("add_adapters needs at least one model (unet=, text_encoder=, text_encoder_2=)")
        options = self.make_options(models.architecture)
        adapted = self.pm.add_adapters(models, options)
        self.models, self.options, self.adapted = models, options, dict(adapted or {})
        self.parameter_groups()  # marks exactly the strategy's trainable parameters requires_grad
        if self.resume_from:
            self.load(self.resume_from)
        return self.adapted

    def parameter_groups(self) -> list[dict]:
        """``[{"params": [...], "lr": float}, ...]`` per component (hook ``mindone_lora_trainable_parameters``).

        MindSpore optimizers take these groups as they are (``nn.AdamWeightDecay(groups, learning_rate=...)``).
        """
        groups = self.pm.trainable_parameters(self._models(), self.options)
        return [{"params": list(g["params"]), "lr": g["lr"]} for g in groups or []]

    def trainable_parameters(self) -> list:
        """The parameters to optimize, as one list (what ``filter(lambda p: p.requires_grad, ...)`` gave)."""
        return [p for g in self.parameter_groups() for p in g["params"]]

    def trains(self, component: str) -> bool:
        """Whether ``component`` (``unet``, ``text_encoder``, ``text_encoder_2``) carries trained adapters."""
        return component in self.adapted

    def save(self, output_dir: str, *, output_name: str | None = None, metadata: dict | None = None,
             formats=None) -> list[str]:
        """Write every requested format into ``output_dir`` atomically (hook ``mindone_lora_save_weights``).

        The diffusers file (``pytorch_lora_weights.safetensors``) is written from the adapted models with pure PEFT
        keys and each module's alpha in its header, so it reloads exactly with mindone and diffusers. Returns the
        paths written.
        """
        models = self._models()
        os.makedirs(output_dir, exist_ok=True)
        name = output_name or self.output_name or output_name_for(output_dir)
        meta = {"ss_output_name": name}
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        fmts = _formats_list(formats) if formats is not None else self.save_formats
        return self.pm.save_weights(models, self.options, output_dir, fmts, output_name=name, metadata=meta)

    def load(self, path: str):
        """Load a LoRA file (any readable format) into the adapters (hook ``mindone_lora_load_weights``).

        Every module's rank must match this run's and its alpha is restored; the file may not hold components this
        run does not train. Returns the loaded :class:`~mindone_lora_plugin.state.LoraState`.
        """
        models = self._models()
        return load_into(self.pm, models, self.options, path, self.adapted)

    # ------------------------------------------------------------------ helpers

    def _models(self):
        if self.models is None:
            raise LoraError("call add_adapters(...) first: there are no adapted models yet")
        return self.models


def load_into(pm, models, options: LoraOptions, path: str, adapted) -> object:
    """Load ``path`` into the adapted components of ``models`` through the load hook, refusing foreign components."""
    from mindone_lora_plugin.formats.reader import read_lora
    from mindone_lora_plugin.models import Models

    if not os.path.isfile(path):
        raise LoraError(f"{path}: no such LoRA file")
    trained = [c for c in models if c in adapted]
    state = read_lora(path, formats=list(pm.formats().values()))  # which components; the load hook checks the rest
    extra = sorted(set(state.components) - set(trained))
    if extra:
        raise LoraError(f"{os.path.basename(path)} has LoRA weights for the {', '.join(extra)}, which this run does "
                        f"not train (it trains the {', '.join(trained) or 'nothing'}); warm start from a file made "
                        f"for the same components")
    subset = Models(**{c: models[c] for c in trained}, architecture=models.architecture)
    return pm.load_weights(subset, replace(options, components=tuple(trained)), path)
