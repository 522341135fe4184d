"""Transport benchmark: small-frame round trips and large-frame throughput.

    python -m eval.bench_transport --out eval/results/transport_<host>.json

1. Round trip of 64-byte frames (echo), p50/p99 over inproc, tcp and ucx (when ``ucxx``
   imports), beside two baselines over loopback sockets: blocking calls on both sides (the
   floor) and asyncio's ``sock_*`` calls on both sides (the event loop's own cost). The tcp,
   ucx and baseline servers run in child processes, the inproc server on an event loop in a
   background thread: where each would run in use.
2. 64 MiB frames over tcp, one direction (the server receives each frame and acks it with an
   empty frame), beside a raw baseline: blocking sockets, the server ``recv_into`` a
   preallocated buffer. The figure of merit is tcp / raw (the goal is >= 0.8).

Both parts alternate between what they compare, in rounds, so a slow spell of the machine
hits all alike.

Writes JSON with the hardware, versions, configuration, every raw sample and a summary, then
prints a short table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from djinn.kernel.errors import PluginError
from djinn.wire.contracts import Connection, Transport
from djinn.plugins.transports import inproc, tcp, ucx
from djinn.plugins.transports._framing import LENGTH_PREFIX
from djinn.wire.errors import ConnectionClosed

MAX_FRAME_BYTES = 1 << 30


# --------------------------------------------------------------------------- servers


def _build(name: str) -> Transport:
    if name == "tcp":
        return tcp.TcpTransport(tcp.TcpSettings())
    if name == "inproc":
        return inproc.InprocTransport(inproc.InprocSettings())
    return ucx.UcxTransport(ucx.UcxSettings())


async def _echo(conn: Connection) -> None:
    try:
        while True:
            await conn.send([await conn.recv()])
    except ConnectionClosed:
        pass


async def _ack(conn: Connection) -> None:
    """Receive each frame whole, drop it, answer with an empty frame."""
    try:
        while True:
            await conn.recv()
            await conn.send([])
    except ConnectionClosed:
        pass


def _serve_forever(name: str, mode: str, url: str, ready: Any) -> None:
    """Child process: serve ``mode`` ("echo" or "ack") on ``url``; report the bound URL."""

    async def main() -> None:
        handler = _echo if mode == "echo" else _ack
        listener = await _build(name).listen(url, handler, max_frame_bytes=MAX_FRAME_BYTES)
        ready.send(listener.url)
        await asyncio.Event().wait()  # until the parent terminates this process

    asyncio.run(main())


def _raw_serve_forever(mode: str, frame_bytes: int, ready: Any) -> None:
    """Child process: the baseline server, blocking sockets into one preallocated buffer;
    ``mode`` "echo" sends each frame back, "ack" answers with an empty frame."""
    server = socket.create_server(("127.0.0.1", 0))
    ready.send(server.getsockname()[1])
    buffer = memoryview(np.empty(frame_bytes, dtype=np.uint8))
    prefix = memoryview(bytearray(LENGTH_PREFIX.size))
    while True:
        conn, _ = server.accept()
        _tune_raw(conn)
        with conn:
            while _recv_exactly(conn, prefix):
                (nbytes,) = LENGTH_PREFIX.unpack(prefix)
                if not _recv_exactly(conn, buffer[:nbytes]):
                    break
                if mode == "echo":
                    conn.sendall(bytes(prefix) + buffer[:nbytes])
                else:
                    conn.sendall(LENGTH_PREFIX.pack(0))


def _asyncio_serve_forever(frame_bytes: int, ready: Any) -> None:
    """Child process: the same echo written directly on asyncio's ``sock_*`` calls, with no
    transport in between: what the event loop costs by itself."""

    async def echo(conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        frame = memoryview(np.empty(LENGTH_PREFIX.size + frame_bytes, dtype=np.uint8))
        while await _async_recv_exactly(conn, frame[: LENGTH_PREFIX.size]):
            (nbytes,) = LENGTH_PREFIX.unpack(frame[: LENGTH_PREFIX.size])
            end = LENGTH_PREFIX.size + nbytes
            if not await _async_recv_exactly(conn, frame[LENGTH_PREFIX.size : end]):
                break
            await loop.sock_sendall(conn, frame[:end])
        conn.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = socket.create_server(("127.0.0.1", 0))
        server.setblocking(False)
        ready.send(server.getsockname()[1])
        tasks = set()
        while True:
            conn, _ = await loop.sock_accept(server)
            _tune_raw(conn)
            task = loop.create_task(echo(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    asyncio.run(main())


async def _async_recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """``_recv_exactly`` on a non-blocking socket through the running event loop."""
    loop = asyncio.get_running_loop()
    filled = 0
    while filled < len(view):
        n = await loop.sock_recv_into(sock, view[filled:])
        if n == 0:
            return False
        filled += n
    return True


def _tune_raw(sock: socket.socket) -> None:
    """The same socket options the tcp transport uses by default."""
    settings = tcp.TcpSettings()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.send_buffer_bytes)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, settings.recv_buffer_bytes)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from a blocking socket; False when the peer closed first."""
    filled = 0
    while filled < len(view):
        n = sock.recv_into(view[filled:])
        if n == 0:
            return False
        filled += n
    return True


