"""The plugin manager: loads the ``mindone_lora`` entry-point group; finds strategies, formats, algorithms and
architectures by name.

Built-in strategies and formats are ordinary entry points of this distribution, loaded like any third-party plugin.
A third-party plugin that fails to import, or raises while registering, is reported in one warning line and skipped;
everything else keeps working. Two plugins offering the same name is an error that names both; an unknown name is an
error that lists the valid ones.

Environment: ``MINDONE_LORA_PLUGINS`` unset loads every installed plugin; a comma-separated list loads only those
third-party plugins (by entry-point or distribution name); an empty value or ``none`` loads no third-party plugin.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import metadata as importlib_metadata

import pluggy

from mindone_lora_plugin import hookspecs
from mindone_lora_plugin.errors import PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
ENV_PLUGINS = "MINDONE_LORA_PLUGINS"
THIS_DIST = "mindone-lora-plugin"


def _source_tree_plugins() -> dict[str, str]:
    """The built-in entry points as ``setup.cfg`` declares them (the one list of built-in plugins), for a source tree
    that was never installed (no entry-point metadata)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.cfg"))
    raw = cfg.get("options.entry_points", ENTRY_POINT_GROUP, fallback="")
    pairs = (line.split("=", 1) for line in raw.splitlines() if "=" in line)
    return {name.strip(): value.strip() for name, value in pairs}


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
        self._strategies = None
        self._formats = None
        self._algorithms = None
        self._architectures = None

    # ------------------------------------------------------------------ loading

    def load_entrypoints(self, group: str = ENTRY_POINT_GROUP) -> None:
        allow = _allowlist()
        eps = list(importlib_metadata.entry_points(group=group))
        if not any(_dist_name(ep) == THIS_DIST for ep in eps):
            eps += [importlib_metadata.EntryPoint(n, v, group) for n, v in _source_tree_plugins().items()]
        for ep in sorted(eps, key=lambda e: (_dist_name(e) != THIS_DIST, e.name)):
            dist = _dist_name(ep) or THIS_DIST
            builtin = dist == THIS_DIST
            if not builtin and allow is not None and ep.name not in allow and dist not in allow:
                continue
            if self.has_plugin(ep.name) or ep.name in self.broken:
                continue
            try:
                plugin = ep.load()
                self.register(plugin, name=ep.name)
            except Exception as e:  # a broken plugin must not take the others down
                if builtin:
                    raise
                self._report_broken(ep.name, dist, f"failed to load: {type(e).__name__}: {e}")
                continue
            version = _dist_version(ep) if not builtin else _own_version()
            self.infos[ep.name] = PluginInfo(ep.name, dist, version, ep.value, builtin)
        self._strategies = self._formats = self._algorithms = self._architectures = None

    def register_plugin(self, plugin, name: str, dist: str = "<local>", version: str = "") -> None:
        """Register an in-process plugin object (for tests and scripts), as the entry-point loader would."""
        self.register(plugin, name=name)
        self.infos[name] = PluginInfo(name, dist, version, getattr(plugin, "__name__", repr(plugin)), False)
        self._strategies = self._formats = self._algorithms = self._architectures = None

    def unregister(self, plugin=None, name=None):  # keep the caches truthful
        self._strategies = self._formats = self._algorithms = self._architectures = None
        if name:
            self.infos.pop(name, None)
        return super().unregister(plugin=plugin, name=name)

    def _report_broken(self, name: str, dist: str, why: str) -> None:
        why = " ".join(why.split())
        self.broken[name] = why
        log.warning("mindone-lora: plugin '%s' (%s) %s; continuing without it", name, dist, why)

    # ------------------------------------------------------------------ discovery

    def _collect(self, hook_name: str, kind: str) -> dict:
        found: dict[str, tuple[object, str]] = {}
        for impl in getattr(self.hook, hook_name).get_hookimpls():
            plugin_name = impl.plugin_name
            try:
                objects = list(impl.function() or ())
                for obj in objects:
                    if not getattr(obj, "name", ""):
                        raise TypeError(f"{kind} object {obj!r} has no name")
            except Exception as e:
                info = self.infos.get(plugin_name)
                if info is not None and info.builtin:
                    raise
                self._report_broken(plugin_name, info.dist if info else "?",
                                    f"raised while registering {_plural(kind)}: "
                                    f"{type(e).__name__}: {e}")
                self.unregister(name=plugin_name)  # "continuing without it": none of its hooks run any more
                continue
            for obj in objects:
                if obj.name in found:
                    other = found[obj.name][1]
                    raise PluginError(f"two plugins offer the {kind} '{obj.name}': '{other}' and '{plugin_name}'; "
                                      f"uninstall one of them or set {ENV_PLUGINS} to choose")
                found[obj.name] = (obj, plugin_name)
        return dict(sorted(found.items()))

    def strategies(self) -> dict:
        """Name → strategy object for every registered strategy."""
        if self._strategies is None:
            self._strategies = self._collect("mindone_lora_strategies", "strategy")
        return {k: v[0] for k, v in self._strategies.items()}

    def formats(self) -> dict:
        """Name → format object for every registered format."""
        if self._formats is None:
            self._formats = self._collect("mindone_lora_formats", "format")
        return {k: v[0] for k, v in self._formats.items()}

    def algorithms(self) -> dict:
        """Name → algorithm object for every registered adapter algorithm."""
        if self._algorithms is None:
            self._algorithms = self._collect("mindone_lora_algorithms", "algorithm")
        return {k: v[0] for k, v in self._algorithms.items()}

    def architectures(self) -> dict:
        """Name → architecture object for every registered architecture (model family)."""
        if self._architectures is None:
            self._architectures = self._collect("mindone_lora_architectures", "architecture")
        return {k: v[0] for k, v in self._architectures.items()}

    def architecture_plugin(self, name: str) -> str:
        self.architectures()
        return self._architectures[name][1]

    def get_architecture(self, name: str):
        found = self.architectures()
        if name not in found:
            raise PluginError(f"unknown architecture '{name}'; choose one of: {', '.join(found) or '(none installed)'}")
        return found[name]

    def algorithm_plugin(self, name: str) -> str:
        self.algorithms()
        return self._algorithms[name][1]

    def get_algorithm(self, name: str):
        if self._algorithms is None:
            self.algorithms()
        hit = self._algorithms.get(name)
        if hit is None:
            from mindone_lora_plugin.formats.variants import plugin_for_algorithm

            hint = plugin_for_algorithm(name)
            raise PluginError(f"unknown LoRA algorithm '{name}'; choose one of: "
                              f"{', '.join(self._algorithms) or '(none installed)'}" + (f" ({hint})" if hint else ""))
        return hit[0]

    def strategy_plugin(self, name: str) -> str:
        self.strategies()
        return self._strategies[name][1]

    def format_plugin(self, name: str) -> str:
        self.formats()
        return self._formats[name][1]

    def get_strategy(self, name: str):
        found = self.strategies()
        if name not in found:
            raise PluginError(f"unknown LoRA strategy '{name}'; choose one of: "
                              f"{', '.join(found) or '(none installed)'}")
        return found[name]

    def get_format(self, name: str):
        found = self.formats()
        if name not in found:
            raise PluginError(f"unknown LoRA format '{name}'; choose one of: {', '.join(found) or '(none installed)'}")
        return found[name]

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
        strategies, formats, algorithms = self.strategies(), self.formats(), self.algorithms()
        architectures = self.architectures()
        return {
            "plugins": [{"name": i.name, "version": i.version, "distribution": i.dist, "module": i.module,
                         "builtin": i.builtin, "hooks": self._hook_names(i.name)}
                        for i in self.infos.values() if self.get_plugin(i.name) is not None],
            "broken": [{"name": n, "error": why} for n, why in self.broken.items()],
            "strategies": [dict(s.describe(), plugin=self.strategy_plugin(n)) for n, s in strategies.items()],
            "formats": [{"name": n, "plugin": self.format_plugin(n), "description": f.description,
                         "filename": f.default_filename("<output_name>")} for n, f in formats.items()],
            "algorithms": [dict(a.describe(), plugin=self.algorithm_plugin(n)) for n, a in algorithms.items()],
            "architectures": [dict(a.describe(), plugin=self.architecture_plugin(n))
                              for n, a in architectures.items()],
        }


def _plural(kind: str) -> str:
    return "strategies" if kind == "strategy" else kind + "s"


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
