"""The blocking client: the asyncio client driven from a private event-loop thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import torch

from djinn.client._async import (
    AsyncBreakpoint,
    AsyncClient,
    AsyncSession,
    AsyncTokenStream,
    AsyncTrace,
    Generation,
    Inputs,
    RequestTimeout,
)

T = TypeVar("T")


class _LoopThread:
    """An event loop on a daemon thread; ``run(coro)`` blocks the caller until it completes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="djinn-client", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop; past ``timeout`` seconds cancel it and raise ``RequestTimeout``."""
        if timeout is not None and timeout <= 0:
            coro.close()
            raise RequestTimeout("the request's time ran out")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RequestTimeout(f"no reply within {timeout:g} s") from None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class Client:
    """A blocking connection to a Djinn server; see ``connect``."""

    def __init__(self, url: str, token: str | None = None, **kwargs: Any) -> None:
        self._loop = _LoopThread()
        try:
            self._async = self._loop.run(AsyncClient.connect(url, token, **kwargs))
        except BaseException:
            self._loop.stop()
            raise
        self.info = self._async.info

    def model(self, name: str | None = None) -> RemoteModel:
        """The served model."""
        self._loop.run(self._async.model(name))
        return RemoteModel(self)

    def status(self) -> dict[str, Any]:
        """The server's memory and session view."""
        return self._loop.run(self._async.status())

    def close(self) -> None:
        """Close the connection (the server frees this connection's sessions)."""
        try:
            self._loop.run(self._async.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RemoteModel:
    """A handle on the served model."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.info = client.info

    @property
    def num_layers(self) -> int:
        """Decoder layers (valid breakpoint layers are 0 .. num_layers - 1)."""
        return int(self.info["num_layers"])

    def session(self) -> Session:
        """Open a session whose KV stays on the server."""
        inner = self.client._async

        async def open_session() -> AsyncSession:
            return await (await inner.model()).session()

        return Session(self.client, self.client._loop.run(open_session()))


class Session:
    """A blocking handle on one server-resident session."""

    def __init__(self, client: Client, inner: AsyncSession) -> None:
        self._client = client
        self._async = inner
        self.id = inner.id

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self._client._loop.run(coro, timeout)

    def generate(
        self, inputs: Inputs, max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int | None = None, stop: Sequence[str | Sequence[int]] | None = None,
        ignore_eos: bool = False, logprobs: int | None = None,
        breakpoints: Sequence[int | tuple[int, str]] = (),
        on_break: Callable[[Breakpoint], None] | None = None, timeout: float | None = None,
    ) -> Generation:
        """Append ``inputs`` and generate (see ``AsyncSession.generate``); ``on_break(hit)`` runs at
        each breakpoint, then it resumes. Past ``timeout`` seconds it raises ``RequestTimeout``."""
        if not breakpoints:
            return self._run(self._async.generate(
                inputs, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                ignore_eos=ignore_eos, logprobs=logprobs, timeout=timeout,
            ))
        trace = self.trace(inputs, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           stop=stop, ignore_eos=ignore_eos, logprobs=logprobs, breakpoints=breakpoints)
        if timeout is not None:
            trace.deadline = time.monotonic() + timeout
        for hit in trace:
            if on_break is not None:
                on_break(hit)
        return trace.result

    def stream(
        self, inputs: Inputs, max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int | None = None, stop: Sequence[str | Sequence[int]] | None = None,
        ignore_eos: bool = False, logprobs: int | None = None,
    ) -> TokenStream:
        """Iterate over token ids as the server picks them; ``.result`` once it ends."""
        return TokenStream(self, self._async.stream(
            inputs, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
            ignore_eos=ignore_eos, logprobs=logprobs,
        ))

    def trace(
        self, inputs: Inputs, max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int | None = None, stop: Sequence[str | Sequence[int]] | None = None,
        ignore_eos: bool = False, logprobs: int | None = None,
        breakpoints: Sequence[int | tuple[int, str]] = (),
    ) -> Trace:
        """Iterate over breakpoint hits; each resumes when the loop moves on. ``.result`` at the end."""
        return Trace(self, self._async.trace(
            inputs, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
            ignore_eos=ignore_eos, logprobs=logprobs, breakpoints=breakpoints,
        ))

    def signal_phase(self, phase: str, expected_s: float | None = None) -> None:
        """``IO_WAIT`` (with the expected wait) or ``COMPUTE``; returns at once."""
        self._run(self._async.signal_phase(phase, expected_s))

    def close(self) -> None:
        """Free the session on the server."""
        self._run(self._async.close())

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Trace:
    """Blocking iterator over one generate request's breakpoint hits."""

    def __init__(self, session: Session, inner: AsyncTrace) -> None:
        self._session = session
        self._async = inner
        #: ``time.monotonic()`` past which waiting for the next hit raises ``RequestTimeout``
        self.deadline: float | None = None

    def __iter__(self) -> Trace:
        return self

    def __next__(self) -> Breakpoint:
        remaining = None if self.deadline is None else self.deadline - time.monotonic()
        try:
            hit = self._session._run(self._async.__anext__(), remaining)
        except StopAsyncIteration:
            raise StopIteration from None
        return Breakpoint(self._session, hit)

    @property
    def result(self) -> Generation:
        """The generation, once iteration has ended."""
        return self._async.result


class TokenStream:
    """Blocking iterator over a streaming generate's token ids."""

    def __init__(self, session: Session, inner: AsyncTokenStream) -> None:
        self._session = session
        self._async = inner

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        try:
            return self._session._run(self._async.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Stop listening; the server finishes the request and its reply is dropped."""
        self._session._run(self._async.aclose())

    @property
    def result(self) -> Generation:
        """The generation, once iteration has ended."""
        return self._async.result


class Breakpoint:
    """A paused forward pass (blocking API); see ``AsyncBreakpoint``."""

    def __init__(self, session: Session, inner: AsyncBreakpoint) -> None:
        self._session = session
        self._async = inner
        self.layer, self.at, self.step, self.phase = inner.layer, inner.at, inner.step, inner.phase
        self.shape, self.dtype = inner.shape, inner.dtype

    def stats(self) -> dict[str, Any]:
        """Activation statistics computed on the server."""
        return self._session._run(self._async.stats())

    def fetch(self) -> torch.Tensor:
        """The activation as a CPU tensor."""
        return self._session._run(self._async.fetch())

    # edits are checked and kept here; the next stats, fetch or resume carries them
    def set(self, value: torch.Tensor) -> None:
        """Replace the activation."""
        self._async._queue("set", value)

    def scale(self, factor: float) -> None:
        """Scale the activation on the server."""
        self._async._queue("scale", factor)

    def add(self, vector: torch.Tensor) -> None:
        """Add a steering vector on the server."""
        self._async._queue("add", vector)

    def resume(self) -> None:
        """Continue the forward pass now (otherwise it continues when the iteration moves on)."""
        self._session._run(self._async.resume())


def connect(url: str, token: str | None = None, **kwargs: Any) -> Client:
    """Connect to a Djinn server (blocking API): ``tcp://host:port``, ``inproc://name``, ``ucx://...``.

    ``timeout`` (default 10 s) bounds the connect and the HELLO; None waits for ever.
    """
    return Client(url, token, **kwargs)
