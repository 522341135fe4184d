"""Plugin discovery, selection and the per-kernel plugin manager.

Every plugin, built-in or third-party, is an object (usually a module) named by an entry point of
the group ``djinn.plugins``; the entry point's name is the plugin's name. At discovery each plugin
registers the strategies it offers (``djinn_register_strategies``); the configuration and ``--plugins``
then select one strategy per single-choice slot and any number per multi-choice slot. Unselected
plugins stay in the catalog (``djinn plugins`` lists them) but are unregistered from the hook relay,
so their event hooks never run. There is no module-global manager: ``get_plugin_manager`` builds one.
Its hooks are the kernel's (``hookspecs``) and those of the modules named by the entry-point group
``djinn.hookspecs`` (the engine's, the server's), known before any plugin registers.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import pluggy

from djinn.kernel import hookspecs
from djinn.kernel.config import KernelConfig, PluginSelection, build_settings
from djinn.kernel.errors import ConfigError, PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "djinn.plugins"
#: modules of hook specifications besides the kernel's (the engine's, the server's, any distribution's)
HOOKSPEC_GROUP = "djinn.hookspecs"
#: every slot, and the ``PluginSelection`` field that names what fills it; ``extension`` plugins
#: implement hooks only, with no strategy
SLOTS = {
    "scheduler": "scheduler", "tier": "tiers", "tier_placement": "tier_placement", "streamer": "streamer",
    "transport": "transports", "serializer": "serializer", "extension": "extensions",
}
#: the slots that take any number of names; the others take exactly one
MULTIPLE = frozenset({"tier", "transport", "extension"})


@attrs.frozen
class StrategySpec:
    """A strategy a plugin offers: its slot, its name, how to build it and its settings class."""

    slot: str
    name: str
    factory: Callable[..., Any]
    settings_cls: type | None
    plugin: str


@attrs.frozen
class PluginInfo:
    """What the catalog knows of one installed plugin."""

    name: str
    origin: str  # distribution name, or "local" for a plugin object registered by code
    version: str
    hooks: tuple[str, ...] = ()
    strategies: tuple[StrategySpec, ...] = ()
    error: str | None = None

    @property
    def slot(self) -> str:
        """The slot of its first strategy, or ``extension`` for a hooks-only plugin."""
        return self.strategies[0].slot if self.strategies else "extension"

    def describe(self) -> str:
        """``name (distribution version)`` for error messages."""
        return f"{self.name} ({self.origin} {self.version})"


class StrategyRegistry:
    """Handed to ``djinn_register_strategies``; records which plugin offers which strategy."""

    def __init__(self) -> None:
        self.specs: dict[str, StrategySpec] = {}
        #: the plugin whose ``djinn_register_strategies`` is running
        self.plugin = "?"

    def add(self, slot: str, name: str, factory: Callable[..., Any], *, settings: type | None = None) -> None:
        """Offer a strategy for ``slot`` under ``name``: ``factory(settings_instance)`` builds it,
        or ``factory()`` for a strategy without ``settings``."""
        if slot not in SLOTS or slot == "extension":
            allowed = ", ".join(s for s in SLOTS if s != "extension")
            raise PluginError(f"plugin {self.plugin!r} registers unknown slot {slot!r}; slots: {allowed}")
        if settings is not None and not attrs.has(settings):
            raise PluginError(f"plugin {self.plugin!r}: settings of {name!r} must be an attrs class")
        if name in self.specs:
            other = self.specs[name].plugin
            raise PluginError(f"strategy name {name!r} is registered by both {other!r} and {self.plugin!r}")
        self.specs[name] = StrategySpec(slot, name, factory, settings, self.plugin)


class DjinnPlugins:
    """A plugin manager for one kernel (or one CLI command): catalog, selection, settings, hooks."""

    def __init__(self, config: KernelConfig) -> None:
        self.config = config
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        for module in (hookspecs, *declared_hookspecs()):
            self.pm.add_hookspecs(module)
        self.catalog: dict[str, PluginInfo] = {}
        self.strategies: dict[str, StrategySpec] = {}
        self.selection: PluginSelection = config.plugins
        self.settings: dict[str, Any] = {}
        self._objects: dict[str, object] = {}

    @property
    def hook(self) -> Any:
        """The hook relay (selected plugins only)."""
        return self.pm.hook

    # ------------------------------------------------------------------ discovery

    def discover(
        self, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
        extra_plugins: Mapping[str, object] | None = None,
    ) -> None:
        """Load every entry point of ``djinn.plugins`` (and ``extra_plugins``), then collect strategies.
        A plugin that fails to import is recorded with its distribution, version and error; the others load."""
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(entry_points, key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            origin, version = (dist.name, dist.version) if dist is not None else ("?", "?")
            try:
                obj = ep.load()
            except Exception as exc:
                error = f"failed to import {ep.value}: {type(exc).__name__}: {exc}"
                self.catalog[ep.name] = PluginInfo(ep.name, origin, version, error=error)
                log.warning("plugin %s (%s %s) failed to load: %s", ep.name, origin, version, exc)
                continue
            self._add(ep.name, obj, origin, version)
        for name, obj in (extra_plugins or {}).items():
            self._add(name, obj, "local", "-")
        self._collect_strategies()

    def _add(self, name: str, obj: object, origin: str, version: str) -> None:
        if name in self.catalog:
            error = f"name {name!r} is already taken by {self.catalog[name].describe()}"
            self.catalog[f"{name}@{origin}"] = PluginInfo(name, origin, version, error=error)
            return
        try:
            self.pm.register(obj, name=name)
            self.pm.check_pending()
        except Exception as exc:  # a misspelled hook or bad signature: name the plugin, keep going
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
            self.catalog[name] = PluginInfo(name, origin, version, error=f"{exc}")
            return
        self._objects[name] = obj
        hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(obj) or ()))
        self.catalog[name] = PluginInfo(name, origin, version, hooks=hooks)

    def _collect_strategies(self) -> None:
        registry = StrategyRegistry()
        for impl in self.pm.hook.djinn_register_strategies.get_hookimpls():
            name, before = impl.plugin_name, dict(registry.specs)
            registry.plugin = name
            try:
                impl.function(**{arg: registry for arg in impl.argnames})
            except Exception as exc:  # the plugin is disabled: unregistered, its strategies forgotten
                registry.specs = before
                self.pm.unregister(self._objects.pop(name))
                error = f"raised in djinn_register_strategies: {type(exc).__name__}: {exc}"
                self.catalog[name] = attrs.evolve(self.catalog[name], error=error)
                log.warning("plugin %s disabled: %s", self.catalog[name].describe(), error)
                continue
            added = tuple(spec for key, spec in registry.specs.items() if key not in before)
            self.catalog[name] = attrs.evolve(self.catalog[name], strategies=added)
        self.strategies = registry.specs

    # ------------------------------------------------------------------ selection

    def _unknown(self, name: str) -> PluginError:
        broken = self.catalog.get(name)
        if broken is not None and broken.error:
            return PluginError(f"plugin {broken.describe()} cannot be used: {broken.error}")
        working = (p for p in self.catalog.values() if p.error is None)
        rows = ", ".join(f"{p.name} [{p.slot}] ({p.origin} {p.version})" for p in working)
        return PluginError(f"unknown plugin {name!r}; available: {rows}")

    def _slot_of(self, name: str) -> str:
        if name in self.strategies:
            return self.strategies[name].slot
        info = self.catalog.get(name)
        if info is None or info.error is not None:
            raise self._unknown(name)
        return info.slot

    def _owner(self, name: str) -> str:
        spec = self.strategies.get(name)
        return spec.plugin if spec is not None else name

    def select(self, overrides: Sequence[str] = ()) -> PluginSelection:
        """Apply ``--plugins`` overrides (``name`` selects, ``no:name`` blocks) and validate. A name for
        a single-choice slot replaces the configured one (naming two for one such slot is an error);
        a name for a multi-choice slot is added."""
        configured = {slot: getattr(self.config.plugins, field) for slot, field in SLOTS.items()}
        chosen = {slot: list(names) if slot in MULTIPLE else [names] for slot, names in configured.items()}
        named: dict[str, str] = {}
        blocked: set[str] = set()
        for name in filter(None, (raw.strip() for raw in overrides)):
            if name.startswith("no:"):
                if name[3:] not in self.catalog and name[3:] not in self.strategies:
                    raise self._unknown(name[3:])
                blocked.add(name[3:])
                continue
            slot = self._slot_of(name)
            if slot in MULTIPLE:
                if name not in chosen[slot]:
                    chosen[slot].append(name)
                continue
            if named.setdefault(slot, name) != name:
                raise PluginError(f"--plugins names two {slot}s, {named[slot]!r} and {name!r}; choose one")
            chosen[slot] = [name]
        for slot, names in chosen.items():
            chosen[slot] = [n for n in names if n not in blocked and self._owner(n) not in blocked]
            if slot not in MULTIPLE and not chosen[slot]:
                raise PluginError(f"the {slot} slot is empty (blocked: {', '.join(sorted(blocked))}); select one")
            for n in chosen[slot]:
                if self._slot_of(n) != slot:
                    raise PluginError(f"{n!r} is a {self._slot_of(n)}, not a {slot}")
        self.selection = PluginSelection(**{
            field: tuple(chosen[slot]) if slot in MULTIPLE else chosen[slot][0] for slot, field in SLOTS.items()
        })
        self._validate_settings()
        keep = self.selected_plugins()
        for name, obj in self._objects.items():
            if name not in keep and self.pm.is_registered(obj):
                self.pm.unregister(obj)
        return self.selection

    def _validate_settings(self) -> None:
        source = self.config.source
        for name, table in self.config.settings.items():
            spec = self.strategies.get(name)
            if spec is None and name not in self.catalog:
                installed = ", ".join(sorted(self.strategies))
                raise ConfigError(f"{source}: [settings.{name}] names no installed plugin; installed: {installed}")
            if spec is not None and spec.settings_cls is None and table:
                raise ConfigError(f"{source}: plugin {name!r} takes no settings, but [settings.{name}] has some")
        for name in self.selection.names():
            spec = self.strategies.get(name)
            if spec is not None and spec.settings_cls is not None:
                table = self.config.settings.get(name, {})
                self.settings[name] = build_settings(spec.settings_cls, table, source=source, where=f"settings.{name}")

    def selected_plugins(self) -> set[str]:
        """Names of plugins that own a selected strategy or are selected extensions."""
        return {self._owner(name) for name in self.selection.names()}

    # ------------------------------------------------------------------ building strategies and calling hooks

    def build(self, name: str) -> Any:
        """Build the strategy ``name`` with its validated settings."""
        spec = self.strategies.get(name)
        if spec is None:
            raise self._unknown(name)
        settings = self.settings.get(name)
        if settings is None and spec.settings_cls is not None:
            settings = build_settings(spec.settings_cls, {}, source=self.config.source, where=f"settings.{name}")
        try:
            return spec.factory(settings) if spec.settings_cls is not None else spec.factory()
        except Exception as exc:
            info = self.catalog[spec.plugin]
            raise PluginError(f"plugin {info.describe()} failed to build {name!r}: {type(exc).__name__}: {exc}") from exc

    def build_slot(self, slot: str) -> list[Any]:
        """Build every selected strategy of ``slot`` in selection order."""
        names = getattr(self.selection, SLOTS[slot])
        return [self.build(n) for n in (names if slot in MULTIPLE else (names,))]

    def notify(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call a hook; if an implementation raises, re-raise as ``PluginError`` naming its plugin."""
        caller = getattr(self.pm.hook, hook_name)
        try:
            return caller(**kwargs)
        except Exception as exc:
            culprit = _plugin_in_traceback(caller, exc)
            where = self.catalog[culprit].describe() if culprit in self.catalog else "a plugin"
            raise PluginError(f"plugin {where} raised in {hook_name}: {type(exc).__name__}: {exc}") from exc


