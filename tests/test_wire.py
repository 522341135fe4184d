"""The frame codec (djinn.wire.frames) and the arrow serializer: round trips, zero copy, and
hostile bytes, which must only ever produce FrameError."""

from __future__ import annotations

import ast
import json
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from djinn.kernel import errors
from djinn.wire import frames as wire
from djinn.kernel.errors import DjinnError
from djinn.kernel.plugins import StrategyRegistry
from djinn.wire.errors import FrameError, FrameTooLarge
from djinn.wire.frames import (
    HEADER_SIZE,
    Frame,
    Op,
    WireLimits,
    decode_frame,
    encode_frame,
    error_frame,
    peek_header,
    raise_for_error,
)
from djinn.plugins.serializers import arrow
from djinn.plugins.serializers.arrow import ArrowSerializer, ArrowSettings

SERIALIZER = ArrowSerializer(ArrowSettings())
# the format as the module docstring specifies it, written out independently of the codec
HEADER = struct.Struct("<4sBBHQQIQ")
META_LEN_AT, PAYLOAD_LEN_AT = 24, 28

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]
#: integer dtype of the same size, to compare floats bit by bit (NaN payloads and -0.0 included)
BITS = {
    torch.float64: torch.int64, torch.float32: torch.int32,
    torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.bool: torch.uint8,
}


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random values over the dtype's range, with NaN, infinities and -0.0 among floats."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
        flat = t.view(-1)
        specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=dtype)
        n = min(flat.numel(), specials.numel())
        flat[:n] = specials[:n]
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as an integer tensor of the same shape."""
    return t.view(BITS.get(t.dtype, t.dtype))


def assert_bit_equal(sent: torch.Tensor, got: torch.Tensor) -> None:
    assert got.dtype == sent.dtype
    assert got.shape == sent.shape
    assert torch.equal(bits(sent.contiguous()), bits(got))


def round_trip(frame: Frame, limits: WireLimits = WireLimits()) -> Frame:
    """encode_frame -> one bytes object (as a transport delivers it) -> decode_frame."""
    raw = b"".join(encode_frame(frame, SERIALIZER))
    return decode_frame(memoryview(raw), SERIALIZER, limits)


def raw_frame(
    meta: bytes = b"{}",
    payload: bytes = b"",
    *,
    op: int = Op.PING,
    magic: bytes = b"DJN1",
    version: int = 1,
    session_id: int = 0,
    request_id: int = 0,
    meta_len: int | None = None,
    payload_len: int | None = None,
) -> bytes:
    """A frame assembled by hand, so tests can say things the encoder never would."""
    header = HEADER.pack(
        magic, version, op, 0, session_id, request_id,
        len(meta) if meta_len is None else meta_len,
        len(payload) if payload_len is None else payload_len,
    )
    return header + meta + payload


def address(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


# =========================================================================== round trips

SHAPES = {
    "0-d": lambda dtype: sample(dtype, ()),
    "empty": lambda dtype: sample(dtype, (0,)),
    "empty-middle": lambda dtype: sample(dtype, (2, 0, 3)),
    "vector": lambda dtype: sample(dtype, (7,)),
    "matrix": lambda dtype: sample(dtype, (3, 5)),
    "3-d": lambda dtype: sample(dtype, (2, 3, 4)),
    "transposed": lambda dtype: sample(dtype, (4, 5)).t(),
    "strided": lambda dtype: sample(dtype, (6, 8))[1:, ::3],
    "expanded": lambda dtype: sample(dtype, (1, 5)).expand(3, 5),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_dtype_and_shape_round_trips_bit_exact(dtype, shape):
    tensor = SHAPES[shape](dtype)
    got = round_trip(Frame(Op.RESULT, 3, 4, {"k": [1, "x"]}, (tensor,), flags=5))
    assert (got.op, got.session_id, got.request_id, got.flags) == (Op.RESULT, 3, 4, 5)
    assert got.meta == {"k": [1, "x"]}
    assert len(got.tensors) == 1
    assert_bit_equal(tensor, got.tensors[0])


def test_many_tensors_of_mixed_dtypes_keep_their_order():
    tensors = [sample(dtype, (i + 1, 2), seed=i) for i, dtype in enumerate(DTYPES)]
    got = round_trip(Frame(Op.GENERATE, tensors=tensors))
    for sent, back in zip(tensors, got.tensors, strict=True):
        assert_bit_equal(sent, back)


def test_a_frame_without_tensors_has_an_empty_payload():
    parts = encode_frame(Frame(Op.PING, 1, 2), SERIALIZER)
    assert len(parts) == 1
    (_, _, op, _, _, _, meta_len, payload_len) = HEADER.unpack_from(parts[0])
    assert (op, payload_len, len(parts[0])) == (Op.PING, 0, HEADER_SIZE + meta_len)
    assert round_trip(Frame(Op.PING, 1, 2)) == Frame(Op.PING, 1, 2)


@pytest.mark.parametrize("meta", [{}, {"a": 1}, {"text": "é" * 13}, {"n": list(range(50))}])
def test_payload_starts_aligned_whatever_the_meta(meta):
    header = encode_frame(Frame(Op.OK, meta=meta, tensors=(torch.ones(3),)), SERIALIZER)[0]
    meta_len = HEADER.unpack_from(header)[6]
    assert (HEADER_SIZE + meta_len) % 8 == 0
    assert json.loads(header[HEADER_SIZE:]) == meta


def test_tensors_needing_grad_encode_their_values():
    tensor = torch.randn(4, 3, requires_grad=True)
    assert_bit_equal(tensor.detach(), round_trip(Frame(Op.RESULT, tensors=(tensor,))).tensors[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_tensors_arrive_on_the_host():
    tensor = sample(torch.bfloat16, (64, 33)).cuda().t()
    got = round_trip(Frame(Op.RESULT, tensors=(tensor,))).tensors[0]
    assert got.device.type == "cpu"
    assert_bit_equal(tensor.cpu(), got)


def test_a_256_mb_tensor_round_trips_without_copies():
    tensor = torch.rand(64 * 1024 * 1024, generator=torch.Generator().manual_seed(1))  # 256 MB
    parts = encode_frame(Frame(Op.RESULT, tensors=(tensor,)), SERIALIZER)
    assert any(address(p) == tensor.data_ptr() for p in parts[1:])
    raw = b"".join(parts)
    del parts
    got = decode_frame(memoryview(raw), SERIALIZER).tensors[0]
    assert address(raw) <= got.data_ptr() < address(raw) + len(raw)
    assert torch.equal(tensor, got)


# =========================================================================== zero copy


def test_decoded_tensors_are_views_of_the_frame_buffer():
    tensors = [sample(dtype, (5, 3), seed=i) for i, dtype in enumerate(DTYPES)]
    raw = b"".join(encode_frame(Frame(Op.RESULT, tensors=tensors), SERIALIZER))
    buffer = np.empty(len(raw), dtype=np.uint8)  # what a transport receives into
    buffer[:] = np.frombuffer(raw, dtype=np.uint8)
    start = buffer.ctypes.data
    got = decode_frame(memoryview(buffer), SERIALIZER).tensors
    for sent, back in zip(tensors, got, strict=True):
        assert start <= back.data_ptr() < start + len(raw)
        assert back.data_ptr() % back.element_size() == 0
        assert_bit_equal(sent, back)


def test_encoding_sends_a_contiguous_tensor_from_its_own_memory():
    tensor = torch.randn(256, 1024)  # 1 MiB
    parts = SERIALIZER.encode([tensor])
    assert [address(p) for p in parts].count(tensor.data_ptr()) == 1
    assert sum(memoryview(p).nbytes for p in parts) < tensor.nbytes + 4096


def test_decoding_a_read_only_buffer_warns_about_nothing():
    raw = b"".join(encode_frame(Frame(Op.RESULT, tensors=(torch.ones(3), torch.zeros(2, 2))), SERIALIZER))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_frame(memoryview(raw), SERIALIZER)


def test_a_misaligned_payload_decodes_to_aligned_tensors():
    tensor = sample(torch.float64, (9,))
    payload = b"".join(SERIALIZER.encode([tensor]))
    shifted = bytearray(len(payload) + 1)
    shifted[1:] = payload
    (got,) = SERIALIZER.decode(memoryview(shifted)[1:])
    assert got.data_ptr() % 8 == 0
    assert_bit_equal(tensor, got)


# =========================================================================== header and lengths


@pytest.fixture
def valid_raw() -> bytes:
    return b"".join(
        encode_frame(Frame(Op.GENERATE, 7, 9, {"max_new_tokens": 4}, (torch.arange(6).view(2, 3),)),
                     SERIALIZER)
    )


def test_every_truncation_of_a_frame_is_refused(valid_raw):
    for cut in range(len(valid_raw)):
        with pytest.raises(FrameError):
            decode_frame(memoryview(valid_raw[:cut]), SERIALIZER)
    with pytest.raises(FrameError):
        decode_frame(valid_raw + b"\x00", SERIALIZER)


def test_every_truncation_of_a_payload_is_refused_even_with_a_matching_length():
    payload = b"".join(SERIALIZER.encode([sample(torch.int32, (3, 2)), sample(torch.bool, (4,))]))
    for cut in range(1, len(payload)):  # an empty payload is a frame without tensors
        with pytest.raises(FrameError):
            decode_frame(raw_frame(payload=payload[:cut]), SERIALIZER)
    assert len(decode_frame(raw_frame(payload=payload), SERIALIZER).tensors) == 2


@pytest.mark.parametrize(
    "frame",
    [
        raw_frame(magic=b"DJN2"),
        raw_frame(magic=b"\x00\x00\x00\x00"),
        raw_frame(version=0),
        raw_frame(version=2),
        raw_frame(op=0),
        raw_frame(op=99),
        raw_frame(op=255),
        b"",
        b"DJN1",
    ],
    ids=["magic", "zero-magic", "version-0", "version-2", "op-0", "op-99", "op-255", "empty", "magic-only"],
)
def test_broken_headers_are_refused(frame):
    with pytest.raises(FrameError):
        decode_frame(frame, SERIALIZER)


@pytest.mark.parametrize(
    ("field", "fmt", "change"),
    [
        (META_LEN_AT, "<I", +1), (META_LEN_AT, "<I", -1),
        (PAYLOAD_LEN_AT, "<Q", +1), (PAYLOAD_LEN_AT, "<Q", -1),
        (META_LEN_AT, "<I", 2**32 - 1), (PAYLOAD_LEN_AT, "<Q", 2**64 - 1),
        (PAYLOAD_LEN_AT, "<Q", 2**31),
    ],
)
def test_lengths_that_lie_are_refused(valid_raw, field, fmt, change):
    raw = bytearray(valid_raw)
    (value,) = struct.unpack_from(fmt, raw, field)
    lie = value + change if abs(change) == 1 else change
    struct.pack_into(fmt, raw, field, lie)
    with pytest.raises(FrameError):
        decode_frame(raw, SERIALIZER)


def test_limits_are_enforced_as_frame_too_large(valid_raw):
    with pytest.raises(FrameTooLarge):
        decode_frame(valid_raw, SERIALIZER, WireLimits(max_payload_bytes=64))
    with pytest.raises(FrameTooLarge):
        decode_frame(valid_raw, SERIALIZER, WireLimits(max_meta_bytes=8))
    with pytest.raises(FrameError, match="tensors"):
        round_trip(Frame(Op.RESULT, tensors=(torch.ones(1), torch.ones(1))), WireLimits(max_tensors=1))


def test_peek_header_reads_ids_of_a_frame_that_does_not_decode():
    broken = raw_frame(b"{not json", op=Op.GENERATE, session_id=5, request_id=77)
    with pytest.raises(FrameError):
        decode_frame(broken, SERIALIZER)
    assert peek_header(broken) == (Op.GENERATE, 5, 77)
    assert peek_header(raw_frame(op=99, request_id=3)) == (99, 0, 3)
    for bad in (b"DJN1", raw_frame(magic=b"XXXX"), raw_frame(version=9)):
        with pytest.raises(FrameError):
            peek_header(bad)


# =========================================================================== meta


@pytest.mark.parametrize(
    "meta",
    [
        b"",
        b"{not json",
        b'{"a": "\xff\xfe"}',
        b"[1, 2]",
        b'"a string"',
        b"3",
        b"null",
        b'{"a": NaN}',
        b'{"a": -Infinity}',
        b'{"a": ' + b"9" * 5000 + b"}",
        b"[" * 60000,
        b'{"a": 1} {"b": 2}',
        b"\xef\xbb\xbf{}",
    ],
    ids=[
        "empty", "not-json", "not-utf8", "list", "string", "number", "null", "nan", "infinity",
        "huge-int", "deep-brackets", "two-objects", "bom",
    ],
)
def test_meta_that_is_not_a_plain_json_object_is_refused(meta):
    with pytest.raises(FrameError):
        decode_frame(raw_frame(meta), SERIALIZER)


def nested(depth: int) -> dict:
    """A JSON object ``depth`` levels deep."""
    meta: dict = {}
    for _ in range(depth - 1):
        meta = {"a": meta}
    return meta


def test_meta_depth_is_bounded():
    assert decode_frame(raw_frame(json.dumps(nested(16)).encode()), SERIALIZER).meta == nested(16)
    with pytest.raises(FrameError, match="deeper"):
        decode_frame(raw_frame(json.dumps(nested(17)).encode()), SERIALIZER)
    with pytest.raises(FrameError, match="deeper"):
        decode_frame(raw_frame(b'{"a": [[[1]]]}'), SERIALIZER, WireLimits(max_json_depth=3))


def test_meta_size_is_bounded():
    meta = json.dumps({"pad": "x" * (64 * 1024)}).encode()
    with pytest.raises(FrameTooLarge):
        decode_frame(raw_frame(meta), SERIALIZER)


def test_meta_the_encoder_cannot_write_plainly_is_refused():
    for meta in ({"a": float("nan")}, {"a": {1, 2}}, {"a": object()}):
        with pytest.raises(FrameError):
            encode_frame(Frame(Op.OK, meta=meta), SERIALIZER)


def test_frames_validate_their_fields():
    with pytest.raises(ValueError):
        Frame(99)
    with pytest.raises(ValueError):
        Frame(Op.OK, session_id=-1)
    with pytest.raises(ValueError):
        Frame(Op.OK, request_id=2**64)
    with pytest.raises(ValueError):
        Frame(Op.OK, flags=2**16)
    with pytest.raises(ValueError):
        WireLimits(max_meta_bytes=0)


# =========================================================================== hostile payloads


def fixed_list(values: pa.Array, list_size: int | None = None, rows: int = 1) -> pa.Array:
    size = len(values) // rows if list_size is None else list_size
    return pa.Array.from_buffers(pa.list_(values.type, size), rows, [None], children=[values])


def stream(columns, metadata, *, compression=None, batches=1, eos=True) -> bytes:
    """An Arrow IPC stream of hand-made columns and field metadata."""
    fields = [
        pa.field(str(i), column.type, metadata=md) for i, (column, md) in enumerate(zip(columns, metadata))
    ]
    schema = pa.schema(fields)
    sink = pa.BufferOutputStream()
    writer = pa.ipc.new_stream(sink, schema, options=pa.ipc.IpcWriteOptions(compression=compression))
    for _ in range(batches):
        writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
    writer.close()
    data = sink.getvalue().to_pybytes()
    return data if eos else data[:-8]


def md(dtype: str = "float32", shape: str = "[4]") -> dict:
    return {"djinn.dtype": dtype, "djinn.shape": shape}


FLOATS = pa.array(np.arange(4, dtype=np.float32))

HOSTILE_PAYLOADS = {
    "zeros": b"\x00" * 64,
    "garbage": b"not an arrow stream at all, not even close",
    "continuation-only": b"\xff\xff\xff\xff",
    "huge-metadata-length": b"\xff\xff\xff\xff\xff\xff\xff\x7f" + b"\x00" * 32,
    "end-of-stream-only": b"\xff\xff\xff\xff\x00\x00\x00\x00",
    "schema-only": stream([fixed_list(FLOATS)], [md()], batches=0),
    "no-columns": stream([], []),
    "two-batches": stream([fixed_list(FLOATS)], [md()], batches=2),
    "no-end-marker": stream([fixed_list(FLOATS)], [md()], eos=False),
    "trailing-bytes": stream([fixed_list(FLOATS)], [md()]) + b"\x00" * 8,
    "plain-column": stream([FLOATS], [md()]),
    "no-metadata": stream([fixed_list(FLOATS)], [None]),
    "unknown-dtype": stream([fixed_list(FLOATS)], [md("complex64")]),
    "dtype-not-a-name": stream([fixed_list(FLOATS)], [md("torch.float32")]),
    "dtype-type-mismatch": stream([fixed_list(FLOATS)], [md("bfloat16")]),
    "shape-mismatch": stream([fixed_list(FLOATS)], [md(shape="[2, 3]")]),
    "negative-shape": stream([fixed_list(FLOATS)], [md(shape="[-2, -2]")]),
    "bool-shape": stream([fixed_list(FLOATS)], [md(shape="[true, 4]")]),
    "float-shape": stream([fixed_list(FLOATS)], [md(shape="[4.0]")]),
    "shape-a-number": stream([fixed_list(FLOATS)], [md(shape="4")]),
    "shape-not-json": stream([fixed_list(FLOATS)], [md(shape="[4")]),
    "shape-not-list": stream([fixed_list(FLOATS)], [md(shape='{"a": 4}')]),
    "too-many-dims": stream([fixed_list(FLOATS)], [md(shape=json.dumps([4] + [1] * 40))]),
    "two-rows": stream([fixed_list(FLOATS, 2, rows=2)], [md(shape="[2]")]),
    "nulls": stream([fixed_list(pa.array([1.0, None, 2.0, 3.0], pa.float32()))], [md()]),
    "bool-not-0-or-1": stream([fixed_list(pa.array(np.array([0, 1, 2, 1], np.uint8)))], [md("bool")]),
    "strings": stream([fixed_list(pa.array(["a", "b", "c", "d"]))], [md()]),
    "dictionary": stream([FLOATS.dictionary_encode()], [md()]),
    "zstd": stream([fixed_list(FLOATS)], [md()], compression="zstd"),
    "lz4": stream([fixed_list(FLOATS)], [md()], compression="lz4"),
}


@pytest.mark.parametrize("name", HOSTILE_PAYLOADS)
def test_hostile_arrow_payloads_are_refused(name):
    with pytest.raises(FrameError):
        decode_frame(raw_frame(payload=HOSTILE_PAYLOADS[name]), SERIALIZER)


def test_the_hand_made_stream_is_otherwise_accepted():
    # the hostile cases above differ from this one in one respect each
    (got,) = decode_frame(raw_frame(payload=stream([fixed_list(FLOATS)], [md()])), SERIALIZER).tensors
    assert torch.equal(got, torch.arange(4, dtype=torch.float32))


def test_serializer_limits_hold_both_ways():
    small = ArrowSerializer(ArrowSettings(max_tensor_bytes=16, max_tensors=2))
    with pytest.raises(FrameTooLarge):
        small.encode([torch.ones(5)])
    with pytest.raises(FrameTooLarge):
        small.decode(memoryview(b"".join(SERIALIZER.encode([torch.ones(5)]))))
    with pytest.raises(FrameError):
        small.encode([torch.ones(1)] * 3)
    with pytest.raises(FrameError):
        small.decode(memoryview(b"".join(SERIALIZER.encode([torch.ones(1)] * 3))))
    assert len(small.decode(memoryview(b"".join(small.encode([torch.ones(4)] * 2))))) == 2


def test_unsupported_dtypes_are_refused_at_encode():
    for tensor in (torch.ones(2, dtype=torch.complex64), torch.ones(2, dtype=torch.uint16)):
        with pytest.raises(FrameError, match="cannot travel"):
            SERIALIZER.encode([tensor])


def test_a_serializer_that_raises_something_else_still_yields_frame_error():
    class Broken(ArrowSerializer):
        def decode(self, payload):
            raise RuntimeError("bug")

    raw = b"".join(encode_frame(Frame(Op.RESULT, tensors=(torch.ones(1),)), SERIALIZER))
    with pytest.raises(FrameError, match="bug"):
        decode_frame(raw, Broken(ArrowSettings()))


class _Exploit:
    """Unpickling this creates the file at ``path``: proof that something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickles_are_never_unpickled(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker), protocol=protocol)
    with pytest.raises(FrameError):
        decode_frame(raw_frame(payload=payload, op=Op.RESULT), SERIALIZER)
    with pytest.raises(FrameError):
        decode_frame(raw_frame(payload, op=Op.RESULT), SERIALIZER)
    # inside a JSON string it is just text
    as_text = json.dumps({"blob": payload.decode("latin-1")}).encode()
    assert decode_frame(raw_frame(as_text), SERIALIZER).meta["blob"] == payload.decode("latin-1")
    assert not marker.exists()


