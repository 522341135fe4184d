"""Building one strategy by its entry-point name, as the kernel does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from djinn.kernel.config import KernelConfig
from djinn.kernel.plugins import get_plugin_manager


def build_strategy(name: str, slot: str, settings: Mapping[str, Any] | None = None) -> Any:
    """A fresh plugin manager that selects ``name``, then the strategy it builds.

    ``settings`` is the ``[settings.NAME]`` table; the strategy must belong to ``slot``.
    """
    config = KernelConfig(settings={name: dict(settings)} if settings else {})
    plugins = get_plugin_manager(config, [name])
    spec = plugins.strategies.get(name)
    assert spec is not None, f"no installed plugin registers a strategy named {name!r}"
    assert spec.slot == slot, f"{name!r} is a {spec.slot}, not a {slot}"
    return plugins.build(name)
