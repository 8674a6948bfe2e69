"""The architecture plugin object: everything the core knows about one model family (over 400 lines: it is the
whole family contract, one method per question the core asks, each a few lines with its docstring).

A plugin offers model families by yielding instances of an :class:`Architecture` subclass from its
``mindone_lora_architectures()`` hook implementation (the built-in ones: SD1.x, SD2.x and SDXL in
:mod:`mindone_lora_plugin.architectures.sd`, FLUX.1 in :mod:`mindone_lora_plugin.architectures.flux`). An
architecture owns:

* its **components** (:class:`Component`: name, model class, folder, kohya and diffusers key prefixes, the classes that
  identify a live cell) and how to load them;
* **detection**: from a model folder's ``model_index.json`` and component configs (:meth:`Architecture.detect_folder`,
  a score, 0 = not mine), from a single-file checkpoint's keys (:meth:`Architecture.detect_single_file`, with
  :meth:`Architecture.write_single_file_folder` converting it), and from a LoRA file's parsed keys, tensor shapes and
  header metadata (:meth:`Architecture.detect_lora`, an :class:`Evidence`); the detectors in
  :mod:`mindone_lora_plugin.architectures` ask every installed architecture and take the best answer;
* the **target presets** per component (:meth:`Architecture.target_rules`: ``attn``, ``kohya``, ``kohya-conv`` ...);
* the **key grammar** of its modules: kohya names (:meth:`kohya_name`), names resolved without a base model
  (:meth:`resolve_name`), extra spellings of a base model's modules (:meth:`base_aliases`: SDXL's SGM names);
* the **metadata** its files carry (kohya ``ss_base_model_version``/``ss_v2``, ``modelspec.architecture``);
* the model-specific part of **training** (:meth:`make_loss`, :meth:`model_inputs`, :meth:`text_conditioner`) and the
  **pipelines** for validation images, ``generate`` and ``merge`` (:meth:`load_pipeline`, :meth:`training_pipeline`).

Nothing here imports MindSpore; methods that need it import it when called.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from mindone_lora_plugin.errors import LoraError

# Evidence scores (higher wins). From METADATA up the evidence is "strong": a LoRA with strong evidence for another
# architecture than the base model's is refused; weaker hints only name modules when nothing else is known.
STRUCTURE = 100  # components or module names only this architecture has (a second text encoder, double_blocks ...)
SHAPES = 80  # tensor widths (SD's cross-attention width)
METADATA = 60  # header metadata (ss_base_model_version, modelspec.architecture ...)
HINT = 10  # weak hints (naming styles, layer counts)


@dataclass(frozen=True)
class Component:
    """One model component of an architecture (a key of :class:`~mindone_lora_plugin.models.Models` and of
    :attr:`LoraState.components <mindone_lora_plugin.state.LoraState.components>`).

    ``model_class`` is ``"module:Class"`` (imported only when loading); ``dtype_kw`` is the ``from_pretrained``
    keyword naming the weight dtype (mindone.diffusers: ``mindspore_dtype``, mindone.transformers: ``dtype``).
    ``kohya_prefix`` starts the component's kohya module names (``lora_unet``); ``diffusers_prefix`` its PEFT/diffusers
    keys (``unet``). ``kind`` is ``denoiser`` or ``text_encoder`` (what ``--train_text_encoder`` adds). ``optional``
    components are loaded when the folder has them. ``class_names`` identify a live cell of this component: a cell
    is this component when a class of its MRO is named one of them, or starts with one (the longest match wins
    across architectures).
    """

    name: str
    model_class: str
    kohya_prefix: str
    diffusers_prefix: str = ""
    subfolder: str = ""
    kind: str = "denoiser"
    optional: bool = False
    dtype_kw: str = "mindspore_dtype"
    class_names: tuple[str, ...] = ()

    @property
    def folder(self) -> str:
        return self.subfolder or self.name

    @property
    def key_prefix(self) -> str:
        return self.diffusers_prefix or self.name

    @property
    def is_text_encoder(self) -> bool:
        return self.kind == "text_encoder"

    def model_type(self):
        module, _, attr = self.model_class.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass
class TrainingParts:
    """What an architecture loads for training besides the components LoRA adapts (returned by
    :meth:`Architecture.load_training_parts`; the family gets it back as ``TrainingContext.parts``): the VAE, one
    tokenizer per text encoder (in the order its text conditioner takes their token ids), the noise scheduler and the
    prediction type (``epsilon``, ``v_prediction``, ``flow_matching``: what ``ss_prediction_type`` records). A family
    adds what its own loss and inputs need in a subclass (SD: the DDPM ``alphas_cumprod``; FLUX.1: the flow shift)."""

    vae: object
    tokenizers: tuple
    noise_scheduler: object
    prediction_type: str


@dataclass(frozen=True)
class KeyPrefixes:
    """How a family's LoRA file keys name its components (what the key parser asks each architecture for).

    ``flat``: kohya prefixes (``lora_unet_``) → component; ``dotted``: PEFT/diffusers prefixes (``unet.``) →
    component, or None when the module path decides (PEFT's ``base_model.model.``); ``roots``: module-path starts
    (``down_blocks.``) → component, for keys without a component prefix; ``fallback``: the component of a
    ``None``-prefixed key whose path matches no root (None: such a key is not this family's); ``text_encoders``: the
    components that are text encoders (old diffusers attention-processor keys name their modules differently).
    """

    flat: tuple[tuple[str, str], ...] = ()
    dotted: tuple[tuple[str, str | None], ...] = ()
    roots: tuple[tuple[str, str], ...] = ()
    fallback: str | None = None
    text_encoders: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evidence:
    """Why a LoRA file looks made for ``architecture``: a score (:data:`STRUCTURE` ... :data:`HINT`) and a reason."""

    architecture: str
    score: int
    reason: str

    @property
    def strong(self) -> bool:
        return self.score >= METADATA


@dataclass(frozen=True)
class TargetRule:
    """What a target preset adapts in one component.

    ``names``: modules whose path ends with one of these names (``to_q`` matches ``...attn1.to_q``), with ``rank``/
    ``alpha``. ``containers``: every Linear/Conv2d below a module of one of these classes (kohya's target classes);
    there a conv with a kernel larger than 1×1 gets ``conv_rank``/``conv_alpha``. A rule may use both.
    """

    names: tuple[str, ...] = ()
    containers: tuple[str, ...] = ()


@dataclass
class FolderInfo:
    """What :meth:`Architecture.detect_folder` sees: ``model_index.json`` and the config of every component
    subfolder (``{subfolder: config dict}``), read without instantiating anything."""

    index: dict = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return str(self.index.get("_class_name", "") or "")


class Architecture:
    """Base class of model families. Subclasses set the class attributes and override what differs.

    Class attributes: :attr:`name` (what ``LoraState.architecture`` and ``Models.architecture`` hold), :attr:`label`
    (for messages: ``SDXL``), :attr:`description` (one line), :attr:`components`, :attr:`default_strategy` (the strategy
    a run uses when none is asked for), :attr:`default_resolution`, :attr:`denoiser` (the component that predicts),
    :attr:`kohya_base_model_version` / :attr:`kohya_version_family` (kohya's ``ss_base_model_version`` and the prefix
    that a kept value must have), :attr:`modelspec_architecture` (the ``modelspec.architecture`` written),
    :attr:`modelspec_prefix` (how every value of this family starts, for detection) and :attr:`kohya_implementation`
    (``modelspec.implementation`` in kohya files: the code base whose module names they use) and
    :attr:`kohya_network_module` (sd-scripts' network module for plain LoRA: ``networks.lora``, ``networks.lora_flux``
    ...).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    description: ClassVar[str] = ""
    components: ClassVar[tuple[Component, ...]] = ()
    denoiser: ClassVar[str] = "unet"
    default_strategy: ClassVar[str] = "unet"
    default_resolution: ClassVar[int] = 512
    kohya_base_model_version: ClassVar[str] = ""
    kohya_version_family: ClassVar[str] = ""
    modelspec_architecture: ClassVar[str] = ""
    modelspec_prefix: ClassVar[str] = ""
    kohya_implementation: ClassVar[str] = "diffusers"
    kohya_network_module: ClassVar[str] = "networks.lora"  # ss_network_module of plain-LoRA kohya files
    # the training flags (argparse dests) this family's training does not use: given, they are refused before any
    # model loads (train/flags/checks.py) instead of silently ignored; the UI hides their fields for this family
    unused_flags: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ components

    def component_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    def text_encoders(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components if c.is_text_encoder)

    def has_component(self, name: str) -> bool:
        return any(c.name == name for c in self.components)

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise LoraError(f"a {self.label} model has no {name} (its components: {', '.join(self.component_names())}); "
                        f"the LoRA or option was made for another architecture")

    def component_of(self, cell) -> tuple[int, str] | None:
        """``(match length, component)`` when ``cell``'s class is one of this architecture's components, else None."""
        names = [k.__name__ for k in type(cell).__mro__]
        best = None
        for comp in self.components:
            for cls in comp.class_names:
                if any(n == cls or n.startswith(cls) for n in names) and (best is None or len(cls) > best[0]):
                    best = (len(cls), comp.name)
        return best

    def load_component(self, folder: str, component: str, dtype=None, variant: str | None = None):
        """Load one component from a diffusers-layout folder with mindone's ``from_pretrained``."""
        comp = self.component(component)
        kw = {"variant": variant} if variant else {}
        if dtype is not None:
            kw[comp.dtype_kw] = dtype
        return comp.model_type().from_pretrained(folder, subfolder=comp.folder, **kw)

    # ------------------------------------------------------------------ detection

    def detect_folder(self, folder: FolderInfo) -> int:
        """How surely a model folder (or live models' configs) is this architecture: 0 = not mine, higher wins."""
        return 0

    def detect_lora(self, parsed, tensors: Mapping, metadata: dict[str, str], sgm_used: bool = False
                    ) -> Evidence | None:
        """Evidence that a LoRA file (its :class:`~mindone_lora_plugin.formats.names.ParsedKey` list, tensors or
        headers with a ``shape``, and header metadata) was made for this architecture; None when there is none.
        The default looks at the metadata only (:meth:`detect_metadata`)."""
        why = self.detect_metadata(metadata)
        return Evidence(self.name, METADATA, why) if why else None

    def detect_metadata(self, metadata: dict[str, str]) -> str:
        """The reason (``"ss_base_model_version=sdxl_base_v1-0"``) when the header names this architecture, else ""."""
        version = (metadata.get("ss_base_model_version") or "").strip()
        if self.kohya_version_family and version.startswith(self.kohya_version_family):
            return f"ss_base_model_version={version}"
        spec = (metadata.get("modelspec.architecture") or "").strip()
        if self.modelspec_prefix and spec.startswith(self.modelspec_prefix):
            return f"modelspec.architecture={spec}"
        if (metadata.get("mindone_lora.architecture") or "").strip() == self.name:
            return f"mindone_lora.architecture={self.name}"
        return ""

    def detect_single_file(self, keys, header: dict, metadata: dict[str, str], path: str) -> int:
        """How surely a single-file checkpoint is this family's (0: not mine; one that cannot train: a LoraError)."""
        return 0

    def write_single_file_folder(self, path, header, out, vae=None, config=None) -> None:
        """Write the diffusers-layout folder equivalent to the single file ``path`` into the empty folder ``out``."""
        raise LoraError(f"the {self.label} architecture reads no single-file checkpoints")

    def single_file_sources(self, path: str, header: dict, folder: str) -> dict[str, list]:
        """Source key → ``[(component, diffusers name, transform: None, "linear", "t" or ("split", i, n))]`` of the
        adapted components (merging into a single file; ``folder``: the converted one)."""
        raise LoraError(f"the {self.label} architecture writes no single-file checkpoints")

    # ------------------------------------------------------------------ targets

    def target_rules(self, component: str) -> dict[str, TargetRule]:
        """Preset name → :class:`TargetRule` for ``component`` (the presets ``--lora_targets`` accepts)."""
        return {}

    def presets(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for comp in self.components:
            seen.update(dict.fromkeys(self.target_rules(comp.name)))
        return tuple(seen)

    # ------------------------------------------------------------------ key grammar

    def kohya_prefix(self, component: str) -> str:
        return self.component(component).kohya_prefix

    def base_config(self, denoiser_config: dict) -> dict:
        """What this family's file names depend on in the base model's denoiser config (its ``config.json``, or a
        live cell's config): carried by :class:`~mindone_lora_plugin.base_model_info.BaseModelInfo` and
        :class:`~mindone_lora_plugin.state.LoraState` to :meth:`kohya_name`, :meth:`resolve_name` and
        :meth:`base_aliases`. Default: nothing (SD: the UNet's ``layers_per_block``, which SDXL's SGM names need)."""
        return {}

    def kohya_name(self, component: str, path: str, base_config: dict | None = None) -> str:
        """The kohya module name of ``component.path`` (``lora_unet_down_blocks_0_...``)."""
        return self.kohya_prefix(component) + "_" + path.replace(".", "_")

    def resolve_name(self, component: str, name: str, flat: bool, base_config: dict | None = None) -> str | None:
        """The module path a file's name means when no base model is known (``flat``: a kohya ``_``-joined name),
        or None when the grammar does not know it."""
        return None

    def key_prefixes(self) -> KeyPrefixes:
        """The component prefixes of this family's file keys; default: each component's kohya prefix
        (``lora_unet_``) and diffusers prefix (``unet.``)."""
        return KeyPrefixes(flat=tuple((c.kohya_prefix + "_", c.name) for c in self.components),
                           dotted=tuple((c.key_prefix + ".", c.name) for c in self.components),
                           text_encoders=self.text_encoders())

    def name_layout(self, parsed) -> tuple[bool, dict]:
        """What a file's parsed keys (:class:`~mindone_lora_plugin.formats.names.ParsedKey`) say about their
        spelling when no base model is known: ``(spelled in another layout of this family's modules, the
        :meth:`base_config` that spelling implies)`` — SDXL's SGM names; default ``(False, {})``."""
        return False, {}

    def base_aliases(self, component: str, paths, base_config: dict | None = None) -> dict[str, str]:
        """Other dotted spellings files use for a base model's module ``paths`` (spelling → path); default none."""
        return {}

    # ------------------------------------------------------------------ metadata

    def kohya_metadata(self, meta: dict[str, str], v_prediction: bool) -> dict[str, str]:
        """kohya's architecture entries for a file: ``ss_base_model_version`` (a compatible one in ``meta`` is kept)
        and ``ss_v2``."""
        version = meta.get("ss_base_model_version", "")
        if not (self.kohya_version_family and version.startswith(self.kohya_version_family)):
            version = self.kohya_base_model_version
        return {"ss_base_model_version": version, "ss_v2": "False"}

    def modelspec_name(self, v_prediction: bool) -> str:
        return self.modelspec_architecture

    def modelspec_resolution(self, v_prediction: bool) -> str:
        return f"{self.default_resolution}x{self.default_resolution}"

    def modelspec(self, state, meta: dict[str, str], title: str, implementation: str,
                  v_prediction: bool) -> dict[str, str]:
        """The MUST keys of SAI ModelSpec 1.0.1 for a LoRA of this family (``state``: the LoRA written; ``meta``: its
        metadata so far, whose date and resolution are kept)."""
        import datetime
        import re

        nums = re.findall(r"\d+", meta.get("ss_resolution", "") or "")
        from_ss = f"{nums[0]}x{nums[-1]}" if len(nums) in (1, 2) else None
        return {
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": self.modelspec_name(v_prediction),
            "modelspec.implementation": implementation,
            "modelspec.title": title,
            "modelspec.resolution": meta.get("modelspec.resolution") or from_ss or self.modelspec_resolution(
                v_prediction),
            "modelspec.date": meta.get("modelspec.date") or datetime.datetime.now().replace(microsecond=0).isoformat(),
            "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        }

    # ------------------------------------------------------------------ files whose modules are not one per key group

    def read_file(self, tensors: dict, metadata: dict[str, str], base, where: str):
        """``(LoraState, ReadInfo)`` when this family reads the file itself (its own key layout, e.g. fused modules
        split on reading), else None: the core's plain-LoRA reader does it. The reader asks every installed family,
        the base model's first; a family may refuse a file that pairs it with another family in one line."""
        return None

    def kohya_modules(self, state) -> dict | None:
        """``{kohya module name: (LoraModule, what it holds for messages)}`` when this family's kohya files do not
        hold one module per state module (FLUX's fused qkv); None: each module under :meth:`kohya_name`."""
        return None

    def count_file_keys(self, keys, kohya: bool) -> int:
        """How many of a file's keys are this family's own keys in kohya style (``kohya``) or diffusers/PEFT style
        that the core's key parser does not know (what the kohya and diffusers formats' claims add); default 0."""
        return 0

    # ------------------------------------------------------------------ training and pipelines (MindSpore)

    def load_training_parts(self, folder: str, args, models, weight_dtype) -> TrainingParts:
        """Load what training needs besides the adapted components (``models``, loaded in ``weight_dtype``) from the
        model ``folder``, as the run's ``args`` say: a :class:`TrainingParts`."""
        raise NotImplementedError(f"the {self.name} architecture does not train")

    def text_conditioner(self, models):
        """A cell: the token ids of each tokenizer (``ids, ids_2[, ids_3]``; one tokenizer's given twice) →
        ``(prompt embeds, pooled)`` for this family's text encoders."""
        raise NotImplementedError(f"the {self.name} architecture does not train")

    def make_loss(self, context):
        """The training loss cell of a run (``context``: a :class:`~mindone_lora_plugin.architectures.context.
        TrainingContext` whose models have their adapters); its inputs are :meth:`model_inputs`' tuple."""
        raise NotImplementedError(f"the {self.name} architecture does not train")

    def model_inputs(self, context, batch, rng, weighted: bool = True) -> tuple:
        """The loss cell's inputs for one batch, every random draw from ``rng`` (the batch's latents, text,
        weighting and mask come from ``context.inputs``); ``weighted=False``: unit per-sample weights."""
        raise NotImplementedError(f"the {self.name} architecture does not train")

    def load_pipeline(self, folder: str, dtype=None):
        """A mindone pipeline for ``generate``, loaded from a diffusers-layout folder (MindSpore dtype or None)."""
        raise NotImplementedError(f"the {self.name} architecture has no pipeline")

    def training_pipeline(self, models, parts):
        """A pipeline around a run's own (adapted) ``models`` and its :class:`TrainingParts`, for validation,
        sample and DreamBooth class images."""
        raise NotImplementedError(f"the {self.name} architecture has no pipeline")

    # ------------------------------------------------------------------ reporting

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "description": self.description,
                "components": list(self.component_names()), "default_strategy": self.default_strategy,
                "presets": list(self.presets())}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
