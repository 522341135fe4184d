"""Plugin discovery, selection and the per-kernel plugin manager.

Every plugin, built-in or third-party, is an object (usually a module) named by an entry point
of the group ``djinn.plugins``; the entry point's name is the plugin's name. At discovery each
plugin registers the strategies it offers (``djinn_register_strategies``); the configuration and
``--plugins`` then select one strategy per single-choice slot and any number per multi-choice
slot. Unselected plugins stay in the catalog (``djinn plugins`` lists them) but are unregistered
from the hook relay, so their event hooks never run.

There is no module-global manager: ``get_plugin_manager`` builds a fresh one each time.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import pluggy

from djinn.kernel import hookspecs
from djinn.kernel.config import DjinnConfig, PluginSelection, build_settings
from djinn.kernel.errors import ConfigError, PluginError
from djinn.kernel.strategies import SLOTS

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "djinn.plugins"

#: PluginSelection field for each slot
_SELECTION_FIELD = {
    "scheduler": "scheduler",
    "tier": "tiers",
    "streamer": "streamer",
    "transport": "transports",
    "serializer": "serializer",
    "extension": "extensions",
}


@attrs.frozen
class StrategySpec:
    """A strategy a plugin offers: its slot, its name, how to build it and its settings class."""

    slot: str
    name: str
    factory: Callable[[Any], Any]
    settings_cls: type | None
    plugin: str


@attrs.frozen
class PluginInfo:
    """What the catalog knows of one installed plugin."""

    name: str
    origin: str  # distribution name, or "local" for a plugin object registered by code
    version: str
    module: str
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
        self._owner: str | None = None

    @contextmanager
    def owned_by(self, plugin: str) -> Iterator[None]:
        """Attribute every ``add`` inside the block to ``plugin``."""
        self._owner = plugin
        try:
            yield
        finally:
            self._owner = None

    def add(
        self,
        slot: str,
        name: str,
        factory: Callable[[Any], Any],
        *,
        settings: type | None = None,
    ) -> None:
        """Offer a strategy for ``slot`` under ``name``: ``factory(settings_instance)`` builds it,
        or ``factory()`` for a strategy without ``settings``."""
        if slot not in SLOTS or slot == "extension":
            allowed = ", ".join(s for s in SLOTS if s != "extension")
            raise PluginError(f"plugin {self._owner!r} registers unknown slot {slot!r}; slots: {allowed}")
        if settings is not None and not attrs.has(settings):
            raise PluginError(f"plugin {self._owner!r}: settings of {name!r} must be an attrs class")
        if name in self.specs:
            other = self.specs[name].plugin
            raise PluginError(f"strategy name {name!r} is registered by both {other!r} and {self._owner!r}")
        self.specs[name] = StrategySpec(slot, name, factory, settings, self._owner or "?")


def _hooks_of(pm: pluggy.PluginManager, plugin: object) -> tuple[str, ...]:
    return tuple(sorted(h.name for h in (pm.get_hookcallers(plugin) or ())))


class DjinnPlugins:
    """A plugin manager for one kernel (or one CLI command): catalog, selection, settings, hooks."""

    def __init__(self, config: DjinnConfig) -> None:
        self.config = config
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
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

    def _add(self, name: str, obj: object, origin: str, version: str) -> None:
        module = getattr(obj, "__name__", type(obj).__name__)
        if name in self.catalog:
            prior = self.catalog[name]
            self.catalog[name + f"@{origin}"] = PluginInfo(
                name, origin, version, module,
                error=f"name {name!r} is already taken by {prior.describe()}",
            )
            return
        try:
            self.pm.register(obj, name=name)
            self.pm.check_pending()
        except Exception as exc:  # a misspelled hook or bad signature: name the plugin, keep going
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
            self.catalog[name] = PluginInfo(name, origin, version, module, error=f"{exc}")
            return
        self._objects[name] = obj
        self.catalog[name] = PluginInfo(name, origin, version, module, hooks=_hooks_of(self.pm, obj))

    def discover(
        self,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
        extra_plugins: Mapping[str, object] | None = None,
    ) -> None:
        """Load every entry point of ``djinn.plugins`` (and ``extra_plugins``), then collect strategies.

        A plugin that fails to import is recorded with its distribution, version and error; the
        others still load.
        """
        eps = entry_points if entry_points is not None else importlib.metadata.entry_points(
            group=ENTRY_POINT_GROUP
        )
        for ep in sorted(eps, key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            origin = dist.name if dist is not None else "?"
            version = dist.version if dist is not None else "?"
            try:
                obj = ep.load()
            except Exception as exc:
                self.catalog[ep.name] = PluginInfo(
                    ep.name, origin, version, ep.value,
                    error=f"failed to import {ep.value}: {type(exc).__name__}: {exc}",
                )
                log.warning("plugin %s (%s %s) failed to load: %s", ep.name, origin, version, exc)
                continue
            self._add(ep.name, obj, origin, version)
        for name, obj in (extra_plugins or {}).items():
            self._add(name, obj, "local", "-")
        self._collect_strategies()

    def _collect_strategies(self) -> None:
        registry = StrategyRegistry()
        for impl in self.pm.hook.djinn_register_strategies.get_hookimpls():
            name = impl.plugin_name
            before = set(registry.specs)
            try:
                with registry.owned_by(name):
                    impl.function(**{arg: registry for arg in impl.argnames})
            except Exception as exc:
                for key in set(registry.specs) - before:
                    del registry.specs[key]
                self._mark_broken(name, f"raised in djinn_register_strategies: {type(exc).__name__}: {exc}")
                continue
            info = self.catalog[name]
            added = tuple(registry.specs[k] for k in registry.specs if k not in before)
            self.catalog[name] = attrs.evolve(info, strategies=added)
        self.strategies = registry.specs

    def _mark_broken(self, name: str, error: str) -> None:
        obj = self._objects.pop(name, None)
        if obj is not None and self.pm.is_registered(obj):
            self.pm.unregister(obj)
        self.catalog[name] = attrs.evolve(self.catalog[name], error=error)
        log.warning("plugin %s disabled: %s", self.catalog[name].describe(), error)

    # ------------------------------------------------------------------ selection

    def available(self, slot: str | None = None) -> list[PluginInfo]:
        """Working plugins, optionally only those of one slot."""
        return [p for p in self.catalog.values() if p.error is None and (slot is None or p.slot == slot)]

    def _unknown(self, name: str) -> PluginError:
        rows = ", ".join(f"{p.name} [{p.slot}] ({p.origin} {p.version})" for p in self.available())
        broken = self.catalog.get(name)
        if broken is not None and broken.error:
            return PluginError(f"plugin {broken.describe()} cannot be used: {broken.error}")
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
        """Apply ``--plugins`` overrides (``name`` selects, ``no:name`` blocks) and validate.

        A name for a single-choice slot replaces the configured one; naming two for the same
        single-choice slot is an error. A name for a multi-choice slot is added.
        """
        chosen: dict[str, list[str]] = {
            slot: list(getattr(self.config.plugins, fld)) if SLOTS[slot].multiple
            else [getattr(self.config.plugins, fld)]
            for slot, fld in _SELECTION_FIELD.items()
        }
        named_single: dict[str, str] = {}
        blocked: set[str] = set()
        for raw in overrides:
            name = raw.strip()
            if not name:
                continue
            if name.startswith("no:"):
                target = name[3:]
                if target not in self.catalog and target not in self.strategies:
                    raise self._unknown(target)
                blocked.add(target)
                continue
            slot = self._slot_of(name)
            if SLOTS[slot].multiple:
                if name not in chosen[slot]:
                    chosen[slot].append(name)
            else:
                if slot in named_single and named_single[slot] != name:
                    raise PluginError(
                        f"--plugins names two {slot}s, {named_single[slot]!r} and {name!r}; choose one"
                    )
                named_single[slot] = name
                chosen[slot] = [name]
        for slot, names in chosen.items():
            kept = [n for n in names if n not in blocked and self._owner(n) not in blocked]
            if not SLOTS[slot].multiple and not kept:
                raise PluginError(f"the {slot} slot is empty (blocked: {', '.join(sorted(blocked))}); select one")
            for n in kept:
                if self._slot_of(n) != slot:
                    raise PluginError(f"{n!r} is a {self._slot_of(n)}, not a {slot}")
            chosen[slot] = kept
        self.selection = PluginSelection(**{
            fld: tuple(chosen[slot]) if SLOTS[slot].multiple else chosen[slot][0]
            for slot, fld in _SELECTION_FIELD.items()
        })
        self._validate_settings()
        self._unregister_unselected()
        return self.selection

    def _validate_settings(self) -> None:
        source = self.config.source
        for name, table in self.config.settings.items():
            spec = self.strategies.get(name)
            if spec is None and name not in self.catalog:
                raise ConfigError(
                    f"{source}: [settings.{name}] names no installed plugin; installed: "
                    + ", ".join(sorted(self.strategies))
                )
            if spec is not None and spec.settings_cls is None and table:
                raise ConfigError(f"{source}: plugin {name!r} takes no settings, but [settings.{name}] has some")
        for name in self.selected_names():
            spec = self.strategies.get(name)
            if spec is not None and spec.settings_cls is not None:
                self.settings[name] = build_settings(
                    spec.settings_cls, self.config.settings.get(name, {}),
                    source=source, where=f"settings.{name}",
                )

    def selected_names(self) -> tuple[str, ...]:
        """Every selected strategy or extension name."""
        return self.selection.names()

    def selected_plugins(self) -> set[str]:
        """Names of plugins that own a selected strategy or are selected extensions."""
        return {self._owner(name) for name in self.selected_names()}

    def _unregister_unselected(self) -> None:
        keep = self.selected_plugins()
        for name, obj in list(self._objects.items()):
            if name not in keep and self.pm.is_registered(obj):
                self.pm.unregister(obj)

    # ------------------------------------------------------------------ building strategies

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
        fld = _SELECTION_FIELD[slot]
        value = getattr(self.selection, fld)
        names = value if isinstance(value, tuple) else (value,)
        return [self.build(n) for n in names]

    # ------------------------------------------------------------------ calling hooks

    def notify(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call a hook; if an implementation raises, re-raise as ``PluginError`` naming its plugin."""
        caller = getattr(self.pm.hook, hook_name)
        try:
            return caller(**kwargs)
        except Exception as exc:
            culprit = self._plugin_in_traceback(caller, exc)
            where = self.catalog[culprit].describe() if culprit in self.catalog else "a plugin"
            raise PluginError(f"plugin {where} raised in {hook_name}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _plugin_in_traceback(caller: Any, exc: BaseException) -> str | None:
        codes = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()
                 if hasattr(impl.function, "__code__")}
        tb = exc.__traceback__
        found = None
        while tb is not None:
            found = codes.get(tb.tb_frame.f_code, found)
            tb = tb.tb_next
        return found

    # ------------------------------------------------------------------ listing

    def rows(self) -> list[dict[str, Any]]:
        """One row per installed plugin for ``djinn plugins``."""
        selected = self.selected_plugins()
        out = []
        for info in sorted(self.catalog.values(), key=lambda p: (p.slot, p.name)):
            out.append({
                "name": info.name,
                "slot": info.slot,
                "strategies": [s.name for s in info.strategies],
                "origin": info.origin,
                "version": info.version,
                "hooks": [h for h in info.hooks],
                "selected": info.name in selected and info.error is None,
                "error": info.error,
            })
        return out


def get_plugin_manager(
    config: DjinnConfig,
    overrides: Sequence[str] = (),
    *,
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
    extra_plugins: Mapping[str, object] | None = None,
) -> DjinnPlugins:
    """Discover plugins, apply the selection from ``config`` and ``overrides``, validate settings.

    ``entry_points`` replaces discovery (tests); ``extra_plugins`` adds plugin objects by name, as
    if a distribution had declared them.
    """
    plugins = DjinnPlugins(config)
    plugins.discover(entry_points=entry_points, extra_plugins=extra_plugins)
    plugins.select(overrides)
    return plugins


def split_plugin_names(text: str | None) -> list[str]:
    """``"semantic, ringbuffer,no:tcp"`` -> ``["semantic", "ringbuffer", "no:tcp"]``."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]
