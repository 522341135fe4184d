"""Plugin discovery and selection, with local plugins and fake entry points (a fresh manager each)."""

from __future__ import annotations

import types

import attrs
import pytest

from djinn.cli import plugin_rows, split_plugin_names
from djinn.config import DjinnConfig
from djinn.kernel.config import PluginSelection
from djinn.kernel.errors import ConfigError, PluginError
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.plugins import get_plugin_manager

BUILTINS = {
    "semantic": "scheduler", "lru": "scheduler", "static": "scheduler",
    "pinned_host": "tier", "tiered": "tier_placement", "resident": "streamer", "ringbuffer": "streamer",
    "tcp": "transport", "inproc": "transport", "ucx": "transport", "arrow": "serializer",
}


class FakeEntryPoint:
    """Duck-typed ``importlib.metadata.EntryPoint`` whose load runs a callable."""

    def __init__(self, name, loader, dist="thirdparty-pkg", version="9.9"):
        self.name, self.value, self._loader = name, f"{dist}.mod:{name}", loader
        self.dist = types.SimpleNamespace(name=dist, version=version)

    def load(self):
        return self._loader()


def strategy_plugin(slot, name, settings=None):
    """A plugin object offering one strategy whose factory returns (name, settings)."""

    class Plugin:
        @hookimpl
        def djinn_register_strategies(self, registry):
            registry.add(slot, name, lambda s=None: (name, s), settings=settings)

    return Plugin()


def minimal_set(**extra):
    """Plugins for every single-choice slot the default selection needs, as local objects."""
    plugins = {
        "semantic": strategy_plugin("scheduler", "semantic"),
        "pinned_host": strategy_plugin("tier", "pinned_host"),
        "tiered": strategy_plugin("tier_placement", "tiered"),
        "resident": strategy_plugin("streamer", "resident"),
        "tcp": strategy_plugin("transport", "tcp"),
        "inproc": strategy_plugin("transport", "inproc"),
        "arrow": strategy_plugin("serializer", "arrow"),
    }
    plugins.update(extra)
    return plugins


def make(overrides=(), config=None, entry_points=(), **extra):
    return get_plugin_manager(
        config or DjinnConfig(), list(overrides),
        entry_points=list(entry_points), extra_plugins=minimal_set(**extra),
    )


def test_builtins_are_discovered_through_entry_points_with_slot_and_origin():
    plugins = get_plugin_manager(DjinnConfig())
    rows = {r["name"]: r for r in plugin_rows(plugins)}
    for name, slot in BUILTINS.items():
        assert rows[name]["slot"] == slot, rows[name]
        assert rows[name]["origin"] == "djinn"
    assert rows["semantic"]["selected"] and not rows["lru"]["selected"]
    assert "djinn_register_strategies" in rows["semantic"]["hooks"]


def test_overrides_replace_single_slot_and_add_to_multi_slot():
    fifo = strategy_plugin("scheduler", "fifo")
    ucx = strategy_plugin("transport", "ucx")
    plugins = make(["fifo", "ucx", "no:inproc"], fifo=fifo, ucx=ucx)
    assert plugins.selection.scheduler == "fifo"
    assert plugins.selection.transports == ("tcp", "ucx")
    assert plugins.build("fifo") == ("fifo", None)


def test_unknown_plugin_lists_available_names_and_origins():
    with pytest.raises(PluginError) as err:
        make(["nosuch"])
    assert "unknown plugin 'nosuch'" in str(err.value)
    assert "semantic [scheduler] (local -)" in str(err.value)


def test_an_unknown_placement_in_the_configuration_lists_the_placements():
    with pytest.raises(PluginError) as err:
        make(config=DjinnConfig(plugins=PluginSelection(tier_placement="nearest")))
    assert "unknown plugin 'nearest'" in str(err.value)
    assert "tiered [tier_placement] (local -)" in str(err.value)


def test_the_builtin_placement_is_the_default_and_a_placement_replaces_it():
    assert get_plugin_manager(DjinnConfig()).selection.tier_placement == "tiered"
    plugins = make(["nearest"], nearest=strategy_plugin("tier_placement", "nearest"))
    assert plugins.selection.tier_placement == "nearest"
    assert plugins.build_slot("tier_placement") == [("nearest", None)]


def test_two_plugins_for_a_single_choice_slot_are_refused():
    with pytest.raises(PluginError, match="two schedulers"):
        make(["semantic", "fifo"], fifo=strategy_plugin("scheduler", "fifo"))


def test_blocking_the_only_scheduler_is_refused():
    with pytest.raises(PluginError, match="scheduler slot is empty"):
        make(["no:semantic"])