@functools.cache
def declared_hookspecs() -> tuple[object, ...]:
    """The hook specification modules of the entry-point group ``djinn.hookspecs``, by name: the
    layers that call hooks of their own declare them there, and the kernel never imports those layers."""
    modules = []
    for ep in sorted(importlib.metadata.entry_points(group=HOOKSPEC_GROUP), key=lambda e: e.name):
        try:
            modules.append(ep.load())
        except Exception as exc:  # every plugin implementing one of its hooks would be refused
            dist = getattr(ep, "dist", None)
            where = f"{dist.name} {dist.version}" if dist is not None else "?"
            raise PluginError(f"hook specifications {ep.name} ({where}) failed to import {ep.value}: "
                              f"{type(exc).__name__}: {exc}") from exc
    return tuple(modules)


def _plugin_in_traceback(caller: Any, exc: BaseException) -> str | None:
    """The plugin whose hook implementation is the innermost frame of ``exc``'s traceback."""
    codes = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()
             if hasattr(impl.function, "__code__")}
    tb, found = exc.__traceback__, None
    while tb is not None:
        found = codes.get(tb.tb_frame.f_code, found)
        tb = tb.tb_next
    return found


def get_plugin_manager(
    config: KernelConfig, overrides: Sequence[str] = (), *,
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
    extra_plugins: Mapping[str, object] | None = None,
) -> DjinnPlugins:
    """Discover plugins, apply the selection from ``config`` and ``overrides``, validate settings.
    ``entry_points`` replaces discovery (tests); ``extra_plugins`` adds plugin objects by name, as if a
    distribution had declared them."""
    plugins = DjinnPlugins(config)
    plugins.discover(entry_points=entry_points, extra_plugins=extra_plugins)
    plugins.select(overrides)
    return plugins

