"""Reliability and security of one server under hostile, careless and numerous clients.

    python -m eval.reliability.run --out eval/results/reliability_cpu.json

Each part runs a real server in this process over tcp loopback and ends by reading the kernel's
books (KV bytes, host-tier bytes and allocations, KV pool blocks, sessions) against their
values before the part:

- ``fuzz``: malformed frames (truncated, lying or oversized lengths, wrong dtypes or shapes,
  unknown ops, bad Arrow buffers, pickle payloads, bad meta) from one connection, a fresh one
  after each frame that must end it. Each must get an ERROR reply or a closed connection, never
  an answer and never an ``internal`` error, while a healthy client keeps getting the same
  greedy tokens. ``pickle.loads``, ``pickle.Unpickler`` and ``torch.load`` raise meanwhile.
- ``storm``: clients dropping abruptly (RST) mid-generate, paused at a breakpoint, and mid-swap
  (``IO_WAIT`` then ``COMPUTE`` sent right before the drop), many at once.
- ``burst``: ten times as many sessions as the GPU budget admits, at once: each is served or
  refused with an AdmissionError, none goes unanswered.
- ``soak``: sessions through create, generate, evict, restore, breakpoint and close; the process's
  RSS sampled throughout.

``tests/test_reliability.py`` runs the same functions at small sizes.
"""

from __future__ import annotations

import ast
import contextlib
import itertools
import json
import logging
import pickle
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import click
import torch
from tqdm import tqdm

from djinn.client import connect
from djinn.config import DjinnConfig
from djinn.kernel.errors import AdmissionError, DjinnError
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import BackgroundServer
from djinn.wire.errors import ConnectionClosed, FrameError
from djinn.wire.frames import HEADER_SIZE, MAGIC, Frame, Op, WireLimits, decode_frame, encode_frame, raise_for_error
from djinn.plugins.serializers.arrow import ArrowSerializer, ArrowSettings
from djinn.plugins.transports._framing import LENGTH_PREFIX, split_url
from eval.report import result_header

SERIALIZER = ArrowSerializer(ArrowSettings())
PROMPT = [5, 17, 300, 42, 9]
#: a session id no connection owns, several bytes of which survive any few byte flips
UNOWNED = 0xA5A5_A5A5_A5A5_A5A5
META_LEN_AT, PAYLOAD_LEN_AT = 24, 28
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
DJINN_ROOT = Path(__file__).resolve().parents[2] / "djinn"


# --------------------------------------------------------------------------- servers


def server_config(model: str = "random:tiny-llama", *, budget_gb: float = 0.0, tier_gb: float = 0.0625,
                  admission_queue: int = 256, settings: dict | None = None) -> DjinnConfig:
    """Defaults with free ports, a fast tick, a small host tier and the given GPU budget. The
    semantic scheduler evicts at every IO_WAIT (no write-back), so every KV move path runs."""
    base = DjinnConfig()
    return attrs.evolve(
        base,
        server=attrs.evolve(base.server, port=0, metrics_port=0, tick_s=0.01),
        model=attrs.evolve(base.model, name=model),
        memory=attrs.evolve(base.memory, gpu_memory_budget_gb=budget_gb, admission_queue=admission_queue),
        settings={"pinned_host": {"capacity_gb": tier_gb}, "semantic": {"write_back": False}, **(settings or {})},
    )


def start_server(config: DjinnConfig, names: list[str], **extra_plugins: Any) -> BackgroundServer:
    """A started server with the named plugins (plus hook-only plugin objects)."""
    plugins = get_plugin_manager(config, names + list(extra_plugins), extra_plugins=extra_plugins)
    return BackgroundServer(config, plugins).start()


def kv_sizes(model: str, tokens: int) -> tuple[int, int]:
    """``(weight bytes, KV bytes of one session of tokens)`` for ``model`` as a server holds them."""
    from djinn.engine.models import load_model
    from djinn.engine.runner import ModelRunner

    runner = ModelRunner(load_model(model))
    return runner.device_weight_bytes(), runner.kv_bytes(tokens)


def kv_budget_gb(model: str, sessions: int, tokens: int) -> float:
    """A GPU budget holding the model's weights and ``sessions`` sessions of ``tokens`` tokens of KV,
    plus, on CUDA, the workspace the kernel sets aside there before sizing its KV pool."""
    weights, kv = kv_sizes(model, tokens)
    workspace = DjinnConfig().memory.workspace_gb * 2**30 if torch.cuda.is_available() else 0
    return (weights + sessions * kv + workspace) / 2**30