def test_neither_module_can_unpickle_or_evaluate():
    forbidden_modules = {"pickle", "cPickle", "marshal", "dill", "cloudpickle", "shelve"}
    forbidden_calls = {"eval", "exec", "compile", "__import__"}
    for module in (wire, arrow):
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & forbidden_modules, module
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in forbidden_modules, module
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in forbidden_calls, (module, node.func.id)
            elif isinstance(node, ast.Name):
                assert node.id not in forbidden_modules, (module, node.id)


# =========================================================================== fuzzing

VALID_FRAMES = [
    b"".join(encode_frame(frame, SERIALIZER))
    for frame in (
        Frame(Op.PING, 1, 2),
        Frame(Op.GENERATE, 3, 4, {"max_new_tokens": 8, "phase": "COMPUTE", "ids": [1, 2, 3]}),
        Frame(Op.RESULT, 5, 6, {"n": 1}, (sample(torch.int64, (2, 3)),)),
        Frame(Op.EDIT, 7, 8, {}, (sample(torch.bfloat16, (3,)), sample(torch.bool, (2, 2)),
                                  sample(torch.uint8, ()))),
        Frame(Op.INSPECT, 9, 10, {"layer": 2}, (sample(torch.float16, (0, 4)), sample(torch.float64, (5,)))),
    )
]


