"""The server loop: accept connections on every selected transport, authenticate, serve frames.

One asyncio loop does all I/O and scheduling; model work runs on the kernel's model thread.
Each request is its own task, so a long generate never delays another client's frames, and a
client's disconnect cancels only its own requests and frees only its own sessions.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs

from djinn import __version__
from djinn.kernel.errors import ConfigError, DjinnError, PluginError, SessionError
from djinn.engine.service import SamplingParams
from djinn.kernel.kernel import Session, settled
from djinn.kernel.strategies import Phase
from djinn.server.breakpoints import Breakpoints, Pause
from djinn.server.http import vmu
from djinn.server.validate import enum_value, integer, number
from djinn.wire.contracts import Connection
from djinn.wire.errors import AuthError, ConnectionClosed, FrameError
from djinn.wire.frames import (
    HEADER_SIZE,
    Frame,
    Op,
    WireLimits,
    decode_frame,
    encode_frame,
    error_frame,
    peek_header,
)

if TYPE_CHECKING:
    from djinn.server.launch import Runtime

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


@attrs.define(eq=False)
class ClientState:
    """What the server holds for one connection."""

    conn: Connection
    transport: str
    sessions: set[int] = attrs.Factory(set)
    tasks: set[asyncio.Task] = attrs.Factory(set)
    pauses: dict[int, Pause] = attrs.Factory(dict)  # by session id


class Server:
    """Serves a started runtime (kernel and model service) over the selected transports."""

    def __init__(self, runtime: Runtime, *, token: str | None = None) -> None:
        self.kernel = kernel = runtime.kernel
        self.model = runtime.model
        self.token = token
        self.breakpoints = Breakpoints(
            self._send, self.model.run_model, kernel.plugins, kernel.config.server.pause_timeout_s
        )
        self.limits = WireLimits(max_payload_bytes=kernel.config.server.max_frame_mb << 20)
        self.max_frame_bytes = self.limits.max_payload_bytes + self.limits.max_meta_bytes + 4096
        self.listeners: list[Any] = []
        self.clients: set[ClientState] = set()

    # ------------------------------------------------------------------ listening

    async def start(self, urls: list[str]) -> list[str]:
        """Listen on each URL with the transport of its scheme; return the bound URLs."""
        await self.kernel.run_background()
        bound = []
        for url in urls:
            scheme = urlsplit(url).scheme
            transport = self.kernel.transports.get(scheme)
            if transport is None:
                raise ConfigError(
                    f"no selected transport for {scheme}://; selected: {', '.join(self.kernel.transports)}"
                )
            if transport.reachable_remotely:
                host = urlsplit(url).hostname or ""
                if not is_loopback(host) and not self.token:
                    raise ConfigError(f"binding {host} (not loopback) requires a token: --token or $DJINN_TOKEN")
            listener = await transport.listen(
                url, lambda conn, s=scheme: self._serve_connection(conn, s), max_frame_bytes=self.max_frame_bytes
            )
            self.listeners.append(listener)
            bound.append(listener.url)
        return bound

    async def close(self) -> None:
        """Stop accepting, end every client's requests and sessions, stop background work."""
        for listener in self.listeners:
            await listener.close()
        for client in list(self.clients):
            await client.conn.close()
            await self._drop_client(client, "shutdown")
        await self.kernel.stop_background()

    # ------------------------------------------------------------------ connections

    async def _send(self, client: ClientState, frame: Frame) -> None:
        await client.conn.send(encode_frame(frame, self.kernel.serializer))

    async def _authenticate(self, client: ClientState) -> int:
        """Read the HELLO and check its token; its request id. Refusals are answered here."""
        timeout = self.kernel.config.server.hello_timeout_s
        # nobody may make the server hold a large frame before it has shown the token
        client.conn.max_frame_bytes = HEADER_SIZE + self.limits.max_meta_bytes
        try:
            buf = await asyncio.wait_for(client.conn.recv(), timeout)
        except TimeoutError:
            refusal = AuthError(f"no HELLO within {timeout:g} s of connecting")
            await self._send_error(client, 0, 0, refusal)
            raise refusal from None
        frame = decode_frame(buf, self.kernel.serializer, self.limits)
        given = frame.meta.get("token") or ""
        if frame.op is not Op.HELLO:
            refusal = AuthError("the first frame must be HELLO")
        elif self.token is not None and not (
            isinstance(given, str) and hmac.compare_digest(given.encode(), self.token.encode())
        ):
            refusal = AuthError("wrong or missing token")
        else:
            refusal = None
        if refusal is not None:
            await self._send_error(client, frame.request_id, 0, refusal)
            raise refusal
        client.conn.max_frame_bytes = self.max_frame_bytes
        return frame.request_id

    def welcome(self) -> dict[str, Any]:
        """What a client learns on connecting: the model and the server."""
        runner = self.model.runner
        return {
            "server": f"djinn {__version__}",
            "model": self.kernel.config.model.name,
            "num_layers": runner.num_layers,
            "vocab_size": runner.vocab_size,
            "hidden_size": runner.hidden_size,
            "dtype": self.kernel.config.model.dtype,
            "has_tokenizer": self.model.loaded.tokenizer is not None,
            "plugins": list(self.kernel.plugins.selection.names()),
        }

    async def _serve_connection(self, conn: Connection, transport: str) -> None:
        client = ClientState(conn=conn, transport=transport)
        reason = "closed"
        try:
            try:
                hello_id = await self._authenticate(client)
            except AuthError:
                return
            except DjinnError as exc:
                await self._send_error(client, 0, 0, exc)
                return
            try:
                self.kernel.plugins.notify("djinn_connection_opened", peer=conn.peer, transport=transport)
            except PluginError as exc:  # the HELLO fails, naming the plugin; everyone else is served on
                log.error("connection from %s refused: %s", conn.peer, exc)
                await self._send_error(client, hello_id, 0, exc)
                return
            self.clients.add(client)
            await self._send(client, Frame(Op.WELCOME, request_id=hello_id, meta=self.welcome()))
            in_flight = self.kernel.config.server.max_requests_per_connection
            while True:
                while len(client.tasks) >= in_flight:  # back-pressure: its frames wait in the socket
                    await asyncio.wait(set(client.tasks), return_when=asyncio.FIRST_COMPLETED)
                buf = await conn.recv()
                try:
                    frame = decode_frame(buf, self.kernel.serializer, self.limits)
                except FrameError as exc:
                    request_id, session_id = self._ids_of(buf)
                    await self._send_error(client, request_id, session_id, exc)
                    continue
                task = asyncio.create_task(self._serve_request(client, frame))
                client.tasks.add(task)
                task.add_done_callback(client.tasks.discard)
        except ConnectionClosed:
            reason = "disconnected"
        except FrameError as exc:  # too large: the stream is out of sync, so the connection ends
            reason = f"bad frame: {exc}"
            await self._send_error(client, 0, 0, exc)
        except Exception:
            log.exception("connection from %s failed", conn.peer)
            reason = "error"
        finally:
            await self._drop_client(client, reason)
            await conn.close()

    @staticmethod
    def _ids_of(buf: memoryview) -> tuple[int, int]:
        try:
            _op, session_id, request_id = peek_header(buf)
            return request_id, session_id
        except FrameError:
            return 0, 0

    async def _send_error(self, client: ClientState, request_id: int, session_id: int, exc: BaseException) -> None:
        try:
            await self._send(client, error_frame(request_id, session_id, exc))
        except (ConnectionClosed, OSError):
            pass

    async def _drop_client(self, client: ClientState, reason: str) -> None:
        if client not in self.clients and not client.sessions:
            return
        self.clients.discard(client)
        for task in list(client.tasks):
            task.cancel()
        await asyncio.gather(*client.tasks, return_exceptions=True)
        for session_id in list(client.sessions):
            session = self.kernel.sessions.get(session_id)
            if session is None:
                continue
            try:  # a failure here (a plugin's hook) must not keep the client's other sessions
                await self.kernel.close_session(session, reason="disconnected")
            except Exception:
                log.exception("closing session %d of %s failed", session_id, client.conn.peer)
        client.sessions.clear()
        try:
            self.kernel.plugins.notify(
                "djinn_connection_closed", peer=client.conn.peer, transport=client.transport, reason=reason
            )
        except DjinnError:
            log.exception("a plugin failed in djinn_connection_closed")

    # ------------------------------------------------------------------ requests

    async def _serve_request(self, client: ClientState, frame: Frame) -> None:
        try:
            reply = await self._dispatch(client, frame)
            if reply is not None:
                await self._send(client, attrs.evolve(reply, request_id=frame.request_id, session_id=frame.session_id))
        except asyncio.CancelledError:
            raise
        except ConnectionClosed:
            pass
        except Exception as exc:
            if isinstance(exc, PluginError):
                log.error("request %s failed: %s", frame.op.name, exc)
            elif not isinstance(exc, DjinnError):
                log.exception("request %s failed", frame.op.name)
            try:
                self.kernel.plugins.notify("djinn_request_failed", op=frame.op.name, session_id=frame.session_id, error=exc)
            except DjinnError:
                log.exception("a plugin failed in djinn_request_failed")
            await self._send_error(client, frame.request_id, frame.session_id, exc)

    def _session(self, client: ClientState, frame: Frame) -> Session:
        if frame.session_id not in client.sessions:
            raise SessionError(f"no open session {frame.session_id} on this connection")
        return self.kernel.get(frame.session_id)

    async def _dispatch(self, client: ClientState, frame: Frame) -> Frame | None:
        op, meta = frame.op, frame.meta
        if op is Op.PING:
            return Frame(Op.OK)
        if op is Op.STATUS:
            return Frame(Op.RESULT, meta=vmu(self.kernel))
        if op is Op.OPEN_SESSION:
            session = self.kernel.open_session(owner=client)
            client.sessions.add(session.info.id)
            return Frame(Op.RESULT, meta={"session_id": session.info.id})
        if op is Op.CLOSE_SESSION:
            session = self._session(client, frame)
            client.sessions.discard(session.info.id)
            pause = client.pauses.get(session.info.id)
            if pause is not None and not pause.resumed.done():  # its pass ends here, never on freed KV
                pause.resumed.set_exception(
                    SessionError(f"session {session.info.id} was closed while paused at a breakpoint")
                )
            await self.kernel.close_session(session)
            return Frame(Op.OK)
        if op is Op.SIGNAL_PHASE:
            session = self._session(client, frame)
            phase = enum_value(Phase, meta.get("phase"))
            expected = meta.get("expected_s")
            if expected is not None and number(meta, "expected_s", None) < 0:
                raise SessionError("expected_s must be a number >= 0")
            expected = None if expected is None else float(expected)
            await self.kernel.signal_phase(session, phase, expected)
            return Frame(Op.OK) if meta.get("reply", True) else None
        if op is Op.GENERATE:
            return await self._generate(client, frame)
        if op in (Op.INSPECT, Op.EDIT, Op.RESUME):
            return await self.breakpoints.handle(client, frame)
        raise FrameError(f"op {op.name} is not a request")

    async def _generate(self, client: ClientState, frame: Frame) -> Frame:
        import torch

        session = self._session(client, frame)
        meta = frame.meta
        if frame.tensors:
            ids_tensor = frame.tensors[0]
            if ids_tensor.dim() != 1 or ids_tensor.dtype not in (torch.int64, torch.int32):
                raise SessionError("input ids must be a 1-D int64 tensor")
            input_ids = ids_tensor.tolist()
        elif isinstance(meta.get("text"), str):
            tokenizer = self.model.loaded.tokenizer
            if tokenizer is None:
                raise SessionError("this model has no tokenizer; send token ids")
            input_ids = tokenizer(meta["text"])["input_ids"]
        else:
            raise SessionError("generate needs input ids (a tensor) or text")
        params = sampling_params(meta)
        breakpoints = _break_points(meta.get("breakpoints") or [])

        async def on_break(sess: Session, cursor: Any, layer: int, step: int, phase: str, at: str) -> None:
            await self.breakpoints.pause(client, frame.request_id, sess, cursor, layer, step, phase, at)

        stream = meta.get("stream", False)
        if not isinstance(stream, bool):
            raise SessionError("stream must be true or false")
        on_token, sender = None, None
        if stream:
            picked: asyncio.Queue = asyncio.Queue()
            on_token = lambda token, logprob: picked.put_nowait((token, logprob))  # noqa: E731
            sender = asyncio.create_task(self._stream_tokens(client, frame, picked))
        started = time.perf_counter()
        try:
            result = await self.model.generate(session, input_ids, params, breakpoints, on_break, on_token=on_token)
        finally:
            if sender is not None:
                picked.put_nowait(None)
                await settled(sender)  # every TOKEN frame goes out before the RESULT
        reply_meta = {
            "queue_s": result.queue_s, "admission_s": result.admission_s, "restore_s": result.restore_s,
            "prefill_s": result.prefill_s,
            "decode_s": result.decode_s, "first_token_s": result.first_token_s,
            "server_s": time.perf_counter() - started, "finish_reason": result.finish_reason,
            "cached_tokens": result.cached_tokens,
        }
        if params.logprobs is not None:
            reply_meta["logprobs"] = [_logprob_meta(entry) for entry in result.logprobs]
        tokenizer = self.model.loaded.tokenizer
        if tokenizer is not None:
            reply_meta["text"] = tokenizer.decode(result.tokens)
        return Frame(Op.RESULT, meta=reply_meta, tensors=(torch.tensor(result.tokens, dtype=torch.int64),))

    async def _stream_tokens(self, client: ClientState, frame: Frame, picked: asyncio.Queue) -> None:
        """Send TOKEN frames for the picked tokens until None arrives; what piled up while a
        frame was being sent goes out together in the next one."""
        tokenizer = self.model.loaded.tokenizer
        done = False
        while not done:
            batch = [await picked.get()]
            while not picked.empty():
                batch.append(picked.get_nowait())
            if batch[-1] is None:
                done = True
                batch.pop()
            if not batch:
                continue
            meta: dict[str, Any] = {"tokens": [token for token, _ in batch]}
            if batch[0][1] is not None:
                meta["logprobs"] = [_logprob_meta(logprob) for _, logprob in batch]
            if tokenizer is not None:
                meta["texts"] = [tokenizer.decode([token]) for token, _ in batch]
            try:
                await self._send(client, Frame(Op.TOKEN, session_id=frame.session_id,
                                               request_id=frame.request_id, meta=meta))
            except (ConnectionClosed, OSError):
                return


