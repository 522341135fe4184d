"""Checks of values that arrive in a frame's meta: each failure is a ``SessionError`` naming the key."""

from __future__ import annotations

from typing import Any

from djinn.kernel.errors import SessionError


def enum_value(cls: Any, value: Any) -> Any:
    """``cls(value)``, or an error listing the members' values."""
    try:
        return cls(value)
    except ValueError:
        raise SessionError(f"{value!r} is not one of {', '.join(m.value for m in cls)}") from None


def number(meta: dict[str, Any], key: str, default: Any) -> float:
    """``meta[key]`` as a finite-range float (ints and floats only, never bools)."""
    value = meta.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SessionError(f"{key} must be a number")
    try:
        return float(value)  # JSON integers have no bound; floats do
    except OverflowError:
        raise SessionError(f"{key} is out of range") from None


def integer(meta: dict[str, Any], key: str, default: int) -> int:
    """``meta[key]`` as an int (never a bool or a float)."""
    value = meta.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SessionError(f"{key} must be an integer")
    return value
