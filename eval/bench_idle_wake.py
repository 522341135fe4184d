"""What a round trip costs after the client has been idle: Djinn's PING beside a raw asyncio echo.

    python -m eval.bench_idle_wake --out eval/results/idle_wake_<host>.json

A resume follows a pause the user held, so it meets the machine after a quiet spell. Each round
sends one small frame after each of ``--gaps-ms`` of sleep, in turn, to two servers in child
processes over loopback TCP: an asyncio echo server (``asyncio.start_server``; the client a
blocking socket with ``TCP_NODELAY``): the floor of an event loop that wakes for a frame; and a
Djinn server (``--model``, default plugins) answering PING, to the synchronous client (its
requests run on the client's own event loop thread: two more threads to wake per round trip)
and then to the asyncio client on the calling thread's loop; and the echo server again, from an
asyncio client (``asyncio_echo_async``): asyncio on both ends. What grows with the gap for the
echo too is the machine's wake-up (threads and cores asleep), not the server's work. Writes
every sample and the medians per gap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import attrs

from djinn.client import Client, connect, connect_async
from djinn.config import DjinnConfig
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import BackgroundServer
from djinn.wire.frames import Op
from eval.report import result_header

FRAME = b"x" * 64


def _echo_server(ready: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(len(FRAME)):
            writer.write(data)
            await writer.drain()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.send(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _djinn_server(ready: Any, model: str) -> None:
    base = DjinnConfig()
    config = attrs.evolve(base, server=attrs.evolve(base.server, port=0, metrics_port=0),
                          model=attrs.evolve(base.model, name=model))
    server = BackgroundServer(config, get_plugin_manager(config)).start()
    ready.send(server.url("tcp"))
    while True:
        time.sleep(3600)


def _child(target: Any, *args: Any) -> tuple[multiprocessing.Process, Any]:
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=target, args=(child, *args), daemon=True)
    process.start()
    if not parent.poll(300):
        raise RuntimeError(f"{target.__name__} did not start")
    return process, parent.recv()


def echo_round_trip(sock: socket.socket) -> float:
    started = time.perf_counter()
    sock.sendall(FRAME)
    received = 0
    while received < len(FRAME):
        received += len(sock.recv(len(FRAME)))
    return time.perf_counter() - started


def ping_round_trip(client: Client) -> float:
    started = time.perf_counter()
    client._loop.run(client._async.request(Op.PING))
    return time.perf_counter() - started


async def _async_pings(url: str, gaps: list[float], rounds: int) -> dict[str, list[float]]:
    """PING round trips of the asyncio client after each gap, on this thread's event loop."""
    out: dict[str, list[float]] = {}
    async with connect_async(url) as client:
        for _ in range(20):
            await client.request(Op.PING)
        for _ in range(rounds):
            for gap in gaps:
                await asyncio.sleep(gap)
                started = time.perf_counter()
                await client.request(Op.PING)
                out.setdefault(f"{gap * 1e3:g}ms", []).append(time.perf_counter() - started)
    return out


async def _async_echoes(port: int, gaps: list[float], rounds: int) -> dict[str, list[float]]:
    """Echo round trips from an asyncio client after each gap, on this thread's event loop."""
    out: dict[str, list[float]] = {}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(rounds):
        for gap in gaps:
            await asyncio.sleep(gap)
            started = time.perf_counter()
            writer.write(FRAME)
            await writer.drain()
            await reader.readexactly(len(FRAME))
            out.setdefault(f"{gap * 1e3:g}ms", []).append(time.perf_counter() - started)
    writer.close()
    return out


def main(argv: list[str] | None = None) -> None:
    """Measure both servers at every gap, in alternating rounds; write one JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny-llama")
    parser.add_argument("--gaps-ms", default="0,1,5,20")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    gaps = [float(g) / 1e3 for g in args.gaps_ms.split(",")]
    echo_process, port = _child(_echo_server)
    djinn_process, url = _child(_djinn_server, args.model)
    samples: dict[str, dict[str, list[float]]] = {"asyncio_echo": {}, "djinn_ping": {}}
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with connect(url) as client:
            for _ in range(20):  # first uses out of the way
                echo_round_trip(sock), ping_round_trip(client)
            for _ in range(args.rounds):
                for gap in gaps:
                    key = f"{gap * 1e3:g}ms"
                    time.sleep(gap)
                    samples["asyncio_echo"].setdefault(key, []).append(echo_round_trip(sock))
                    time.sleep(gap)
                    samples["djinn_ping"].setdefault(key, []).append(ping_round_trip(client))
        sock.close()
        samples["djinn_ping_async"] = asyncio.run(_async_pings(url, gaps, args.rounds))
        samples["asyncio_echo_async"] = asyncio.run(_async_echoes(port, gaps, args.rounds))
    finally:
        echo_process.kill()
        djinn_process.kill()
    medians = {name: {gap: statistics.median(xs) * 1e3 for gap, xs in by_gap.items()} for name, by_gap in samples.items()}
    report = {
        **result_header("idle_wake", "eval.bench_idle_wake",
                        "loopback TCP; both servers in child processes; the client sleeps each gap before a frame",
                        dict(model=args.model, gaps_ms=args.gaps_ms, rounds=args.rounds, frame_bytes=len(FRAME)), argv),
        "median_ms": medians, "samples_s": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, by_gap in medians.items():
        print(f"{name:<19}" + "  ".join(f"{gap} {ms:.3f} ms" for gap, ms in by_gap.items()))


if __name__ == "__main__":
    main()
