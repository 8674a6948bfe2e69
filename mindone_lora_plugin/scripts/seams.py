"""The seams of mindone's LoRA training scripts, switched to this plugin for ``mindone-lora run``.

mindone's example LoRA scripts (text-to-image SD/SDXL, DreamBooth) share a handful of calls. :func:`patched`
installs, for the duration of a ``with`` block, replacements that hand those calls to a :class:`ScriptSession`:

``add_adapter(LoraConfig)`` on a UNet (``mindone.diffusers`` ``PeftAdapterMixin``) or a CLIP text encoder
(``mindone.transformers`` ``PeftAdapterMixin``)
    records the model as ``unet`` / ``text_encoder`` / ``text_encoder_2`` and adds the adapters the chosen strategy
    wants instead (its targets; the script's rank; ``--lora_alpha`` or the script's alpha) through the
    ``add_adapters`` hook, then marks the strategy's trainable parameters (``trainable_parameters`` hook), so the
    script's own ``filter(lambda p: p.requires_grad, ...)`` picks exactly those. A component the strategy does not
    adapt is refused at once.

``TrainStep.__init__`` (``mindone.diffusers.training_utils``)
    the one call every script makes after all adapters are added and the optimizer is built, and before the first
    step. The session checks there that the script adapted every component the strategy trains and that the
    optimizer holds every trainable LoRA parameter (refusing with the reason otherwise), then applies
    ``--lora_resume_from`` (``load_weights`` hook).

``save_lora_weights`` on ``StableDiffusionLoraLoaderMixin`` / ``StableDiffusionXLLoraLoaderMixin`` (what
``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` and ``LoraLoaderMixin`` use)
    writes the components the script passes from the recorded models in every ``--lora_save_formats`` format
    (``save_weights`` hook, atomic files). ``pytorch_lora_weights.safetensors`` is always among them and is written
    from the models — pure PEFT keys plus per-module alphas in its header — never from the dict the script built
    with ``convert_state_dict_to_diffusers``, which mixes key styles once targets go beyond attention.

``enable_gradient_checkpointing`` (UNet) and ``gradient_checkpointing_enable`` (text encoders)
    what a script's ``--gradient_checkpointing`` calls; mindone 0.5.0's versions raise, these recompute the models'
    blocks (:mod:`mindone_lora_plugin.runtime.recompute`).

Two compatibility fixes are installed with them: ``mindone.diffusers.optimization.get_scheduler`` appends one copy
of its last learning rate (the scripts read ``optimizer.get_lr()`` once after the last step, one entry past the
per-step list, which the CPU ``Gather`` kernel rejects), and ``mindone.diffusers._peft`` (and its ``tuners``,
``tuners.tuners_utils``, ``utils`` submodules) is aliased to ``mindone.peft`` when mindone no longer has it, as older
SDXL/DreamBooth scripts import it.

Everything is undone when the block ends, so tests can run scripts in-process one after another.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import sys
import threading

from mindone_lora_plugin.scripts.session import ScriptSession, component_of, say

log = logging.getLogger("mindone_lora.run")

_LAYER_ARGS = {"unet": "unet_lora_layers", "text_encoder": "text_encoder_lora_layers",
               "text_encoder_2": "text_encoder_2_lora_layers"}
_PEFT_ALIASES = ("", ".tuners", ".tuners.tuners_utils", ".utils")

_ACTIVE: "ScriptSession | None" = None
_LOCK = threading.Lock()


def active_session() -> "ScriptSession | None":
    """The session the patches currently serve (``None`` outside :func:`patched`)."""
    return _ACTIVE


# ---------------------------------------------------------------------------------------------- installing


def _add_adapter_wrapper(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def add_adapter(self, *args, **kwargs):
        session = _ACTIVE
        if session is None or session.inside:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        return session.on_add_adapter(self, bound.arguments.get("adapter_config"), bound.arguments.get("adapter_name"),
                                      lambda: original(self, *args, **kwargs))

    add_adapter.__mindone_lora_patch__ = True
    return add_adapter


def _save_wrapper(classmeth):
    func = classmeth.__func__
    signature = inspect.signature(func)

    @functools.wraps(func)
    def save_lora_weights(cls, *args, **kwargs):
        session = _ACTIVE
        if session is None or session.inside:
            return func(cls, *args, **kwargs)
        bound = signature.bind(cls, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop("kwargs", {}) or {})
        return session.on_save(arguments, lambda: func(cls, *args, **kwargs))

    save_lora_weights.__mindone_lora_patch__ = True
    return classmethod(save_lora_weights)


def _state_dict_wrapper(original):
    """mindone's scripts read the adapters with ``get_peft_model_state_dict(model)`` and hand the result to
    ``save_lora_weights``. A model whose adapters are another algorithm's (``--lora_algo loha``) has no PEFT
    config: it gets a one-key placeholder naming its component, enough for the script to call ``save_lora_weights``,
    which the session turns into its own save of the real adapters."""
    @functools.wraps(original)
    def get_peft_model_state_dict(model, *args, **kwargs):
        session = _ACTIVE
        if session is None or session.inside or hasattr(model, "peft_config"):
            return original(model, *args, **kwargs)
        comp = next((c for c, cell in session.models.items() if cell is model), None)
        if comp is None:
            return original(model, *args, **kwargs)
        import mindspore as ms

        return {f"mindone_lora.{comp}.adapters.lora_A.weight": ms.Tensor([0.0], ms.float32)}

    get_peft_model_state_dict.__mindone_lora_patch__ = True
    return get_peft_model_state_dict


def _train_step_init_wrapper(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        session = _ACTIVE
        if session is not None and not session.inside:
            session.on_training_start(self)

    __init__.__mindone_lora_patch__ = True
    return __init__


def _scheduler_wrapper(original):
    @functools.wraps(original)
    def get_scheduler(*args, **kwargs):
        lrs = original(*args, **kwargs)
        if isinstance(lrs, list) and lrs:
            return lrs + [lrs[-1]]  # the scripts read the learning rate once more after the last step
        return lrs

    get_scheduler.__mindone_lora_patch__ = True
    return get_scheduler


def _enable_gradient_checkpointing(self, gradient_checkpointing_func=None):
    """``enable_gradient_checkpointing()`` / ``gradient_checkpointing_enable()`` as the scripts call them (their
    ``--gradient_checkpointing``): MindSpore recompute of the model's blocks
    (:mod:`mindone_lora_plugin.runtime.recompute`),
    where mindone 0.5.0's own method raises "does not support gradient checkpointing"."""
    from mindone_lora_plugin.runtime.recompute import enable

    n = enable(self, component_of(self) or type(self).__name__)
    say(f"gradient checkpointing: {n} blocks of {type(self).__name__} recomputed in the backward pass")


