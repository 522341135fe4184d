"""The ``arrow`` serializer: tensors travel as one Arrow IPC stream, read back as zero-copy views.

Layout of a payload (empty when a frame carries no tensors): an Arrow IPC *stream* of a schema
message, one record batch of one row and the end-of-stream marker, nothing else. Tensor ``i`` is
column ``"i"`` of type ``fixed_size_list<carrier>[numel]`` (non-null) with two field-metadata keys:
``djinn.dtype`` (the torch dtype's name) and ``djinn.shape`` (a JSON list of ints). The carrier
is the dtype itself except for bfloat16 (Arrow has none: its bits travel as int16) and bool
(Arrow's bool is bit-packed: it travels as uint8 bytes of 0 or 1).

Why a record batch rather than ``pa.ipc.write_tensor`` per tensor: the stream writer hands each
body buffer to a Python sink as an Arrow buffer over the tensor's own memory, so the tensor bytes
reach the transport as views (``write_tensor`` copies them into the sink); Arrow tensors have no
bool and nowhere to put our dtype; and a plain typed record batch is readable by any Arrow
reader. The canonical ``fixed_shape_tensor`` extension type is not used because Arrow would
parse its JSON metadata from untrusted bytes before we could bound it; the two keys above are
parsed and bounded here.

Decoding trusts nothing: the schema is checked (column count, types, dtype, shape against the
list size, size limit) before the batch is read, compressed bodies are refused (a small payload
could otherwise inflate to any size), the batch is fully validated, and every failure becomes a
``FrameError``. pyarrow and torch are imported on first use, so listing plugins stays fast.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from djinn.kernel.hookspecs import hookimpl
from djinn.wire.contracts import Buffer, Serializer
from djinn.wire.errors import FrameError, FrameTooLarge

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from djinn.kernel.plugins import StrategyRegistry

#: torch dtype name -> name of the dtype whose bytes travel
_CARRIERS = {
    "float64": "float64",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "int16",
    "int64": "int64",
    "int32": "int32",
    "int16": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "uint8",
}
_DTYPE_KEY = b"djinn.dtype"
_SHAPE_KEY = b"djinn.shape"
MAX_NDIM = 32
#: Arrow's fixed-size list holds at most this many values
_MAX_NUMEL = (1 << 31) - 1
#: Arrow buffers smaller than this are copied into the run of metadata bytes around them:
#: one small copy costs less than one more buffer for the transport to send
_INLINE_BYTES = 8 * 1024
#: what Arrow writes after the last message of a stream
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_READ_ONLY_WARNING = "The given buffer is not writable"


def _positive_int(_instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"arrow.{attribute.name} must be a positive int, not {value!r}")


@attrs.frozen
class ArrowSettings:
    """``[settings.arrow]``: bounds on what one payload may carry (both ways)."""

    #: bytes of one tensor's data
    max_tensor_bytes: int = attrs.field(default=1 << 30, validator=_positive_int)
    #: tensors in one payload
    max_tensors: int = attrs.field(default=64, validator=_positive_int)


@attrs.frozen
class _WireType:
    """How one torch dtype travels."""

    name: str
    dtype: torch.dtype
    carrier: torch.dtype
    arrow_type: pa.DataType
    itemsize: int


@functools.cache
def _wire_types() -> dict[str, _WireType]:
    import pyarrow as pa
    import torch

    types = {}
    for name, carrier in _CARRIERS.items():
        dtype = getattr(torch, name)
        types[name] = _WireType(
            name, dtype, getattr(torch, carrier), pa.type_for_alias(carrier), dtype.itemsize
        )
    return types


@functools.cache
def _wire_types_by_dtype() -> dict[torch.dtype, _WireType]:
    return {w.dtype: w for w in _wire_types().values()}


@attrs.frozen
class _Column:
    """What the schema promises about one tensor, checked before any data is read."""

    wire: _WireType
    shape: tuple[int, ...]
    numel: int


class _PartsSink:
    """A write-only file for ``pa.PythonFile`` that keeps large buffers as views, not copies.

    The IPC writer passes a record batch's body buffers as Arrow buffers over the tensors' own
    memory and everything else (framing, flatbuffers, padding) as small ``bytes``.
    """

    closed = False

    def __init__(self) -> None:
        self._parts: list[Buffer] = []
        self._run = bytearray()
        self._position = 0

    def write(self, data: Any) -> int:
        """Take one piece of the stream (bytes, or an Arrow buffer over tensor memory)."""
        view = memoryview(data).cast("B")
        if view.nbytes < _INLINE_BYTES:
            self._run += view
        else:
            if self._run:
                self._parts.append(bytes(self._run))
                self._run.clear()
            self._parts.append(view)
        self._position += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        """Bytes written so far."""
        return self._position

    def flush(self) -> None:
        """Nothing is buffered outside ``parts``."""

    def close(self) -> None:
        """Nothing to release."""

    def parts(self) -> list[Buffer]:
        """Everything written, in order."""
        if self._run:
            self._parts.append(bytes(self._run))
            self._run.clear()
        return self._parts


def _read_flatbuffer(metadata: memoryview, fmt: str, position: int) -> int:
    if not 0 <= position <= len(metadata) - struct.calcsize(fmt):
        raise FrameError("Arrow message metadata points outside itself")
    return struct.unpack_from(fmt, metadata, position)[0]


def _table_field(metadata: memoryview, table: int, index: int) -> int | None:
    """Position of field ``index`` of the flatbuffer table at ``table``; None when absent."""
    vtable = table - _read_flatbuffer(metadata, "<i", table)
    slot = 4 + 2 * index
    if slot + 2 > _read_flatbuffer(metadata, "<H", vtable):
        return None
    offset = _read_flatbuffer(metadata, "<H", vtable + slot)
    return table + offset if offset else None


def _is_compressed(metadata: memoryview) -> bool:
    """Whether a record-batch message's metadata declares body compression.

    Flatbuffer walk: root table Message, its field 2 (header) -> RecordBatch, its field 3
    (compression). Arrow has verified the flatbuffer already; every read is bounds-checked anyway.
    """
    header_slot = _table_field(metadata, _read_flatbuffer(metadata, "<I", 0), 2)
    if header_slot is None:
        raise FrameError("Arrow record batch message has no header")
    header = header_slot + _read_flatbuffer(metadata, "<I", header_slot)
    return _table_field(metadata, header, 3) is not None


def _parse_shape(text: bytes) -> tuple[int, ...]:
    shape = json.loads(text.decode("ascii"))
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d < (1 << 63) for d in shape)
    ):
        raise FrameError(
            f"tensor shape {text[:100]!r} is not a JSON list of at most {MAX_NDIM} sizes >= 0"
        )
    return tuple(shape)


def _next_message(reader: pa.BufferReader, kind: str) -> pa.ipc.Message:
    import pyarrow as pa

    try:
        message = pa.ipc.read_message(reader)
    except EOFError:
        raise FrameError(f"Arrow payload ends before its {kind} message") from None
    if message.type != kind:
        raise FrameError(f"Arrow payload has a {message.type} message where a {kind} belongs")
    return message


class ArrowSerializer(Serializer):
    """Tensors <-> one Arrow IPC stream (see the module docstring for the layout)."""

    def __init__(self, settings: ArrowSettings) -> None:
        self.settings = settings

    # ------------------------------------------------------------------ encode

    def encode(self, tensors: Sequence[torch.Tensor]) -> list[Buffer]:
        """Encode ``tensors`` as stream pieces; contiguous CPU tensors are sent from their own
        memory (others are made contiguous on their device, then copied to the host)."""
        import pyarrow as pa

        if not tensors:
            return []
        if len(tensors) > self.settings.max_tensors:
            raise FrameError(
                f"{len(tensors)} tensors exceed arrow.max_tensors={self.settings.max_tensors}"
            )
        fields, columns = [], []
        for index, tensor in enumerate(tensors):
            wire = self._wire_type_of(tensor)
            flat = tensor.detach().contiguous().cpu().view(wire.carrier).reshape(-1)  # [numel]
            values = pa.Array.from_buffers(
                wire.arrow_type, flat.numel(), [None, pa.py_buffer(flat.numpy())]
            )
            column = pa.Array.from_buffers(
                pa.list_(wire.arrow_type, flat.numel()), 1, [None], children=[values]
            )
            metadata = {
                _DTYPE_KEY: wire.name.encode(),
                _SHAPE_KEY: json.dumps(list(tensor.shape)).encode(),
            }
            fields.append(pa.field(str(index), column.type, nullable=False, metadata=metadata))
            columns.append(column)
        schema = pa.schema(fields)
        sink = _PartsSink()
        with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), schema) as writer:
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
        return sink.parts()

    def _wire_type_of(self, tensor: torch.Tensor) -> _WireType:
        wire = _wire_types_by_dtype().get(tensor.dtype)
        if wire is None:
            carried = ", ".join(_CARRIERS)
            raise FrameError(f"tensors of {tensor.dtype} cannot travel; the wire carries {carried}")
        if tensor.dim() > MAX_NDIM:
            raise FrameError(f"a tensor of {tensor.dim()} dimensions exceeds the wire's {MAX_NDIM}")
        nbytes = tensor.numel() * wire.itemsize
        if nbytes > self.settings.max_tensor_bytes:
            raise FrameTooLarge(
                f"a tensor of {nbytes} bytes exceeds arrow.max_tensor_bytes={self.settings.max_tensor_bytes}"
            )
        if tensor.numel() > _MAX_NUMEL:
            raise FrameTooLarge(
                f"a tensor of {tensor.numel()} elements exceeds Arrow's {_MAX_NUMEL} per list"
            )
        return wire

    # ------------------------------------------------------------------ decode

    def decode(self, payload: memoryview) -> list[torch.Tensor]:
        """Decode a payload into read-only views of it (a copy only where a buffer is misaligned).

        Raises ``FrameError`` for anything malformed, whatever the bytes.
        """
        if memoryview(payload).nbytes == 0:
            return []
        try:
            return self._decode(payload)
        except FrameError:
            raise
        except Exception as exc:  # pyarrow, torch, json, struct: whatever hostile bytes provoke
            raise FrameError(f"malformed Arrow payload: {type(exc).__name__}: {exc}") from exc

    def _decode(self, payload: memoryview) -> list[torch.Tensor]:
        import pyarrow as pa

        source = pa.py_buffer(payload)  # no copy: every Arrow buffer below slices the payload
        reader = pa.BufferReader(source)
        schema = pa.ipc.read_schema(_next_message(reader, "schema"))
        if not 1 <= len(schema) <= self.settings.max_tensors:
            raise FrameError(
                f"Arrow payload has {len(schema)} columns; 1 to arrow.max_tensors="
                f"{self.settings.max_tensors} are allowed"
            )
        columns = [self._check_field(field) for field in schema]
        message = _next_message(reader, "record batch")
        if _is_compressed(memoryview(message.metadata)):
            raise FrameError("compressed Arrow record batches are refused")
        trailer = source.slice(reader.tell())
        if trailer.size != len(_END_OF_STREAM) or trailer.to_pybytes() != _END_OF_STREAM:
            raise FrameError("the Arrow record batch must be followed by the end-of-stream marker only")
        batch = pa.ipc.read_record_batch(message, schema)
        batch.validate(full=True)
        if batch.num_rows != 1:
            raise FrameError(f"Arrow record batch has {batch.num_rows} rows, not 1")
        with warnings.catch_warnings():
            # torch warns for every view of a read-only buffer; these views are read-only by contract
            warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING, category=UserWarning)
            return [_tensor_of(array, column) for array, column in zip(batch.columns, columns)]

    def _check_field(self, field: pa.Field) -> _Column:
        import pyarrow as pa

        metadata = field.metadata or {}
        dtype_name = metadata.get(_DTYPE_KEY, b"").decode("ascii")
        wire = _wire_types().get(dtype_name)
        if wire is None:
            raise FrameError(
                f"column {field.name!r}: dtype {dtype_name[:40]!r} is not one the wire carries"
            )
        if not pa.types.is_fixed_size_list(field.type) or field.type.value_type != wire.arrow_type:
            raise FrameError(f"column {field.name!r}: {field.type} cannot hold {wire.name} values")
        shape = _parse_shape(metadata.get(_SHAPE_KEY, b""))
        numel = math.prod(shape)
        if numel != field.type.list_size:
            raise FrameError(
                f"column {field.name!r}: shape {list(shape)} holds {numel} values, "
                f"its Arrow type {field.type.list_size}"
            )
        if numel * wire.itemsize > self.settings.max_tensor_bytes:
            raise FrameTooLarge(
                f"column {field.name!r}: {numel * wire.itemsize} bytes exceed "
                f"arrow.max_tensor_bytes={self.settings.max_tensor_bytes}"
            )
        return _Column(wire, shape, numel)


def _tensor_of(array: pa.FixedSizeListArray, column: _Column) -> torch.Tensor:
    """A view of one validated column's data, shaped and typed as its metadata says."""
    import torch

    values = array.values
    if array.null_count or values.null_count or array.offset or values.offset:
        raise FrameError(f"Arrow column of {column.wire.name} has nulls or an offset")
    if len(values) != column.numel:
        raise FrameError(f"Arrow column of {column.wire.name} holds {len(values)} values, not {column.numel}")
    if column.numel == 0:
        return torch.empty(column.shape, dtype=column.wire.dtype)
    data = values.buffers()[1]
    if data is None or data.size != column.numel * column.wire.itemsize:
        raise FrameError(
            f"Arrow column of {column.numel} {column.wire.name} values has a data buffer of another size"
        )
    flat = torch.frombuffer(memoryview(data), dtype=column.wire.carrier)  # [numel]
    if flat.data_ptr() % column.wire.itemsize:
        flat = flat.clone()  # kernels may assume dtype-aligned data; only a foreign writer misaligns
    if column.wire.dtype is torch.bool and int(flat.max()) > 1:
        raise FrameError("a bool tensor holds bytes other than 0 and 1")
    return flat.view(column.wire.dtype).view(column.shape)


@hookimpl
def djinn_register_strategies(registry: StrategyRegistry) -> None:
    """Offer the ``arrow`` serializer."""
    registry.add("serializer", "arrow", ArrowSerializer, settings=ArrowSettings)