def decodes_or_refuses(data: bytes | bytearray) -> None:
    """decode_frame either returns a Frame whose tensors can be read, or raises FrameError."""
    try:
        frame = decode_frame(memoryview(bytes(data)), SERIALIZER)
    except FrameError:
        return
    assert isinstance(frame, Frame)
    for tensor in frame.tensors:
        tensor.clone()


@st.composite
def mutated_frames(draw) -> bytes:
    """A valid frame with byte flips, splices or rewritten length fields."""
    raw = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    (meta_len,) = struct.unpack_from("<I", raw, META_LEN_AT)
    (payload_len,) = struct.unpack_from("<Q", raw, PAYLOAD_LEN_AT)
    kind = draw(st.sampled_from(["flip", "splice", "payload-splice", "length"]))
    for _ in range(draw(st.integers(1, 4))):
        if kind == "flip":
            at = draw(st.integers(0, len(raw) - 1))
            raw[at] ^= draw(st.integers(1, 255))
        elif kind == "splice":
            start = draw(st.integers(0, len(raw)))
            end = draw(st.integers(start, min(len(raw), start + 32)))
            raw[start:end] = draw(st.binary(max_size=32))
        elif kind == "payload-splice":
            # keep the header consistent so that the bytes reach the serializer
            payload_start = HEADER_SIZE + meta_len
            start = draw(st.integers(payload_start, len(raw)))
            end = draw(st.integers(start, min(len(raw), start + 32)))
            raw[start:end] = draw(st.binary(max_size=32))
            if draw(st.booleans()) and start < len(raw):
                raw[start] ^= draw(st.integers(1, 255))
            struct.pack_into("<Q", raw, PAYLOAD_LEN_AT, len(raw) - payload_start)
        else:
            at, fmt, true_value = draw(
                st.sampled_from([(META_LEN_AT, "<I", meta_len), (PAYLOAD_LEN_AT, "<Q", payload_len)])
            )
            bound = 2 ** (8 * struct.calcsize(fmt)) - 1
            near = st.integers(max(0, true_value - 64), true_value + 64)
            value = draw(st.one_of(st.integers(0, bound), near))
            struct.pack_into(fmt, raw, at, value)
    return bytes(raw)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_decode_or_raise_frame_error(data):
    decodes_or_refuses(data)