def test_unselected_plugins_are_unregistered_from_the_hook_relay():
    calls = []

    class Watcher:
        @hookimpl
        def djinn_register_strategies(self, registry):
            registry.add("scheduler", "watcher", lambda: None)

        @hookimpl
        def djinn_shutdown(self, kernel):
            calls.append("watcher")

    plugins = make(watcher=Watcher())
    plugins.hook.djinn_shutdown(kernel=None)
    assert calls == []
    plugins = make(["watcher"], watcher=Watcher())
    plugins.hook.djinn_shutdown(kernel=None)
    assert calls == ["watcher"]


@attrs.frozen
class KnobSettings:
    depth: int = attrs.field(default=2, validator=attrs.validators.in_([1, 2, 4]))


def test_plugin_settings_are_validated_with_file_table_and_key():
    knob = strategy_plugin("scheduler", "knob", settings=KnobSettings)
    config = DjinnConfig(source="my.toml", settings={"knob": {"depht": 4}})
    with pytest.raises(ConfigError) as err:
        make(["knob"], config=config, knob=knob)
    assert "my.toml" in str(err.value) and "[settings.knob]" in str(err.value) and "'depht'" in str(err.value)
    config = DjinnConfig(source="my.toml", settings={"knob": {"depth": 3}})
    with pytest.raises(ConfigError, match="allowed values: 1, 2, 4"):
        make(["knob"], config=config, knob=knob)
    config = DjinnConfig(source="my.toml", settings={"knob": {"depth": 4}})
    assert make(["knob"], config=config, knob=knob).build("knob") == ("knob", KnobSettings(4))


def test_settings_for_an_uninstalled_plugin_are_refused():
    with pytest.raises(ConfigError, match=r"\[settings.nosuch\] names no installed plugin"):
        make(config=DjinnConfig(settings={"nosuch": {"x": 1}}))


def test_a_plugin_that_fails_to_import_is_named_and_the_rest_still_work():
    def boom():
        raise ImportError("no module named 'missing_dep'")

    plugins = make(entry_points=[FakeEntryPoint("broken", boom, dist="broken-pkg", version="1.2")])
    info = plugins.catalog["broken"]
    assert info.origin == "broken-pkg" and info.version == "1.2" and "missing_dep" in info.error
    assert plugins.selection.scheduler == "semantic"
    with pytest.raises(PluginError, match=r"broken \(broken-pkg 1.2\) cannot be used"):
        plugins.select(["broken"])


def test_a_misspelled_hook_marks_only_that_plugin_broken():
    class Typo:
        @hookimpl
        def djinn_sesion_created(self, session):
            pass

    plugins = make(entry_points=[FakeEntryPoint("typo", Typo)])
    assert "djinn_sesion_created" in plugins.catalog["typo"].error
    assert plugins.catalog["semantic"].error is None


def test_registration_error_disables_the_plugin_only():
    class Bad:
        @hookimpl
        def djinn_register_strategies(self, registry):
            registry.add("nosuchslot", "bad", lambda: None)

    plugins = make(entry_points=[FakeEntryPoint("bad", Bad)])
    assert "unknown slot 'nosuchslot'" in plugins.catalog["bad"].error


def test_a_hook_that_raises_is_named_with_distribution_and_version():
    class Faulty:
        @hookimpl
        def djinn_session_created(self, session):
            raise RuntimeError("kaboom")

    plugins = make(["faulty"], entry_points=[FakeEntryPoint("faulty", Faulty, dist="faulty-pkg", version="0.3")])
    with pytest.raises(PluginError) as err:
        plugins.notify("djinn_session_created", session=None)
    assert "faulty (faulty-pkg 0.3)" in str(err.value) and "kaboom" in str(err.value)


def test_duplicate_plugin_names_keep_the_first():
    plugins = make(entry_points=[
        FakeEntryPoint("dup", lambda: strategy_plugin("scheduler", "dup1"), dist="a"),
        FakeEntryPoint("dup", lambda: strategy_plugin("scheduler", "dup2"), dist="b"),
    ])
    assert plugins.catalog["dup"].origin == "a"
    assert "already taken" in plugins.catalog["dup@b"].error


def test_split_plugin_names():
    assert split_plugin_names(" semantic, ringbuffer,,no:tcp ") == ["semantic", "ringbuffer", "no:tcp"]
    assert split_plugin_names(None) == []


def test_selection_names_cover_every_slot():
    assert PluginSelection().names() == ("semantic", "pinned_host", "tiered", "resident", "tcp", "inproc", "arrow")
