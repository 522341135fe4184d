"""Errors of the wire: a malformed frame, a closed connection, a refused token. Each carries the
code an ERROR frame names it by (``djinn.wire.frames.raise_for_error``)."""

from __future__ import annotations

from djinn.kernel.errors import DjinnError


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
