"""The plugin manager: loads the built-in plugins and the ``mindone_lora`` entry-point group; finds the plugin
objects of every kind (strategies, formats, algorithms, architectures, training features) by name through one registry.

Built-in plugins are listed once, in :data:`~mindone_lora_plugin.builtin_plugins.BUILTIN_PLUGINS`, and registered
like any third-party plugin. A third-party plugin that fails to import, or raises while registering, is reported in
one warning line and skipped; everything else keeps working. Two plugins offering the same name is an error that
names both; an unknown name is an error that lists the valid ones.

Environment: ``MINDONE_LORA_PLUGINS`` unset loads every installed plugin; a comma-separated list loads only those
third-party plugins (by entry-point or distribution name); an empty value or ``none`` loads no third-party plugin.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Callable

import pluggy

from mindone_lora_plugin import hookspecs
from mindone_lora_plugin.builtin_plugins import BUILTIN_PLUGINS
from mindone_lora_plugin.errors import PluginError
from mindone_lora_plugin.formats.variants import plugin_for_algorithm

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
ENV_PLUGINS = "MINDONE_LORA_PLUGINS"
THIS_DIST = "mindone-lora-plugin"


@dataclass(frozen=True)
class PluginKind:
    """One kind of plugin object: the discovery hook yielding them and how messages name them."""

    hook: str
    singular: str  # "strategy"
    plural: str  # "strategies": also the kind's key in KINDS and in ``describe()``
    title: str  # what "unknown ..." errors call one: "LoRA strategy"
    hint: Callable[[str], str] | None = None  # a hint for an unknown name ("pip install ...") or ""


KINDS = {k.plural: k for k in (
    PluginKind("mindone_lora_strategies", "strategy", "strategies", "LoRA strategy"),
    PluginKind("mindone_lora_formats", "format", "formats", "LoRA format"),
    PluginKind("mindone_lora_algorithms", "algorithm", "algorithms", "LoRA algorithm", plugin_for_algorithm),
    PluginKind("mindone_lora_architectures", "architecture", "architectures", "architecture"),
    PluginKind("mindone_lora_training_features", "training feature", "training_features", "training feature"),
)}


@dataclass(frozen=True)
class PluginInfo:
    name: str
    dist: str
    version: str
    module: str
    builtin: bool


class LoraPluginManager(pluggy.PluginManager):
    """A pluggy manager for the ``mindone_lora`` project with name lookups for strategies, formats, algorithms and
    architectures."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.broken: dict[str, str] = {}
        self._found: dict[str, dict[str, tuple[object, str]]] = {}  # kind → name → (object, plugin name)

    # ------------------------------------------------------------------ loading

    def load_builtins(self) -> None:
        """Register the built-in plugins (a built-in that fails to import is a bug: it raises)."""
        for name, module in BUILTIN_PLUGINS.items():
            if not self.has_plugin(name):
                self.register(importlib.import_module(module), name=name)
                self.infos[name] = PluginInfo(name, THIS_DIST, _own_version(), module, True)
        self._found.clear()

    def load_entrypoints(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Register the built-ins, then every third-party plugin of the entry-point group the allowlist lets in."""
        self.load_builtins()
        allow = _allowlist()
        for ep in sorted(importlib_metadata.entry_points(group=group), key=lambda e: e.name):
            dist = _dist_name(ep) or "?"
            if dist == THIS_DIST:  # an older install's entry points for the built-ins: BUILTIN_PLUGINS is the list
                continue
            if allow is not None and ep.name not in allow and dist not in allow:
                continue
            if self.has_plugin(ep.name) or ep.name in self.broken:
                continue
            try:
                plugin = ep.load()
                self.register(plugin, name=ep.name)
            except Exception as e:  # a broken plugin must not take the others down
                self._report_broken(ep.name, dist, f"failed to load: {type(e).__name__}: {e}")
                continue
            self.infos[ep.name] = PluginInfo(ep.name, dist, _dist_version(ep), ep.value, False)
        self._found.clear()

    def register_plugin(self, plugin, name: str, dist: str = "<local>", version: str = "") -> None:
        """Register an in-process plugin object (for tests and scripts), as the entry-point loader would."""
        self.register(plugin, name=name)
        self.infos[name] = PluginInfo(name, dist, version, getattr(plugin, "__name__", repr(plugin)), False)
        self._found.clear()

    def unregister(self, plugin=None, name=None):  # keep the caches truthful
        self._found.clear()
        if name:
            self.infos.pop(name, None)
        return super().unregister(plugin=plugin, name=name)

    def _report_broken(self, name: str, dist: str, why: str) -> None:
        why = " ".join(why.split())
        self.broken[name] = why
        log.warning("mindone-lora: plugin '%s' (%s) %s; continuing without it", name, dist, why)

    # ------------------------------------------------------------------ discovery: one registry for every kind

    def _collect(self, kind: PluginKind) -> dict[str, tuple[object, str]]:
        found: dict[str, tuple[object, str]] = {}
        for impl in getattr(self.hook, kind.hook).get_hookimpls():
            plugin_name = impl.plugin_name
            try:
                objects = list(impl.function() or ())
                for obj in objects:
                    if not getattr(obj, "name", ""):
                        raise TypeError(f"{kind.singular} object {obj!r} has no name")
            except Exception as e:
                info = self.infos.get(plugin_name)
                if info is not None and info.builtin:
                    raise
                self._report_broken(plugin_name, info.dist if info else "?",
                                    f"raised while registering {kind.plural}: {type(e).__name__}: {e}")
                self.unregister(name=plugin_name)  # "continuing without it": none of its hooks run any more
                continue
            for obj in objects:
                if obj.name in found:
                    other = found[obj.name][1]
                    raise PluginError(f"two plugins offer the {kind.singular} '{obj.name}': '{other}' and "
                                      f"'{plugin_name}'; uninstall one of them or set {ENV_PLUGINS} to choose")
                found[obj.name] = (obj, plugin_name)
        return dict(sorted(found.items()))

    def _registry(self, kind: str) -> dict[str, tuple[object, str]]:
        if kind not in self._found:
            self._found[kind] = self._collect(KINDS[kind])
        return self._found[kind]

    def objects(self, kind: str) -> dict:
        """Name → object for every registered plugin object of ``kind`` (a key of :data:`KINDS`)."""
        return {name: hit[0] for name, hit in self._registry(kind).items()}

    def get(self, kind: str, name: str):
        """The object of ``kind`` called ``name``; an unknown name is a :class:`PluginError` listing the valid
        ones."""
        found = self._registry(kind)
        if name not in found:
            spec = KINDS[kind]
            hint = spec.hint(name) if spec.hint else ""
            raise PluginError(f"unknown {spec.title} '{name}'; choose one of: {', '.join(found) or '(none installed)'}"
                              + (f" ({hint})" if hint else ""))
        return found[name][0]

    def plugin_of(self, kind: str, name: str) -> str:
        """The name of the plugin offering the object of ``kind`` called ``name``."""
        self.get(kind, name)
        return self._registry(kind)[name][1]

    def strategies(self) -> dict:
        return self.objects("strategies")

    def formats(self) -> dict:
        return self.objects("formats")

    def algorithms(self) -> dict:
        return self.objects("algorithms")

    def architectures(self) -> dict:
        return self.objects("architectures")

    def get_strategy(self, name: str):
        return self.get("strategies", name)

    def get_format(self, name: str):
        return self.get("formats", name)

    def get_algorithm(self, name: str):
        return self.get("algorithms", name)

    def get_architecture(self, name: str):
        return self.get("architectures", name)

    def add_arguments(self, parser) -> None:
        """Let every plugin add its command-line arguments to ``parser`` (an argparse parser or group).

        A third-party plugin that raises here (a bug, or a flag another plugin already added) is reported and
        dropped like any broken plugin; the other plugins' arguments are still added.
        """
        for impl in reversed(self.hook.mindone_lora_add_arguments.get_hookimpls()):  # pluggy's calling order
            try:
                impl.function(*[{"parser": parser}[a] for a in impl.argnames])
            except Exception as e:
                info = self.infos.get(impl.plugin_name)
                if info is not None and info.builtin:
                    raise
                self._report_broken(impl.plugin_name, info.dist if info else "?",
                                    f"raised while adding arguments: {type(e).__name__}: {e}")
                self.unregister(name=impl.plugin_name)

    # ------------------------------------------------------------------ operations (what a trainer calls)

    def add_adapters(self, models, options) -> dict[str, list[str]]:
        return self.hook.mindone_lora_add_adapters(manager=self, models=models, options=options)

    def trainable_parameters(self, models, options) -> list[dict]:
        return self.hook.mindone_lora_trainable_parameters(manager=self, models=models, options=options)

    def save_weights(self, models, options, output_dir: str, formats, output_name: str = "lora",
                     metadata: dict | None = None) -> list[str]:
        return self.hook.mindone_lora_save_weights(manager=self, models=models, options=options,
                                                   output_dir=output_dir, formats=list(formats),
                                                   output_name=output_name, metadata=dict(metadata or {}))

    def load_weights(self, models, options, path: str):
        return self.hook.mindone_lora_load_weights(manager=self, models=models, options=options, path=path)

    # ------------------------------------------------------------------ reporting

    def _hook_names(self, plugin_name: str) -> list[str]:
        return sorted(h.name for h in self.get_hookcallers(self.get_plugin(plugin_name)) or [])

    def describe(self) -> dict:
        """What ``mindone-lora plugins --json`` prints."""
        def described(kind, obj, plugin):
            if kind == "formats":
                return {"name": obj.name, "plugin": plugin, "description": obj.description,
                        "filename": obj.default_filename("<output_name>")}
            return dict(obj.describe(), plugin=plugin)

        listed = {kind: [described(kind, obj, plugin) for obj, plugin in self._registry(kind).values()]
                  for kind in KINDS}
        return {
            "plugins": [{"name": i.name, "version": i.version, "distribution": i.dist, "module": i.module,
                         "builtin": i.builtin, "hooks": self._hook_names(i.name)}
                        for i in self.infos.values() if self.get_plugin(i.name) is not None],
            "broken": [{"name": n, "error": why} for n, why in self.broken.items()],
            **listed,
        }


def _allowlist() -> set[str] | None:
    raw = os.environ.get(ENV_PLUGINS)
    if raw is None:
        return None
    names = {n.strip() for n in raw.split(",") if n.strip()}
    return set() if names <= {"none"} else names


def _dist_name(ep) -> str | None:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) or (dist.metadata["Name"] if dist is not None else None)
    return name.replace("_", "-").lower() if name else None


def _dist_version(ep) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "version", "") or ""


def _own_version() -> str:
    from mindone_lora_plugin import __version__

    return __version__


_MANAGER: LoraPluginManager | None = None


def get_plugin_manager() -> LoraPluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _MANAGER
    if _MANAGER is None:
        pm = _MANAGER = LoraPluginManager()  # a plugin that asks for the manager while being imported gets this one
        try:
            pm.load_entrypoints()
        except BaseException:
            _MANAGER = None
            raise
    return _MANAGER


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (the next :func:`get_plugin_manager` reloads the entry points)."""
    global _MANAGER
    _MANAGER = None


_BUILTINS_ONLY: LoraPluginManager | None = None


def builtin_objects(kind: str) -> dict:
    """Name → object of ``kind`` that the built-in plugins alone offer (what a reader given no formats uses)."""
    global _BUILTINS_ONLY
    if _BUILTINS_ONLY is None:
        pm = LoraPluginManager()
        pm.load_builtins()
        _BUILTINS_ONLY = pm
    return _BUILTINS_ONLY.objects(kind)