class ChildServer:
    """A server in a child process (spawned, so it shares nothing with this one)."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        """Start ``target(*args, ready)`` and wait for what it reports through ``ready``."""
        context = multiprocessing.get_context("spawn")
        receiving, sending = context.Pipe(duplex=False)
        self.process = context.Process(target=target, args=(*args, sending), daemon=True)
        self.process.start()
        if not receiving.poll(60):
            self.stop()
            raise RuntimeError(f"the benchmark server {target.__name__} did not start")
        self.address = receiving.recv()

    def stop(self) -> None:
        """End the child process."""
        self.process.terminate()
        self.process.join(10)


class ThreadServer:
    """An inproc server on an event loop of its own, in a background thread."""

    def __init__(self, url: str) -> None:
        """Start the loop and listen on ``url`` from it."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        listen = _build("inproc").listen(url, _echo, max_frame_bytes=MAX_FRAME_BYTES)
        self.listener = asyncio.run_coroutine_threadsafe(listen, self.loop).result(30)
        self.address = self.listener.url

    def stop(self) -> None:
        """Close the listener and end the loop."""
        asyncio.run_coroutine_threadsafe(self.listener.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


# --------------------------------------------------------------------------- measurements


async def _echoes(conn: Connection, payload: np.ndarray, count: int) -> list[float]:
    """Seconds per echo of ``payload`` over a transport's connection."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await conn.send([payload])
        await conn.recv()
        samples.append(time.perf_counter() - start)
    return samples


def _raw_echoes(sock: socket.socket, frame: bytes, count: int) -> list[float]:
    """Seconds per echo of a length-prefixed ``frame`` over a blocking socket."""
    echoed = memoryview(bytearray(len(frame)))
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        sock.sendall(frame)
        if not _recv_exactly(sock, echoed):
            raise ConnectionError("the raw benchmark server went away")
        samples.append(time.perf_counter() - start)
    return samples


async def _asyncio_echoes(sock: socket.socket, frame: bytes, count: int) -> list[float]:
    """``_raw_echoes`` on a non-blocking socket through the running event loop."""
    loop = asyncio.get_running_loop()
    echoed = memoryview(bytearray(len(frame)))
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await loop.sock_sendall(sock, frame)
        if not await _async_recv_exactly(sock, echoed):
            raise ConnectionError("the asyncio benchmark server went away")
        samples.append(time.perf_counter() - start)
    return samples


def measure_latency(
    names: list[str], frame_bytes: int, warmup: int, n: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Echo round trips over each transport and two baselines on the same sockets: ``raw``
    (blocking calls on both sides, the floor) and ``asyncio`` (the event loop's ``sock_*``
    calls on both sides, no transport: what the loop costs by itself).

    Servers run where they would in use: tcp, ucx and the baselines in child processes, inproc
    on an event loop in a background thread. All take turns, ``n / rounds`` echoes at a time,
    so a slow spell of the machine hits all of them alike.
    """
    placements = {
        "raw": "child process, blocking sockets",
        "asyncio": "child process, asyncio sock_* calls",
    }
    samples: dict[str, list[float]] = {"raw": [], "asyncio": []}
    payload = np.full(frame_bytes, 7, dtype=np.uint8)
    raw_frame = LENGTH_PREFIX.pack(frame_bytes) + payload.tobytes()
    with contextlib.ExitStack() as cleanup:
        raw_server = ChildServer(_raw_serve_forever, "echo", frame_bytes)
        cleanup.callback(raw_server.stop)
        raw_sock = cleanup.enter_context(
            socket.create_connection(("127.0.0.1", raw_server.address))
        )
        _tune_raw(raw_sock)
        asyncio_server = ChildServer(_asyncio_serve_forever, frame_bytes)
        cleanup.callback(asyncio_server.stop)
        asyncio_sock = cleanup.enter_context(
            socket.create_connection(("127.0.0.1", asyncio_server.address))
        )
        _tune_raw(asyncio_sock)
        asyncio_sock.setblocking(False)
        # a client loop each, so one's background tasks (ucx progress) stay off the others
        runners: dict[str, asyncio.Runner] = {"asyncio": cleanup.enter_context(asyncio.Runner())}
        conns: dict[str, Connection] = {}
        for name in names:
            server: ChildServer | ThreadServer
            if name == "inproc":
                server = ThreadServer(f"inproc://bench-{os.getpid()}")
                placements[name] = "event loop in a background thread"
            else:
                server = ChildServer(_serve_forever, name, "echo", f"{name}://127.0.0.1:0")
                placements[name] = "child process"
            cleanup.callback(server.stop)
            runners[name] = cleanup.enter_context(asyncio.Runner())
            connect = _build(name).connect(server.address, max_frame_bytes=MAX_FRAME_BYTES)
            conns[name] = runners[name].run(connect)
            cleanup.callback(lambda r=runners[name], c=conns[name]: r.run(c.close()))
            samples[name] = []

        def echoes(name: str, count: int) -> list[float]:
            if name == "raw":
                return _raw_echoes(raw_sock, raw_frame, count)
            if name == "asyncio":
                return runners[name].run(_asyncio_echoes(asyncio_sock, raw_frame, count))
            return runners[name].run(_echoes(conns[name], payload, count))

        for name in samples:
            echoes(name, warmup)
        for _ in range(rounds):
            for name in samples:
                samples[name] += echoes(name, max(1, n // rounds))
    return {name: _latency_summary(placements[name], s) for name, s in samples.items()}


def _latency_summary(placement: str, samples: list[float]) -> dict[str, Any]:
    micros = np.array(samples) * 1e6
    return {
        "server": placement,
        "samples_us": [round(x, 2) for x in micros.tolist()],
        "p50_us": float(np.percentile(micros, 50)),
        "p99_us": float(np.percentile(micros, 99)),
        "mean_us": float(micros.mean()),
    }


async def _tcp_frames(conn: Connection, payload: np.ndarray, frames: int) -> list[float]:
    samples = []
    for _ in range(frames):
        start = time.perf_counter()
        await conn.send([payload])
        await conn.recv()  # the server's ack: the whole frame has arrived
        samples.append(payload.nbytes / (time.perf_counter() - start) / 1e9)
    return samples


def _raw_frames(sock: socket.socket, payload: np.ndarray, frames: int) -> list[float]:
    ack = memoryview(bytearray(LENGTH_PREFIX.size))
    samples = []
    for _ in range(frames):
        start = time.perf_counter()
        sock.sendall(LENGTH_PREFIX.pack(payload.nbytes))
        sock.sendall(payload)
        if not _recv_exactly(sock, ack):
            raise ConnectionError("the raw benchmark server went away")
        samples.append(payload.nbytes / (time.perf_counter() - start) / 1e9)
    return samples


def measure_throughput(frame_bytes: int, rounds: int, frames_per_round: int) -> dict[str, Any]:
    """GB/s of ``frame_bytes`` frames: tcp transport against raw blocking sockets, alternating."""
    payload = np.ones(frame_bytes, dtype=np.uint8)  # written once, so its pages exist
    raw: list[float] = []
    transport: list[float] = []
    with contextlib.ExitStack() as cleanup:
        raw_server = ChildServer(_raw_serve_forever, "ack", frame_bytes)
        cleanup.callback(raw_server.stop)
        tcp_server = ChildServer(_serve_forever, "tcp", "ack", "tcp://127.0.0.1:0")
        cleanup.callback(tcp_server.stop)
        raw_sock = cleanup.enter_context(
            socket.create_connection(("127.0.0.1", raw_server.address))
        )
        _tune_raw(raw_sock)
        runner = cleanup.enter_context(asyncio.Runner())
        conn = runner.run(
            _build("tcp").connect(tcp_server.address, max_frame_bytes=MAX_FRAME_BYTES)
        )
        cleanup.callback(lambda: runner.run(conn.close()))
        # one unrecorded frame each first: connection ramp-up and first-touch page faults
        _raw_frames(raw_sock, payload, 1)
        runner.run(_tcp_frames(conn, payload, 1))
        for _ in range(rounds):
            raw += _raw_frames(raw_sock, payload, frames_per_round)
            transport += runner.run(_tcp_frames(conn, payload, frames_per_round))
    raw_median, tcp_median = statistics.median(raw), statistics.median(transport)
    return {
        "frame_bytes": frame_bytes,
        "raw_blocking": {"samples_gbps": raw, "median_gbps": raw_median},
        "tcp": {"samples_gbps": transport, "median_gbps": tcp_median},
        "ratio_tcp_to_raw": tcp_median / raw_median,
    }


# --------------------------------------------------------------------------- report


def hardware() -> dict[str, Any]:
    """CPU model and cores, memory, and the GPU when torch sees one."""
    memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {
        "host": socket.gethostname(),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_bytes / (1 << 30), 1),
        "gpu": gpu,
        "platform": platform.platform(),
    }


def versions(ucx_available: bool) -> dict[str, Any]:
    """Python and library versions."""
    found: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch

        found["torch"] = torch.__version__
    except ImportError:
        found["torch"] = None
    found["ucxx"] = ucx.import_ucxx().__version__ if ucx_available else None
    return found


def main(argv: list[str] | None = None) -> None:
    """Run both measurements and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("eval/results") / f"transport_{socket.gethostname()}.json",
        help="where to write the JSON report",
    )
    parser.add_argument("--rtt-n", type=int, default=2000, help="round trips measured")
    parser.add_argument("--rtt-warmup", type=int, default=200, help="round trips not measured")
    parser.add_argument("--rtt-bytes", type=int, default=64, help="bytes per round-trip frame")
    parser.add_argument("--rtt-rounds", type=int, default=10, help="turns the transports take")
    parser.add_argument("--frame-mb", type=int, default=64, help="MiB per throughput frame")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of raw and tcp")
    parser.add_argument("--frames-per-round", type=int, default=4, help="frames per round")
    args = parser.parse_args(argv)

    try:
        ucx.import_ucxx()
        ucx_available, ucx_note = True, None
    except PluginError as e:
        ucx_available, ucx_note = False, str(e)
    names = ["inproc", "tcp"] + (["ucx"] if ucx_available else [])

    print(f"round trips over raw and asyncio sockets, {', '.join(names)} ...", file=sys.stderr)
    latency = measure_latency(names, args.rtt_bytes, args.rtt_warmup, args.rtt_n, args.rtt_rounds)
    print(f"{args.frame_mb} MiB frames over tcp and raw sockets ...", file=sys.stderr)
    throughput = measure_throughput(args.frame_mb << 20, args.rounds, args.frames_per_round)

    from eval.report import result_header

    config = {
        "rtt_frame_bytes": args.rtt_bytes,
        "rtt_n": args.rtt_n,
        "rtt_warmup": args.rtt_warmup,
        "rtt_rounds": args.rtt_rounds,
        "throughput_frame_bytes": args.frame_mb << 20,
        "throughput_rounds": args.rounds,
        "throughput_frames_per_round": args.frames_per_round,
        "tcp_settings": attrs.asdict(tcp.TcpSettings()),
        "ucx_settings": attrs.asdict(ucx.UcxSettings()) if ucx_available else None,
        "transports": names,
        "ucx_skipped_because": ucx_note,
    }
    note = (f"{args.rtt_bytes}-byte echo round trips per transport beside raw and asyncio sockets; "
            f"{args.frame_mb} MiB frames over tcp and raw sockets")
    report = {
        **result_header("transport", "eval.bench_transport", note, config, argv),
        "versions": versions(ucx_available),
        "latency": latency,
        "throughput": throughput,
        "summary": {
            **{f"{n}_rtt_p50_us": latency[n]["p50_us"] for n in latency},
            **{f"{n}_rtt_p99_us": latency[n]["p99_us"] for n in latency},
            "tcp_gbps": throughput["tcp"]["median_gbps"],
            "raw_gbps": throughput["raw_blocking"]["median_gbps"],
            "ratio_tcp_to_raw": throughput["ratio_tcp_to_raw"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))

    print(f"\nwrote {args.out}")
    echo = f"{args.rtt_bytes}-byte echo, n={args.rtt_n}"
    print(f"{'transport':<10} {'p50 us':>9} {'p99 us':>9}   ({echo})")
    for name in latency:
        print(f"{name:<10} {latency[name]['p50_us']:>9.1f} {latency[name]['p99_us']:>9.1f}")
    print(f"{f'{args.frame_mb} MiB frames':<22} {'GB/s (median)':>14}")
    print(f"{'raw blocking sockets':<22} {throughput['raw_blocking']['median_gbps']:>14.2f}")
    print(f"{'tcp transport':<22} {throughput['tcp']['median_gbps']:>14.2f}")
    print(f"{'tcp / raw':<22} {throughput['ratio_tcp_to_raw']:>14.2f}")


if __name__ == "__main__":
    main()
