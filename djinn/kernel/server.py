"""The server loop: accept connections on every selected transport, authenticate, serve frames.

One asyncio loop does all I/O and scheduling; model work runs on the kernel's model thread.
Each request is its own task, so a long generate never delays another client's frames, and a
client's disconnect cancels only its own requests and frees only its own sessions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import ipaddress
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import attrs

from djinn import __version__
from djinn.kernel.config import DjinnConfig
from djinn.kernel.errors import (
    AuthError,
    BreakpointError,
    ConfigError,
    ConnectionClosed,
    DjinnError,
    FrameError,
    PluginError,
    SessionError,
)
from djinn.kernel.plugins import DjinnPlugins
from djinn.kernel.runtime import Kernel, SamplingParams, Session
from djinn.kernel.strategies import Connection, Phase
from djinn.kernel.wire import (
    HEADER_SIZE,
    Frame,
    Op,
    WireLimits,
    decode_frame,
    encode_frame,
    error_frame,
    peek_header,
)

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
class Pause:
    """A forward pass paused at a breakpoint, waiting for its client."""

    session: Session
    cursor: Any
    layer: int
    step: int
    phase: str
    resumed: asyncio.Future
    edited: bool = False
    since: float = attrs.Factory(time.perf_counter)


@attrs.define(eq=False)
class ClientState:
    """What the server holds for one connection."""

    conn: Connection
    transport: str
    sessions: set[int] = attrs.Factory(set)
    tasks: set[asyncio.Task] = attrs.Factory(set)
    pauses: dict[int, Pause] = attrs.Factory(dict)  # by session id


class Server:
    """Serves a started ``Kernel`` over its selected transports."""

    def __init__(self, kernel: Kernel, *, token: str | None = None) -> None:
        self.kernel = kernel
        self.token = token
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
            if scheme != "inproc":
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
        runner = self.kernel.runner
        return {
            "server": f"djinn {__version__}",
            "model": self.kernel.config.model.name,
            "num_layers": runner.num_layers,
            "vocab_size": runner.vocab_size,
            "hidden_size": runner.hidden_size,
            "dtype": self.kernel.config.model.dtype,
            "has_tokenizer": self.kernel.model.tokenizer is not None,
            "plugins": list(self.kernel.plugins.selected_names()),
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
            return Frame(Op.RESULT, meta=self.kernel.vmu())
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
            phase = _enum(Phase, meta.get("phase"))
            expected = meta.get("expected_s")
            if expected is not None and _number(meta, "expected_s", None) < 0:
                raise SessionError("expected_s must be a number >= 0")
            expected = None if expected is None else float(expected)
            await self.kernel.signal_phase(session, phase, expected)
            return Frame(Op.OK) if meta.get("reply", True) else None
        if op is Op.GENERATE:
            return await self._generate(client, frame)
        if op in (Op.INSPECT, Op.EDIT, Op.RESUME):
            return await self._breakpoint_op(client, frame)
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
            tokenizer = self.kernel.model.tokenizer
            if tokenizer is None:
                raise SessionError("this model has no tokenizer; send token ids")
            input_ids = tokenizer(meta["text"])["input_ids"]
        else:
            raise SessionError("generate needs input ids (a tensor) or text")
        seed = None if meta.get("seed") is None else _int(meta, "seed", 0)
        if seed is not None and not -(1 << 63) <= seed < 1 << 64:
            raise SessionError("seed must be in [-2**63, 2**64)")
        params = SamplingParams(
            max_new_tokens=_int(meta, "max_new_tokens", 16),
            temperature=_number(meta, "temperature", 0.0),
            top_k=_int(meta, "top_k", 0),
            seed=seed,
        )
        breakpoints = meta.get("breakpoints") or []
        if not isinstance(breakpoints, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) for b in breakpoints
        ):
            raise SessionError("breakpoints must be a list of layer indices")

        async def on_break(sess: Session, cursor: Any, layer: int, step: int, phase: str) -> None:
            await self._pause(client, frame.request_id, sess, cursor, layer, step, phase)

        started = time.perf_counter()
        result = await self.kernel.generate(session, input_ids, params, breakpoints, on_break)
        reply_meta = {
            "queue_s": result.queue_s, "restore_s": result.restore_s, "prefill_s": result.prefill_s,
            "decode_s": result.decode_s, "first_token_s": result.first_token_s,
            "server_s": time.perf_counter() - started,
        }
        tokenizer = self.kernel.model.tokenizer
        if tokenizer is not None:
            reply_meta["text"] = tokenizer.decode(result.tokens)
        return Frame(Op.RESULT, meta=reply_meta, tensors=(torch.tensor(result.tokens, dtype=torch.int64),))

    # ------------------------------------------------------------------ breakpoints

    async def _pause(
        self, client: ClientState, request_id: int, session: Session, cursor: Any, layer: int, step: int, phase: str
    ) -> None:
        loop = asyncio.get_running_loop()
        pause = Pause(session, cursor, layer, step, phase, loop.create_future())
        client.pauses[session.info.id] = pause
        hidden = cursor.hidden
        try:
            await self._send(client, Frame(
                Op.BREAK, request_id=request_id, session_id=session.info.id,
                meta={"layer": layer, "step": step, "phase": phase, "shape": list(hidden.shape),
                      "dtype": str(hidden.dtype).removeprefix("torch.")},
            ))
            timeout = self.kernel.config.server.pause_timeout_s
            try:
                await asyncio.wait_for(asyncio.shield(pause.resumed), timeout)
            except TimeoutError:
                raise BreakpointError(f"breakpoint at layer {layer} abandoned for {timeout:.0f} s") from None
        finally:
            client.pauses.pop(session.info.id, None)
        self.kernel.plugins.notify(
            "djinn_breakpoint_resumed", session=session.info, layer=layer, edited=pause.edited,
            waited_s=time.perf_counter() - pause.since,
        )

    async def _breakpoint_op(self, client: ClientState, frame: Frame) -> Frame:
        pause = client.pauses.get(frame.session_id)
        if pause is None:
            raise BreakpointError(f"session {frame.session_id} is not paused at a breakpoint")
        if frame.op is Op.RESUME:
            if not pause.resumed.done():
                pause.resumed.set_result(None)
            return Frame(Op.OK)
        run = self.kernel.run_model
        if frame.op is Op.INSPECT:
            what = frame.meta.get("what", "stats")
            if what == "stats":
                return Frame(Op.RESULT, meta=await run(_stats, pause.cursor.hidden))
            if what == "fetch":
                return Frame(Op.RESULT, tensors=(await run(_to_host, pause.cursor.hidden),))
            raise BreakpointError(f"inspect what={what!r}; one of: stats, fetch")
        edit = frame.meta.get("op")
        hidden = pause.cursor.hidden
        if edit == "scale":
            factor = _number(frame.meta, "factor", None)
            await run(_edit_in_place, hidden.mul_, factor)
        elif edit in ("set", "add"):
            if len(frame.tensors) != 1:
                raise BreakpointError(f"{edit} needs one tensor")
            value = frame.tensors[0]
            want = tuple(hidden.shape) if edit == "set" else (hidden.shape[-1],)
            if tuple(value.shape) != want and not (edit == "add" and tuple(value.shape) == tuple(hidden.shape)):
                raise BreakpointError(f"{edit}: shape {tuple(value.shape)} does not match {want}")
            if not value.dtype.is_floating_point:
                raise BreakpointError(f"{edit}: dtype {value.dtype} is not a floating-point type")
            moved = value.to(device=hidden.device, dtype=hidden.dtype)
            await run(_edit_in_place, hidden.copy_ if edit == "set" else hidden.add_, moved)
        else:
            raise BreakpointError(f"edit op={edit!r}; one of: set, scale, add")
        pause.edited = True
        return Frame(Op.OK)


def _stats(hidden: Any) -> dict[str, Any]:
    h = hidden.float()
    return {
        "shape": list(hidden.shape), "dtype": str(hidden.dtype).removeprefix("torch."),
        "mean": h.mean().item(), "std": h.std().item() if h.numel() > 1 else 0.0,
        "min": h.min().item(), "max": h.max().item(), "norm": h.norm().item(),
    }


def _edit_in_place(method: Callable[[Any], Any], value: Any) -> None:
    import torch

    # the activation is an inference tensor: in-place writes are allowed only in inference mode
    with torch.inference_mode():
        method(value)


def _to_host(hidden: Any) -> Any:
    return hidden.detach().to("cpu", copy=True)


def _enum(cls: Any, value: Any) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise SessionError(f"{value!r} is not one of {', '.join(m.value for m in cls)}") from None


def _number(meta: dict[str, Any], key: str, default: Any) -> float:
    value = meta.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SessionError(f"{key} must be a number")
    try:
        return float(value)  # JSON integers have no bound; floats do
    except OverflowError:
        raise SessionError(f"{key} is out of range") from None


def _int(meta: dict[str, Any], key: str, default: int) -> int:
    value = meta.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SessionError(f"{key} must be an integer")
    return value


# ---------------------------------------------------------------------- metrics endpoint


class MetricsEndpoint:
    """``/metrics`` (Prometheus text) and ``/metrics/vmu`` (JSON) on their own thread."""

    def __init__(self, kernel: Kernel, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, generate_latest

        self.kernel, self.loop = kernel, loop
        self.registry = CollectorRegistry()
        self.registry.register(_VmuCollector(self.snapshot))
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/metrics":
                    body, kind = generate_latest(endpoint.registry), "text/plain; version=0.0.4"
                elif self.path == "/metrics/vmu":
                    body, kind = json.dumps(endpoint.snapshot()).encode(), "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="djinn-metrics", daemon=True)

    def snapshot(self) -> dict[str, Any]:
        """The kernel's view, read on the event loop so hooks run where they always do."""
        async def read() -> dict[str, Any]:
            return self.kernel.vmu()

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(timeout=10)

    def start(self) -> None:
        """Serve in the background."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


class _VmuCollector:
    """Prometheus series from the kernel's snapshot."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        vmu = self.snapshot()
        device = GaugeMetricFamily("djinn_device_bytes", "Device bytes by category", labels=["category"])
        for category, n in vmu["memory"]["device"].items():
            device.add_metric([category], n)
        yield device
        yield GaugeMetricFamily("djinn_device_budget_bytes", "Device byte budget", value=vmu["memory"]["budget_bytes"])
        tiers = GaugeMetricFamily("djinn_tier_bytes", "Bytes held in host tiers", labels=["tier"])
        for tier, n in vmu["memory"]["tiers"].items():
            tiers.add_metric([tier], n)
        yield tiers
        phases = GaugeMetricFamily("djinn_sessions", "Open sessions by phase", labels=["phase"])
        for phase, n in vmu["sessions"]["by_phase"].items():
            phases.add_metric([phase], n)
        yield phases
        yield GaugeMetricFamily("djinn_admission_queue", "Requests waiting for memory", value=vmu["admission_queue"])
        for name, value in vmu["counters"].items():
            yield CounterMetricFamily(f"djinn_{name}", f"Total {name.replace('_', ' ')}", value=value)
        engine = vmu["engine"]
        yield CounterMetricFamily("djinn_engine_steps", "Batch engine steps", value=engine["steps"])
        yield GaugeMetricFamily("djinn_engine_mean_batch", "Mean decode rows per engine step",
                                value=engine["mean_batch"])
        busy = CounterMetricFamily("djinn_engine_busy_seconds", "Batch engine time by part of a step", labels=["part"])
        busy.add_metric(["prefill"], engine["prefill_seconds"])
        busy.add_metric(["decode"], engine["decode_seconds"])
        yield busy
        yield CounterMetricFamily("djinn_engine_prefill_tokens", "Prompt tokens prefilled by the batch engine",
                                  value=engine["prefill_tokens"])
        pool = GaugeMetricFamily("djinn_kv_pool_blocks", "KV pool blocks", labels=["state"])
        pool.add_metric(["used"], engine["kv_pool_blocks_used"])
        pool.add_metric(["total"], engine["kv_pool_blocks"])
        yield pool


