"""What a user imports: ``connect(url)`` for the blocking API, ``connect_async(url)`` for asyncio.

    from djinn.client import connect
    with connect("tcp://127.0.0.1:7070") as client:
        with client.model().session() as session:
            out = session.generate([1, 2, 3], max_new_tokens=8)
            session.signal_phase("IO_WAIT", expected_s=15)   # KV leaves the GPU now
            ...
            session.signal_phase("COMPUTE")                  # and comes back before it is needed
            for hit in session.trace([4, 5], breakpoints=[1]):
                print(hit.layer, hit.stats())
                hit.scale(0.9)

Importing this package does not initialise CUDA.
"""

from djinn.client._async import (
    AsyncBreakpoint,
    AsyncClient,
    AsyncRemoteModel,
    AsyncSession,
    AsyncTokenStream,
    AsyncTrace,
    Generation,
    RequestTimeout,
    TokenLogprob,
    connect_async,
)
from djinn.client._sync import Breakpoint, Client, RemoteModel, Session, TokenStream, Trace, connect

__all__ = [
    "AsyncBreakpoint",
    "AsyncClient",
    "AsyncRemoteModel",
    "AsyncSession",
    "AsyncTokenStream",
    "AsyncTrace",
    "Breakpoint",
    "Client",
    "Generation",
    "RemoteModel",
    "RequestTimeout",
    "Session",
    "TokenLogprob",
    "TokenStream",
    "Trace",
    "connect",
    "connect_async",
]