def _logprob_meta(entry: tuple[float, list[tuple[int, float]]]) -> dict[str, Any]:
    logprob, top = entry
    return {"logprob": logprob, "top": [[token, value] for token, value in top]}


def sampling_params(meta: dict[str, Any]) -> SamplingParams:
    """A GENERATE frame's sampling and stopping arguments, each checked, as ``SamplingParams``."""
    seed = None if meta.get("seed") is None else integer(meta, "seed", 0)
    if seed is not None and not -(1 << 63) <= seed < 1 << 64:
        raise SessionError("seed must be in [-2**63, 2**64)")
    ignore_eos = meta.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise SessionError("ignore_eos must be true or false")
    stops = meta.get("stop") or []
    if not isinstance(stops, list):
        raise SessionError("stop must be a list of token-id lists or strings")
    stop_ids = [s for s in stops if isinstance(s, list)]
    stop_text = [s for s in stops if isinstance(s, str)]
    if len(stop_ids) + len(stop_text) != len(stops):
        raise SessionError("stop must be a list of token-id lists or strings")
    logprobs = None if meta.get("logprobs") is None else integer(meta, "logprobs", 0)
    return SamplingParams(
        max_new_tokens=integer(meta, "max_new_tokens", 16),
        temperature=number(meta, "temperature", 0.0),
        top_k=integer(meta, "top_k", 0),
        top_p=number(meta, "top_p", 1.0),
        seed=seed,
        ignore_eos=ignore_eos,
        stop=stop_ids,
        stop_text=stop_text,
        logprobs=logprobs,
    )


def _break_points(raw: Any) -> list[int | tuple[int, str]]:
    """A GENERATE's ``breakpoints``: layer indices, or ``{"layer": L, "at": site}`` objects."""
    if not isinstance(raw, list):
        raise SessionError("breakpoints must be a list")
    points: list[int | tuple[int, str]] = []
    for item in raw:
        if isinstance(item, dict) and set(item) <= {"layer", "at"}:
            layer, at = item.get("layer"), item.get("at", "output")
            if isinstance(layer, int) and not isinstance(layer, bool) and isinstance(at, str):
                points.append((layer, at))
                continue
        elif isinstance(item, int) and not isinstance(item, bool):
            points.append(item)
            continue
        raise SessionError('breakpoints must be layer indices or {"layer": index, "at": site} objects')
    return points
