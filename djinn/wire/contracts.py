"""The transport and serializer contracts: how frames move between two ends, and how tensors
become bytes and back. Plugins implement them; the client, the server and the cluster router
call them. A plugin offers a factory for its slot (``transport``, ``serializer``) in
``djinn_register_strategies``. Required methods are abstract; optional ones default to doing
nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # torch stays out of the CLI's start-up path
    import torch


Buffer = bytes | bytearray | memoryview


class Connection(ABC):
    """One bidirectional stream of whole frames. Used from one event loop."""

    #: a printable name of the other end
    peer: str = "?"
    #: the largest frame ``recv`` accepts; its owner may change it (the server keeps it small until auth)
    max_frame_bytes: int = 1 << 62

    @abstractmethod
    async def send(self, parts: Sequence[Buffer]) -> None:
        """Send one frame made of ``parts`` (concatenated on the wire, not in memory)."""

    @abstractmethod
    async def recv(self) -> memoryview:
        """Receive one whole frame into a buffer of its own (no per-frame payload copies). Raises
        ``ConnectionClosed`` when the peer goes away (also mid-frame) and ``FrameTooLarge`` when the
        frame announces more than the connection's limit."""

    @abstractmethod
    async def close(self) -> None:
        """Close; pending and later ``recv`` calls raise ``ConnectionClosed``."""


class Listener(ABC):
    """A bound address accepting connections."""

    #: the bound address as a URL (with the real port when port 0 was asked for)
    url: str = ""

    @abstractmethod
    async def close(self) -> None:
        """Stop accepting; connections already open stay open."""


ConnectionHandler = Callable[[Connection], Awaitable[None]]


class Transport(ABC):
    """Moves frames for one URL scheme (``tcp``, ``inproc``, ``ucx``, ...)."""

    scheme: ClassVar[str]
    #: a listener may be reached from other machines: the server then binds a non-loopback address
    #: only with a token (an in-process transport never is reachable)
    reachable_remotely: ClassVar[bool] = True

    def default_url(self, host: str, port: int) -> str:
        """The URL the server listens on when it is given only ``[server] host`` and ``port``."""
        return f"{self.scheme}://{host}:{port}"

    @abstractmethod
    async def listen(self, url: str, handler: ConnectionHandler, *, max_frame_bytes: int) -> Listener:
        """Bind ``url``; run ``handler(conn)`` as a task for every accepted connection."""

    @abstractmethod
    async def connect(self, url: str, *, max_frame_bytes: int) -> Connection:
        """Open a connection to a listener at ``url``."""


class Serializer(ABC):
    """Turns tensors into bytes and back. Never pickle; never trust what arrives."""

    @abstractmethod
    def encode(self, tensors: Sequence[torch.Tensor]) -> list[Buffer]:
        """Encode tensors (any dtype the wire supports, any shape) as buffers to send."""

    @abstractmethod
    def decode(self, payload: memoryview) -> list[torch.Tensor]:
        """Decode tensors as read-only, zero-copy views of ``payload`` where possible. Raise
        ``FrameError`` for anything malformed; clone a tensor before writing to it."""