@FUZZ
@given(st.sampled_from(VALID_FRAMES).map(lambda raw: raw[:HEADER_SIZE]), st.binary(max_size=512))
def test_a_valid_header_over_random_bytes_decodes_or_raises_frame_error(header, tail):
    decodes_or_refuses(header + tail)


@FUZZ
@given(mutated_frames())
def test_mutated_frames_decode_or_raise_frame_error(data):
    decodes_or_refuses(data)


@pytest.mark.slow
@settings(max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_frames())
def test_mutated_frames_decode_or_raise_frame_error_at_length(data):
    decodes_or_refuses(data)


# =========================================================================== errors and registration

ERROR_CLASSES = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, DjinnError)]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_error_frames_raise_the_same_error_class(cls):
    frame = round_trip(error_frame(12, 34, cls("what went wrong")))
    assert (frame.op, frame.request_id, frame.session_id) == (Op.ERROR, 12, 34)
    assert frame.meta == {"code": cls.code, "message": "what went wrong"}
    with pytest.raises(cls, match="what went wrong") as caught:
        raise_for_error(frame)
    assert type(caught.value) is cls


def test_other_errors_travel_as_internal_and_unknown_codes_as_djinn_error():
    frame = round_trip(error_frame(1, 0, KeyError("oops")))
    assert frame.meta["code"] == "internal"
    for meta in (frame.meta, {"code": "from-the-future", "message": "m"}, {"code": 3}, {}):
        with pytest.raises(DjinnError) as caught:
            raise_for_error(Frame(Op.ERROR, meta=meta))
        assert type(caught.value) is DjinnError


def test_raise_for_error_ignores_other_frames():
    assert raise_for_error(Frame(Op.OK, meta={"code": "auth"})) is None


def test_arrow_settings_are_validated():
    bad_values = ({"max_tensor_bytes": 0}, {"max_tensor_bytes": "1"}, {"max_tensors": True}, {"max_tensors": -1})
    for bad in bad_values:
        with pytest.raises(ValueError):
            ArrowSettings(**bad)


def test_the_plugin_registers_the_arrow_serializer():
    registry = StrategyRegistry()
    arrow.djinn_register_strategies(registry)
    spec = registry.specs["arrow"]
    assert (spec.slot, spec.settings_cls) == ("serializer", ArrowSettings)
    assert isinstance(spec.factory(ArrowSettings()), ArrowSerializer)
