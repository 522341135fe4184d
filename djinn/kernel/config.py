"""Configuration machinery: the kernel's own tables and the validation every table goes through.

The kernel reads ``[plugins]``, ``[memory]``'s budgets and each plugin's ``[settings.NAME]``
(``KernelConfig``); ``build_settings`` builds each table from its TOML, for the kernel's tables and
every plugin's. The whole configuration, with the server's, the model's and the engine's keys, and
the reading of a whole ``plugins.toml`` document are ``djinn.config``'s. Every error names the file,
the table and the key, and the allowed keys or values.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
from attrs.validators import ge

from djinn.kernel.errors import ConfigError


def _names(value: Any) -> tuple[str, ...]:
    """Accept a string or a list of strings for a multi-choice slot."""
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class PluginSelection:
    """Which strategy fills each slot (the names are the plugins' entry-point names)."""

    scheduler: str = "semantic"
    tiers: tuple[str, ...] = attrs.field(default=("pinned_host",), converter=_names)
    #: which tier a KV copy goes to, which copies a full tier demotes, what a restore promotes
    tier_placement: str = "tiered"
    streamer: str = "resident"
    transports: tuple[str, ...] = attrs.field(default=("tcp", "inproc"), converter=_names)
    serializer: str = "arrow"
    extensions: tuple[str, ...] = attrs.field(default=(), converter=_names)

    def names(self) -> tuple[str, ...]:
        """Every selected name, in slot order."""
        return (self.scheduler, *self.tiers, self.tier_placement, self.streamer, *self.transports, self.serializer,
                *self.extensions)


@attrs.frozen
class MemorySettings:
    """The budgets of ``[memory]`` that the kernel's accounting enforces (``djinn.config.MemorySettings``
    adds the engine's keys of the table: the KV pool's blocks and dtype, the workspace)."""

    #: cap on GPU bytes the kernel may use (weights + KV + workspace); 0 means the device's free memory
    gpu_memory_budget_gb: float = attrs.field(default=0.0, validator=ge(0))
    #: requests that may wait for memory at once; one more fails with AdmissionError
    admission_queue: int = attrs.field(default=256, validator=ge(0))


@attrs.frozen
class KernelConfig:
    """The configuration the kernel reads: the plugin selection, the memory budgets and the plugins'
    settings. ``djinn.config.DjinnConfig`` extends it with the server's and the model's tables and
    the engine's ``[memory]`` keys."""

    source: str = "<defaults>"
    plugins: PluginSelection = PluginSelection()
    memory: MemorySettings = MemorySettings()
    #: raw ``[settings.NAME]`` tables, validated by the plugin manager against each plugin's class
    settings: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)


T = TypeVar("T")


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether a TOML value fits a field's annotation (str, int, float, bool, tuple[T, ...], unions)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if origin is tuple:
        item = args[0] if args else Any
        if item is str and isinstance(value, str):
            return True  # a single name for a multi-choice slot
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation in (int, float):  # an int fits a float field; a bool fits neither
        return isinstance(value, (int, annotation)) and not isinstance(value, bool)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def build_settings(cls: type[T], table: Mapping[str, Any], *, source: str, where: str) -> T:
    """Build an attrs settings class from a TOML table, failing with file, table and key named: for
    the kernel's own tables and for every plugin's ``[settings.NAME]`` table."""
    fields = {f.name: f for f in attrs.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "(none)"
            raise ConfigError(f"{source}: unknown key {key!r} in [{where}]; allowed keys: {allowed}")
        if not _type_ok(value, hints.get(key, Any)):
            expected = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise ConfigError(f"{source}: [{where}] {key} = {value!r} has the wrong type; expected {expected}")
    for key, value in table.items():  # validators one by one, so a bad value is named with its key
        f = fields[key]
        if f.validator is not None:
            try:
                f.validator(None, f, f.converter(value) if f.converter else value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: bad value for {key!r} in [{where}]: {_explain(exc)}") from None
    try:
        return cls(**table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: bad value in [{where}]: {_explain(exc)}") from None


def _explain(exc: Exception) -> str:
    # attrs' in_ validator raises ValueError(msg, attribute, options, value)
    if len(exc.args) == 4 and isinstance(exc.args[1], attrs.Attribute):
        _msg, attribute, options, value = exc.args
        return f"{attribute.name} = {value!r}; allowed values: {', '.join(map(str, options))}"
    return str(exc.args[0]) if exc.args else str(exc)