def books(server: BackgroundServer) -> dict[str, int]:
    """What the kernel holds now: KV and tier bytes, tier allocations, pool blocks, sessions, waiters."""
    def read() -> dict[str, int]:
        kernel = server.kernel
        snapshot = kernel.memory.snapshot()
        tiers = [tier.stats() for tier in kernel.tiers.values()]
        return {
            "kv_bytes": snapshot["device"]["kv"],
            "tier_bytes": sum(snapshot["tiers"].values()),
            "tier_used_bytes": sum(t.used_bytes for t in tiers),
            "tier_allocations": sum(t.allocations for t in tiers),
            "pool_used_blocks": server.model.runner.pool.used_blocks,
            "sessions": len(kernel.sessions),
            "admission_waiting": kernel._waiting,
        }

    return server.call(read)


def idle_books(server: BackgroundServer, timeout: float = 30.0) -> dict[str, int]:
    """``books`` once no session is left (sessions of clients that just left are freed in the background)."""
    deadline = time.monotonic() + timeout
    while (now := books(server))["sessions"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return now


def leaks(server: BackgroundServer, baseline: dict[str, int], timeout: float = 30.0) -> dict[str, int]:
    """Wait until the books are back to ``baseline`` (or ``timeout``); what is still held beyond it,
    with ``leaked_bytes`` summing the byte counts."""
    deadline = time.monotonic() + timeout
    while True:
        now = books(server)
        extra = {key: now[key] - baseline[key] for key in baseline}
        if not any(extra.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    extra["leaked_bytes"] = extra["kv_bytes"] + extra["tier_bytes"] + extra["tier_used_bytes"]
    return extra


# --------------------------------------------------------------------------- a bare client


def frame_bytes(frame: Frame) -> bytes:
    """One frame as the bytes that follow its length prefix."""
    return b"".join(encode_frame(frame, SERIALIZER))


class RawClient:
    """A bare tcp client that sends whatever bytes it is given: hostile and abrupt clients."""

    def __init__(self, url: str, token: str = "", *, hello: bool = True, timeout: float = 60.0) -> None:
        """Connect, and say HELLO with ``token`` unless ``hello`` is false."""
        host, port = split_url(url, "tcp")
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ids = itertools.count(1)
        if hello:
            raise_for_error(self.request(Frame(Op.HELLO, meta={"token": token})))

    def send_bytes(self, data: bytes, announced: int | None = None) -> None:
        """Send ``data`` behind a length prefix announcing ``announced`` bytes (its length by default)."""
        self.sock.sendall(LENGTH_PREFIX.pack(len(data) if announced is None else announced) + data)

    def send(self, frame: Frame) -> int:
        """Send a frame (with a fresh request id unless it has one); its request id."""
        request_id = frame.request_id or next(self._ids)
        self.send_bytes(frame_bytes(attrs.evolve(frame, request_id=request_id)))
        return request_id

    def recv(self) -> Frame | None:
        """The next frame, or None once the server has closed the connection."""
        prefix = self._read(LENGTH_PREFIX.size)
        body = None if prefix is None else self._read(LENGTH_PREFIX.unpack(prefix)[0])
        return None if body is None else decode_frame(memoryview(body), SERIALIZER)

    def _read(self, nbytes: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < nbytes:
            try:
                chunk = self.sock.recv(min(nbytes - len(buf), 1 << 20))
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def request(self, frame: Frame) -> Frame:
        """Send a frame and return the next frame that arrives."""
        self.send(frame)
        reply = self.recv()
        if reply is None:
            raise ConnectionClosed("the server closed the connection")
        return reply

    def open_session(self) -> int:
        """Open a session; its id."""
        reply = self.request(Frame(Op.OPEN_SESSION))
        raise_for_error(reply)
        return int(reply.meta["session_id"])

    def generate(self, session_id: int, ids: list[int], max_new_tokens: int, **meta: Any) -> int:
        """Send a GENERATE request without waiting; its request id."""
        return self.send(Frame(Op.GENERATE, session_id, meta={"max_new_tokens": max_new_tokens, **meta},
                               tensors=(torch.tensor(ids, dtype=torch.int64),)))

    def abort(self) -> None:
        """Drop the connection abruptly: a TCP reset, with no goodbye."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        """Close politely."""
        self.sock.close()


# --------------------------------------------------------------------------- no unpickling


def pickle_exploits(path: Path) -> list[bytes]:
    """Pickles, written by hand in protocols 0 and 2, that create ``path`` when unpickled."""
    name = str(path).encode()
    return [
        b"c__builtin__\nopen\n(V" + name + b"\nVw\ntR.",
        b"\x80\x02cbuiltins\nopen\nq\x00X" + struct.pack("<I", len(name)) + name
        + b"X\x01\x00\x00\x00w\x86q\x01Rq\x02.",
    ]


class _Refused(RuntimeError):
    pass


#: torch's compiler, whose calls pass: it unpickles its own compile workers' results and caches
TORCH_COMPILER_MODULES = ("torch._inductor", "torch._dynamo")


@contextlib.contextmanager
def no_unpickling() -> Iterator[Counter]:
    """While inside, ``pickle.load(s)``, ``pickle.Unpickler`` and ``torch.load`` raise; the counter
    yielded counts the calls. Calls made directly by torch's compiler (``TORCH_COMPILER_MODULES``)
    pass: on CUDA it may compile a kernel while frames are fuzzed."""
    calls: Counter = Counter()

    def refuse(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            if sys._getframe(1).f_globals.get("__name__", "").startswith(TORCH_COMPILER_MODULES):
                return real(*args, **kwargs)
            calls[name] += 1
            raise _Refused(f"{name} called while frames are fuzzed")
        return refused

    patched = [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (pickle, "_loads"),
               (pickle, "_Unpickler"), (torch, "load")]
    saved = [(module, attr, getattr(module, attr)) for module, attr in patched]
    try:
        for module, attr, real in saved:
            setattr(module, attr, refuse(f"{module.__name__}.{attr}", real))
        yield calls
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def unpickling_code_paths(root: Path = DJINN_ROOT) -> list[str]:
    """Every place under ``root`` that imports a module able to unpickle or calls eval/exec/torch.load."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(root.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
                found += [f"{where} imports {n}" for n in names & FORBIDDEN_MODULES]
            elif isinstance(node, ast.ImportFrom):
                module = (node.module or "").split(".")[0]
                if module in FORBIDDEN_MODULES or (module == "torch" and any(a.name == "load" for a in node.names)):
                    found.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                    found.append(f"{where} calls {func.id}")
                elif (isinstance(func, ast.Attribute) and func.attr == "load"
                      and isinstance(func.value, ast.Name) and func.value.id == "torch"):
                    found.append(f"{where} calls torch.load")
    return found


# --------------------------------------------------------------------------- malformed frames

#: ops a server answers without an open session; a mutated frame must not turn into one
_HARMLESS = {Op.PING, Op.STATUS, Op.OPEN_SESSION}
_REPLY_OPS = [Op.HELLO, Op.WELCOME, Op.ERROR, Op.OK, Op.RESULT, Op.BREAK]
_UNKNOWN_OPS = sorted(set(range(256)) - {int(op) for op in Op})
_BAD_META = [
    b"[]", b"null", b'"text"', b"42", b"{", b'{"a": NaN}', b'{"a": -Infinity}', b"\xff\xfe{}",
    b'{"a": 1,}', b'{"a"' + b": [" * 40 + b"]" * 40 + b"}", b'{"a":' * 20 + b"1" + b"}" * 20,
    b" " * (70 * 1024) + b"{}",
]
_FRAME_KINDS = ["random-bytes", "truncated", "bad-magic", "bad-version", "unknown-op", "reply-op",
                "lying-length", "bad-meta", "bad-arrow", "pickle", "mutated", "bad-request"]
_CONNECTION_KINDS = ["oversized-length", "truncated-stream", "bad-hello"]


def _templates() -> list[bytes]:
    ids = torch.tensor(PROMPT, dtype=torch.int64)
    return [frame_bytes(frame) for frame in (
        Frame(Op.GENERATE, UNOWNED, 1, {"max_new_tokens": 1}, (ids,)),
        Frame(Op.EDIT, UNOWNED, 2, {"op": "set"}, (torch.ones(2, 8), torch.arange(3, dtype=torch.int32))),
        Frame(Op.SIGNAL_PHASE, UNOWNED, 3, {"phase": "IO_WAIT", "expected_s": 1.5}),
        Frame(Op.INSPECT, UNOWNED, 4, {"what": "stats"}),
        Frame(Op.CLOSE_SESSION, UNOWNED, 5),
    )]


TEMPLATES = _templates()


def bad_requests(session_id: int, vocab: int, layers: int) -> list[Frame]:
    """Well-formed frames for an open session, each with one argument wrong (dtype, shape, range, type)."""
    ids = torch.tensor(PROMPT, dtype=torch.int64)
    one = {"max_new_tokens": 1}

    def gen(meta: dict = one, tensor: torch.Tensor | None = ids) -> Frame:
        return Frame(Op.GENERATE, session_id, meta=meta, tensors=() if tensor is None else (tensor,))

    return [
        gen(tensor=ids.float()), gen(tensor=ids.half()), gen(tensor=ids.to(torch.int16)), gen(tensor=ids.bool()),
        gen(tensor=ids.to(torch.uint8)), gen(tensor=ids.view(1, -1)), gen(tensor=torch.tensor(3)),
        gen(tensor=torch.zeros(0, dtype=torch.int64)), gen(tensor=torch.tensor([-1])),
        gen(tensor=torch.tensor([vocab])), gen(tensor=None), gen(tensor=torch.tensor([2**62])),
        gen({"max_new_tokens": -1}), gen({"max_new_tokens": 1 << 20}), gen({"max_new_tokens": "8"}),
        gen({"max_new_tokens": True}), gen({"max_new_tokens": 1.5}), gen({"max_new_tokens": None}),
        gen({**one, "temperature": -1.0}), gen({**one, "temperature": "hot"}), gen({**one, "top_k": -3}),
        gen({**one, "breakpoints": [layers]}), gen({**one, "breakpoints": "1"}), gen({**one, "breakpoints": [1.0]}),
        gen({**one, "breakpoints": [-1]}), gen({**one, "breakpoints": {"a": 1}}),
        Frame(Op.SIGNAL_PHASE, session_id, meta={"phase": "SLEEP"}),
        Frame(Op.SIGNAL_PHASE, session_id, meta={"phase": None}),
        Frame(Op.SIGNAL_PHASE, session_id, meta={"phase": "IO_WAIT", "expected_s": -1}),
        Frame(Op.SIGNAL_PHASE, session_id, meta={"phase": "IO_WAIT", "expected_s": "soon"}),
        Frame(Op.EDIT, session_id, meta={"op": "set"}, tensors=(torch.ones(3),)),
        Frame(Op.EDIT, session_id, meta={"op": "scale", "factor": 2.0}),
        Frame(Op.INSPECT, session_id, meta={"what": "weights"}),
        Frame(Op.RESUME, session_id),
        Frame(Op.CLOSE_SESSION, session_id + (1 << 40)),
    ]


def must_refuse(raw: bytes, owned: int) -> bool:
    """Whether a server must refuse this frame from a connection owning only session ``owned``."""
    try:
        frame = decode_frame(memoryview(raw), SERIALIZER)
    except FrameError:
        return True
    return frame.op not in _HARMLESS and frame.session_id != owned


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    out = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.6 and out:
            out[rng.randrange(len(out))] ^= rng.randint(1, 255)
        else:
            start = rng.randint(0, len(out))
            out[start : start + rng.randint(0, 32)] = rng.randbytes(rng.randint(0, 32))
    return bytes(out)


def _with_payload(raw: bytes, payload: bytes) -> bytes:
    (meta_len,) = struct.unpack_from("<I", raw, META_LEN_AT)
    out = bytearray(raw[: HEADER_SIZE + meta_len] + payload)
    struct.pack_into("<Q", out, PAYLOAD_LEN_AT, len(payload))
    return bytes(out)


def _frame_level(kind: str, rng: random.Random, owned: int, vocab: int, layers: int) -> bytes:
    raw = bytearray(rng.choice(TEMPLATES))
    if kind == "random-bytes":
        return rng.randbytes(rng.randint(0, 256))
    if kind == "truncated":
        return bytes(raw[: rng.randrange(len(raw))])
    if kind == "bad-magic":
        raw[0:4] = rng.choice([b"DJN2", b"\x00" * 4, b"djn1", rng.randbytes(4)])
        return bytes(raw) if raw[0:4] != MAGIC else bytes(raw[1:])
    if kind == "bad-version":
        raw[4] = rng.choice([0, 2, 255])
        return bytes(raw)
    if kind in ("unknown-op", "reply-op"):
        raw[5] = rng.choice(_UNKNOWN_OPS) if kind == "unknown-op" else rng.choice(_REPLY_OPS)
        return bytes(raw)
    if kind == "lying-length":
        at, fmt = rng.choice([(META_LEN_AT, "<I"), (PAYLOAD_LEN_AT, "<Q")])
        (true,) = struct.unpack_from(fmt, raw, at)
        value = rng.choice([true + rng.randint(1, 64), max(0, true - rng.randint(1, 64)), 2 ** (8 * struct.calcsize(fmt)) - 1,
                            rng.randrange(2 ** (8 * struct.calcsize(fmt)))])
        struct.pack_into(fmt, raw, at, value if value != true else true + 1)
        return bytes(raw)
    if kind == "bad-meta":
        meta = rng.choice(_BAD_META)
        return bytes(raw[:META_LEN_AT]) + struct.pack("<IQ", len(meta), 0) + meta
    if kind == "bad-arrow":
        template = TEMPLATES[rng.choice([0, 1])]
        (meta_len,) = struct.unpack_from("<I", template, META_LEN_AT)
        payload = template[HEADER_SIZE + meta_len :]
        payload = rng.choice([_mutate(rng, payload), payload[: rng.randrange(len(payload))],
                              rng.randbytes(rng.randint(1, 256)), payload + rng.randbytes(8)])
        return _with_payload(template, payload)
    if kind == "pickle":
        exploit = rng.choice(pickle_exploits(Path("/nonexistent/djinn-fuzz-unpickled")))
        return rng.choice([_with_payload(bytes(raw), exploit), exploit])
    if kind == "mutated":
        return _mutate(rng, bytes(raw))
    if kind == "bad-request":
        return frame_bytes(rng.choice(bad_requests(owned, vocab, layers)))
    raise ValueError(f"unknown kind {kind!r}")


def malformed_frame(rng: random.Random, owned: int, vocab: int, layers: int,
                    connection_share: float = 0.02) -> tuple[str, bytes]:
    """``(kind, bytes)``: one frame the server must refuse, from a connection owning ``owned``.

    A kind in ``_CONNECTION_KINDS`` is about the stream itself (the server must end the
    connection); its bytes are then what follows a length prefix announcing more (or far more).
    """
    if rng.random() < connection_share:
        kind = rng.choice(_CONNECTION_KINDS)
        return kind, frame_bytes(Frame(Op.PING)) if kind == "bad-hello" else rng.randbytes(rng.randint(0, 64))
    kind = rng.choice(_FRAME_KINDS)
    while True:
        raw = _frame_level(kind, rng, owned, vocab, layers)
        if kind == "bad-request" or must_refuse(raw, owned):
            return kind, raw


# --------------------------------------------------------------------------- fuzz


class HealthyClient(threading.Thread):
    """A well-behaved client generating in a loop, checking each answer against the first one."""

    def __init__(self, url: str, token: str = "") -> None:
        super().__init__(name="healthy-client", daemon=True)
        self.url, self.token = url, token
        self.stop = threading.Event()
        self.counts: Counter = Counter()

    def run(self) -> None:
        """Generate until stopped: a fresh session each time, the same prompt, the same answer."""
        with connect(self.url, token=self.token or None) as client:
            with client.model().session() as session:
                expected = session.generate(PROMPT, max_new_tokens=4).tokens
            while not self.stop.is_set():
                try:
                    with client.model().session() as session:
                        got = session.generate(PROMPT, max_new_tokens=4).tokens
                    self.counts["correct" if got == expected else "wrong"] += 1
                except DjinnError as exc:
                    self.counts[f"error:{type(exc).__name__}"] += 1

    def finish(self) -> dict[str, int]:
        """Stop and return the counts (correct, wrong, errors by type)."""
        self.stop.set()
        self.join(timeout=60)
        return dict(self.counts)


def _connection_level(url: str, kind: str, data: bytes, limit: int) -> tuple[str, bool]:
    """Send one stream-breaking frame on a fresh connection: (first outcome, closed afterwards)."""
    client = RawClient(url, hello=kind != "bad-hello", timeout=30)
    try:
        if kind == "oversized-length":
            client.send_bytes(data, announced=random.Random(len(data)).choice([limit + 1, 1 << 40, 2**64 - 1]))
        elif kind == "truncated-stream":
            client.send_bytes(data, announced=len(data) + 1 + len(data) * 3)
            client.sock.shutdown(socket.SHUT_WR)
        else:
            client.send_bytes(data)
        first = client.recv()
        outcome = "closed" if first is None else ("error" if first.op is Op.ERROR else f"answered:{first.op.name}")
        if first is not None and first.op is Op.ERROR and first.meta.get("code") == "internal":
            outcome = "internal"
        return outcome, first is None or client.recv() is None
    finally:
        client.close()


def fuzz_server(server: BackgroundServer, frames: int, *, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Send ``frames`` malformed frames to ``server`` while a healthy client works; what happened.

    ``error_replies`` + ``closed_connections`` must equal ``frames``: any ``answered`` or
    ``internal`` outcome, a connection left open after a stream-breaking frame, a call to an
    unpickling function, a wrong healthy answer or leaked memory is a failure.
    """
    rng = random.Random(seed)
    url = server.url("tcp")
    vocab, layers = server.model.runner.vocab_size, server.model.runner.num_layers
    # what the server's transport accepts as one frame (see ``Server.max_frame_bytes``)
    limit = (server.kernel.config.server.max_frame_mb << 20) + WireLimits().max_meta_bytes + 4096
    baseline = idle_books(server)
    outcomes: Counter = Counter()
    by_kind: Counter = Counter()
    failures: list[str] = []
    healthy = HealthyClient(url)
    healthy.start()
    started = time.perf_counter()
    client = owned = None
    with no_unpickling() as unpickle_calls:
        for _ in tqdm(range(frames), desc="fuzz", disable=not progress, mininterval=2):
            if client is None:
                client = RawClient(url)
                owned = client.open_session()
            kind, data = malformed_frame(rng, owned, vocab, layers)
            by_kind[kind] += 1
            if kind in _CONNECTION_KINDS:
                outcome, closed = _connection_level(url, kind, data, limit)
                if not closed:
                    failures.append(f"{kind}: connection left open")
            else:
                client.send_bytes(data)
                reply = client.recv()
                if reply is None:
                    outcome = "closed"
                    client.close()
                    client = None
                elif reply.op is not Op.ERROR:
                    outcome = f"answered:{reply.op.name}"
                else:
                    outcome = "internal" if reply.meta.get("code") == "internal" else "error"
            outcomes[outcome] += 1
            if outcome not in ("error", "closed") and len(failures) < 20:
                failures.append(f"{kind} -> {outcome}: {data[:96].hex()}")
        if client is not None:
            client.close()
    seconds = time.perf_counter() - started
    health = healthy.finish()
    alive = server._thread.is_alive()
    with connect(url) as check, check.model().session() as session:
        served_after = len(session.generate(PROMPT, max_new_tokens=2).tokens) == 2
    return {
        "frames": frames,
        "error_replies": outcomes["error"],
        "closed_connections": outcomes["closed"],
        "other_outcomes": {k: v for k, v in outcomes.items() if k not in ("error", "closed")},
        "by_kind": dict(by_kind),
        "failures": failures,
        "unpickle_calls": dict(unpickle_calls),
        "crashes": int(not alive or not served_after),
        "healthy_client": health,
        "leaks": leaks(server, baseline),
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- disconnect storm

STORM_MODES = ("generate", "breakpoint", "swap")


def _drop_one(url: str, mode: str, rng: random.Random) -> None:
    client = RawClient(url)
    try:
        session = client.open_session()
        if mode == "generate":
            client.generate(session, PROMPT, rng.randint(4, 64))
            time.sleep(rng.random() * 0.005)
        elif mode == "breakpoint":
            client.generate(session, PROMPT, 4, breakpoints=[1])
            hit = client.recv()
            if hit is None or hit.op is not Op.BREAK:
                raise RuntimeError(f"expected a BREAK frame, got {hit}")
            if rng.random() < 0.5:
                client.send(Frame(Op.INSPECT, session, meta={"what": "stats"}))
        else:
            client.generate(session, PROMPT, 2)
            raise_for_error(client.recv())
            # COMPUTE lands mid-eviction or, after the pause, starts a restore: drop during either
            client.send(Frame(Op.SIGNAL_PHASE, session, meta={"phase": "IO_WAIT", "reply": False}))
            time.sleep(rng.random() * 0.01)
            client.send(Frame(Op.SIGNAL_PHASE, session, meta={"phase": "COMPUTE", "reply": False}))
            time.sleep(rng.random() * 0.002)
    finally:
        client.abort()


def disconnect_storm(server: BackgroundServer, clients: int, *, concurrency: int = 16, seed: int = 0,
                     progress: bool = False) -> dict[str, Any]:
    """``clients`` clients, in equal parts mid-generate, paused at a breakpoint and mid-swap, each
    dropping its connection abruptly; then the books, and whether the server still serves."""
    url = server.url("tcp")
    baseline = idle_books(server)
    rngs = [random.Random(seed * 1_000_003 + i) for i in range(clients)]
    errors: Counter = Counter()
    started = time.perf_counter()

    def one(i: int) -> None:
        try:
            _drop_one(url, STORM_MODES[i % len(STORM_MODES)], rngs[i])
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors[f"{type(exc).__name__}: {exc}"[:120]] += 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(tqdm(pool.map(one, range(clients)), total=clients, desc="storm", disable=not progress, mininterval=2))
    seconds = time.perf_counter() - started
    leaked = leaks(server, baseline)
    with connect(url) as check, check.model().session() as session:
        served_after = len(session.generate(PROMPT, max_new_tokens=2).tokens) == 2
    counters = server.call(lambda: dict(server.kernel.counters))
    return {
        "disconnects": clients,
        "by_mode": {mode: len(range(i, clients, len(STORM_MODES))) for i, mode in enumerate(STORM_MODES)},
        "client_errors": dict(errors),
        "leaks": leaked,
        "served_after": served_after,
        "evictions": counters["evictions"],
        "restores": counters["restores"],
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- burst


def burst(server: BackgroundServer, clients: int, *, new_tokens: int = 4, timeout: float = 120.0) -> dict[str, Any]:
    """``clients`` sessions generating at once (after all connected); each must be served or refused
    with an AdmissionError reply."""
    url = server.url("tcp")
    baseline = idle_books(server)
    gate = threading.Barrier(clients)
    outcomes: Counter = Counter()

    def one(_i: int) -> str:
        client = RawClient(url, timeout=timeout)
        try:
            session = client.open_session()
            gate.wait(timeout=timeout)
            client.generate(session, PROMPT, new_tokens)
            reply = client.recv()
            if reply is None:
                return "closed"
            raise_for_error(reply)
            return "served" if len(reply.tensors[0]) == new_tokens else "short"
        except AdmissionError:
            return "refused"
        except socket.timeout:
            return "unanswered"
        except Exception as exc:  # noqa: BLE001 - counted and reported
            return f"failed:{type(exc).__name__}: {exc}"[:120]
        finally:
            client.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes.update(pool.map(one, range(clients)))
    counters = server.call(lambda: dict(server.kernel.counters))
    return {
        "clients": clients,
        "served": outcomes["served"],
        "refused": outcomes["refused"],
        "other": {k: v for k, v in outcomes.items() if k not in ("served", "refused")},
        "admission_waits": counters["admission_waits"],
        "admission_refusals": counters["admission_refusals"],
        "leaks": leaks(server, baseline),
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------- soak


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class RssSampler(threading.Thread):
    """Samples the RSS every ``period`` seconds; keeps the peak."""

    def __init__(self, period: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.period, self.peak = period, rss_bytes()
        self.stop = threading.Event()

    def run(self) -> None:
        """Sample until stopped."""
        while not self.stop.wait(self.period):
            self.peak = max(self.peak, rss_bytes())


def _soak_one(session: Any) -> tuple[list[int], ...]:
    """One session's life: generate, evict, restore on demand, evict and prefetch, trace, edit."""
    first = session.generate(PROMPT, max_new_tokens=2).tokens
    session.signal_phase("IO_WAIT")
    second = session.generate([7], max_new_tokens=1).tokens  # restores what IO_WAIT evicted
    session.signal_phase("IO_WAIT")
    session.signal_phase("COMPUTE")
    trace = session.trace([8], max_new_tokens=2, breakpoints=[1])
    for hit in trace:
        if hit.step == 1:
            hit.stats()
    return first, second, trace.result.tokens


def soak(server: BackgroundServer, sessions: int, *, concurrency: int = 4, progress: bool = False) -> dict[str, Any]:
    """``sessions`` sessions through their whole life on ``concurrency`` connections; RSS and books."""
    url = server.url("tcp")
    baseline = idle_books(server)
    counters_before = server.call(lambda: dict(server.kernel.counters))
    sampler = RssSampler()
    rss_start = rss_bytes()
    sampler.start()
    outcomes: Counter = Counter()
    expected: list[Any] = []
    lock = threading.Lock()
    mid: dict[str, int] = {}
    bar = tqdm(total=sessions, desc="soak", disable=not progress, mininterval=2)
    started = time.perf_counter()

    def worker(share: int) -> None:
        with connect(url) as client:
            model = client.model()
            for _ in range(share):
                try:
                    with model.session() as session:
                        got = _soak_one(session)
                except DjinnError as exc:
                    got = f"error:{type(exc).__name__}"
                with lock:
                    if not expected and not isinstance(got, str):
                        expected.append(got)
                    outcomes["correct" if expected and got == expected[0] else str(got)[:80]] += 1
                    bar.update()
                    if sum(outcomes.values()) == sessions // 2:
                        mid["rss"] = rss_bytes()

    shares = [sessions // concurrency + (i < sessions % concurrency) for i in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, shares))
    bar.close()
    seconds = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    leaked = leaks(server, baseline)
    counters = server.call(lambda: dict(server.kernel.counters))
    return {
        "sessions": sessions,
        "correct": outcomes["correct"],
        "other": {k: v for k, v in outcomes.items() if k != "correct"},
        "evictions": counters["evictions"] - counters_before["evictions"],
        "restores": counters["restores"] - counters_before["restores"],
        "write_backs": counters["write_backs"] - counters_before["write_backs"],
        "rss_start_bytes": rss_start,
        "rss_mid_bytes": mid.get("rss", rss_start),
        "rss_peak_bytes": max(sampler.peak, rss_bytes()),
        "rss_end_bytes": rss_bytes(),
        "leaks": leaked,
        "books_end": books(server),
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- the run


def _mb(nbytes: int) -> float:
    return round(nbytes / 2**20, 1)


@click.command()
@click.option("--frames", default=100_000, help="malformed frames to fuzz the server with")
@click.option("--disconnects", default=1000, help="clients dropping abruptly")
@click.option("--admissible", default=8, help="sessions the burst's GPU budget admits (10x arrive)")
@click.option("--sessions", default=10_000, help="sessions through the soak")
@click.option("--concurrency", default=16, help="clients at once in the storm")
@click.option("--seed", default=0)
@click.option("--model", "model_name", default="random:tiny-llama")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(frames: int, disconnects: int, admissible: int, sessions: int, concurrency: int, seed: int,
         model_name: str, out: Path) -> None:
    """Fuzz, storm, burst and soak one server each; write one JSON result file."""
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    raw: dict[str, Any] = {}
    parts: list[tuple[str, Callable[[], DjinnConfig], list[str], Callable[[BackgroundServer], dict]]] = [
        ("fuzz", lambda: server_config(model_name), ["semantic", "tcp"],
         lambda s: fuzz_server(s, frames, seed=seed, progress=True)),
        ("storm", lambda: server_config(model_name), ["semantic", "tcp"],
         lambda s: disconnect_storm(s, disconnects, concurrency=concurrency, seed=seed, progress=True)),
        ("burst", lambda: server_config(model_name, budget_gb=kv_budget_gb(model_name, admissible, 64),
                                        admission_queue=admissible), ["static", "tcp"],
         lambda s: burst(s, 10 * admissible)),
        ("soak", lambda: server_config(model_name), ["semantic", "tcp"],
         lambda s: soak(s, sessions, progress=True)),
    ]
    for name, config, names, run in parts:
        server = start_server(config(), names)
        try:
            raw[name] = run(server)
        finally:
            server.stop()
        click.echo(f"{name}: done in {raw[name]['seconds']:.1f} s")
    soaked = raw["soak"]
    summary = {
        "frames_fuzzed": raw["fuzz"]["frames"],
        "crashes": raw["fuzz"]["crashes"] + int(not raw["storm"]["served_after"]),
        "error_replies": raw["fuzz"]["error_replies"],
        "closed_connections": raw["fuzz"]["closed_connections"],
        "other_outcomes": sum(raw["fuzz"]["other_outcomes"].values()),
        "unpickle_calls": sum(raw["fuzz"]["unpickle_calls"].values()),
        "unpickling_code_paths": len(unpickling_code_paths()),
        "healthy_answers_correct": raw["fuzz"]["healthy_client"].get("correct", 0),
        "healthy_answers_wrong": raw["fuzz"]["healthy_client"].get("wrong", 0),
        "disconnects": raw["storm"]["disconnects"],
        "burst_served": raw["burst"]["served"],
        "burst_refused": raw["burst"]["refused"],
        "burst_unanswered": sum(raw["burst"]["other"].values()),
        "soak_sessions": soaked["sessions"],
        "soak_correct": soaked["correct"],
        "leaked_bytes": sum(raw[p]["leaks"]["leaked_bytes"] for p in raw),
        "leaked_sessions": sum(raw[p]["leaks"]["sessions"] for p in raw),
        "leaked_pool_blocks": sum(raw[p]["leaks"]["pool_used_blocks"] for p in raw),
        "soak_rss_start_mb": _mb(soaked["rss_start_bytes"]),
        "soak_rss_peak_mb": _mb(soaked["rss_peak_bytes"]),
        "soak_rss_end_mb": _mb(soaked["rss_end_bytes"]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    report = {
        **result_header(
            "reliability", "eval.reliability.run",
            f"random weights of {model_name}; server and clients in one process over tcp loopback; "
            "each part on a fresh server",
            dict(model=model_name, frames=frames, disconnects=disconnects, admissible=admissible,
                 burst_clients=10 * admissible, sessions=sessions, concurrency=concurrency, seed=seed),
        ),
        "raw": raw,
        "summary": summary,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for key, value in summary.items():
        click.echo(f"{key:>26}: {value}")


if __name__ == "__main__":
    main()