# ---------------------------------------------------------------------- running


async def serve(
    config: DjinnConfig, plugins: DjinnPlugins, *, token: str | None, announce: Callable[[str], None],
    stop: asyncio.Event | None = None, kernel: Kernel | None = None,
    ready: Callable[[list[str], int | None], None] | None = None,
) -> None:
    """Start a kernel (unless given one started), serve until ``stop`` is set, then shut down.

    ``ready(urls, metrics_port)`` is called once everything listens.
    """
    kernel = kernel or _started_kernel(config, plugins)
    server = Server(kernel, token=token)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    metrics = None
    try:
        urls = [f"tcp://{config.server.host}:{config.server.port}"] if "tcp" in kernel.transports else []
        urls += [f"{scheme}://{config.server.host}:{config.server.port}" for scheme in kernel.transports
                 if scheme not in ("tcp", "inproc")]
        if "inproc" in kernel.transports:
            urls.append(f"inproc://djinn-{uuid.uuid4().hex[:8]}")
        bound = await server.start(urls)
        if config.server.metrics_port:
            metrics = MetricsEndpoint(kernel, loop, config.server.host, config.server.metrics_port)
            metrics.start()
            announce(f"metrics: http://{config.server.host}:{metrics.port}/metrics (and /metrics/vmu)")
        announce(f"djinn {__version__} serving {config.model.name} on {', '.join(bound)}")
        announce("plugins: " + ", ".join(plugins.selected_names()))
        if ready is not None:
            ready(bound, metrics.port if metrics is not None else None)
        await stop.wait()
    finally:
        await server.close()
        if metrics is not None:
            metrics.stop()
        kernel.stop()