_enable_gradient_checkpointing.__mindone_lora_patch__ = True


class _Undo:
    def __init__(self):
        self.items: list = []

    def set(self, owner, name: str, value) -> None:
        missing = object()
        old = vars(owner).get(name, missing)  # only what the owner itself holds (not inherited)
        self.items.append(("attr", owner, name, old, missing))
        setattr(owner, name, value)

    def module(self, name: str, module) -> None:
        self.items.append(("module", name, sys.modules.get(name)))
        sys.modules[name] = module

    def undo(self) -> None:
        for item in reversed(self.items):
            if item[0] == "attr":
                _, owner, name, old, missing = item
                if old is missing:
                    try:
                        delattr(owner, name)
                    except AttributeError:
                        pass
                else:
                    setattr(owner, name, old)
            else:
                _, name, old = item
                if old is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = old
        self.items.clear()


def _install(undo: _Undo) -> None:
    from mindone_lora_plugin.runtime.process import quiet_mindone_imports

    quiet_mindone_imports()
    _alias_old_peft(undo)
    from mindone.diffusers import optimization, training_utils
    from mindone.diffusers.loaders import lora_pipeline, peft as diffusers_peft
    from mindone.transformers.integrations import peft as transformers_peft

    for mixin in (diffusers_peft.PeftAdapterMixin, transformers_peft.PeftAdapterMixin):
        undo.set(mixin, "add_adapter", _add_adapter_wrapper(mixin.__dict__["add_adapter"]))
    for mixin in (lora_pipeline.StableDiffusionLoraLoaderMixin, lora_pipeline.StableDiffusionXLLoraLoaderMixin):
        undo.set(mixin, "save_lora_weights", _save_wrapper(mixin.__dict__["save_lora_weights"]))
    import mindone.peft
    from mindone.peft import utils as peft_utils
    from mindone.peft.utils import save_and_load

    original = save_and_load.get_peft_model_state_dict
    state_dict = _state_dict_wrapper(original)
    for module in (save_and_load, peft_utils, mindone.peft):  # every name a script imports it by
        if getattr(module, "get_peft_model_state_dict", None) is original:
            undo.set(module, "get_peft_model_state_dict", state_dict)
    from mindone.diffusers.models.modeling_utils import ModelMixin
    from mindone.transformers.modeling_utils import PreTrainedModel

    undo.set(ModelMixin, "enable_gradient_checkpointing", _enable_gradient_checkpointing)
    undo.set(PreTrainedModel, "gradient_checkpointing_enable", _enable_gradient_checkpointing)
    train_step = training_utils.TrainStep
    undo.set(train_step, "__init__", _train_step_init_wrapper(train_step.__dict__["__init__"]))
    scheduler = _scheduler_wrapper(optimization.get_scheduler)
    undo.set(optimization, "get_scheduler", scheduler)
    import mindone.diffusers as diffusers_pkg

    if "get_scheduler" in vars(diffusers_pkg):  # the lazy package caches resolved names
        undo.set(diffusers_pkg, "get_scheduler", scheduler)


def _alias_old_peft(undo: _Undo) -> None:
    """Make ``mindone.diffusers._peft[...]`` import as ``mindone.peft[...]`` when mindone no longer ships it."""
    try:
        importlib.import_module("mindone.diffusers._peft")
        return
    except ImportError:
        pass
    for suffix in _PEFT_ALIASES:
        try:
            target = importlib.import_module("mindone.peft" + suffix)
        except ImportError:  # pragma: no cover - a different mindone layout
            continue
        undo.module("mindone.diffusers._peft" + suffix, target)


@contextlib.contextmanager
def patched(session: ScriptSession):
    """Switch mindone's script seams to ``session`` for the duration of the block; everything is undone after."""
    global _ACTIVE
    with _LOCK:
        if _ACTIVE is not None:
            raise RuntimeError("mindone-lora run: the seams are already patched for another script")
        undo = _Undo()
        try:
            _install(undo)
        except BaseException:
            undo.undo()
            raise
        _ACTIVE = session
    try:
        yield session
    finally:
        with _LOCK:
            _ACTIVE = None
            undo.undo()
