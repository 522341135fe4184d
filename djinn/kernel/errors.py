"""Errors the kernel raises, and those of the engine and the server beside them (the wire's are in
``djinn.wire.errors``); each carries a message a user can act on."""

from __future__ import annotations


class DjinnError(Exception):
    """Base of every error Djinn raises on purpose."""

    #: wire error code sent to a client when this error ends a request
    code: str = "error"


class ConfigError(DjinnError):
    """A configuration file, key or value is wrong (the CLI exits 2, nothing is started)."""
    code = "config"


class PluginError(DjinnError):
    """A plugin is unknown, conflicts with another, failed to load, or raised in a hook."""
    code = "plugin"


class SessionError(DjinnError):
    """A request names an unknown session or one in a state that cannot serve it."""
    code = "session"


class AdmissionError(DjinnError):
    """Neither eviction nor a tier can make room for a request; nothing was lost."""
    code = "admission"


class TierFullError(DjinnError):
    """A memory tier has no free range large enough for an allocation."""
    code = "tier_full"


class ModelError(DjinnError):
    """A model spec cannot be loaded, or its family is not supported by a runner."""
    code = "model"


class BreakpointError(DjinnError):
    """A breakpoint request is invalid (unknown layer, no pause pending, bad edit)."""
    code = "breakpoint"
