"""Errors the kernel raises; each carries a message a user can act on."""

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


class FrameError(DjinnError):
    """A frame from the wire is malformed, truncated, oversized or of an unknown op."""
    code = "bad_frame"


class FrameTooLarge(FrameError):
    """A frame announces more bytes than the configured limit."""
    code = "frame_too_large"


class ConnectionClosed(DjinnError):
    """The peer closed the connection (possibly mid-frame)."""
    code = "closed"


class AuthError(DjinnError):
    """A client presented a missing or wrong token."""
    code = "auth"


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