def _started_kernel(config: DjinnConfig, plugins: DjinnPlugins) -> Kernel:
    kernel = Kernel(config, plugins)
    kernel.start()
    return kernel


def serve_forever(config: DjinnConfig, plugins: DjinnPlugins, *, token: str | None, announce: Callable[[str], None]) -> None:
    """``djinn run``: serve until SIGINT or SIGTERM, then shut down gracefully."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, plugins, token=token, announce=announce, stop=stop)
        announce("djinn stopped")

    asyncio.run(main())


class BackgroundServer:
    """A kernel and server on their own event-loop thread: for tests, the demo and benchmarks.

        with BackgroundServer(config, plugins) as server:
            client = connect(server.url("tcp"))
    """

    def __init__(self, config: DjinnConfig, plugins: DjinnPlugins, *, token: str | None = None,
                 kernel: Kernel | None = None) -> None:
        self.config, self.plugins, self.token = config, plugins, token
        self.kernel = kernel
        self.urls: list[str] = []
        self.metrics_port: int | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="djinn-server", daemon=True)

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(urls: list[str], metrics_port: int | None) -> None:
                self.urls, self.metrics_port = urls, metrics_port
                self._ready.set()

            await serve(self.config, self.plugins, token=self.token, announce=lambda _line: None,
                        stop=self._stop, kernel=self.kernel, ready=ready)

        try:
            asyncio.run(run())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def start(self) -> BackgroundServer:
        """Start and wait until it listens (re-raising a start-up error here)."""
        if self.kernel is None:
            self.kernel = _started_kernel(self.config, self.plugins)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def url(self, scheme: str) -> str:
        """The bound URL of one transport."""
        for url in self.urls:
            if url.startswith(scheme + "://"):
                return url
        raise KeyError(f"not listening on {scheme}://; listening on {self.urls}")

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop thread and return its result (for inspecting state)."""
        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout=30)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Run ``coro`` as a task on the server's loop (a probe, say); cancel the returned future to stop it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def stop(self) -> None:
        """Shut down gracefully and wait for the thread."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
