"""The frame codec: what one message between a client and the server looks like in bytes.

A frame is a fixed header, a JSON object of small arguments ("meta") and a payload of tensors::

    offset  size  field
         0     4  magic b"DJN1"
         4     1  version (1)
         5     1  op (``Op``)
         6     2  flags
         8     8  session_id
        16     8  request_id
        24     4  meta_len      bytes of UTF-8 JSON that follow the header
        28     8  payload_len   bytes of serializer output that follow the meta
        36        meta, then payload

All integers are little-endian and unsigned. The encoder pads the meta with spaces (still valid
JSON) so that the payload starts 8-byte aligned within the frame: tensors decoded as views of
the frame buffer are then aligned for their dtype.

Nothing that arrives is unpickled or evaluated: the meta goes through ``json.loads`` only and the
payload through the selected ``Serializer``. ``decode_frame`` raises ``FrameError`` (or its
subclass ``FrameTooLarge``) for every malformed input and no other exception.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from djinn.kernel import errors
from djinn.kernel.errors import DjinnError
from djinn.wire import errors as wire_errors
from djinn.wire.contracts import Buffer, Serializer
from djinn.wire.errors import FrameError, FrameTooLarge

if TYPE_CHECKING:  # the codec itself never touches tensor data
    import torch

MAGIC = b"DJN1"
VERSION = 1
_HEADER = struct.Struct("<4sBBHQQIQ")
HEADER_SIZE = _HEADER.size
#: the payload's offset within a frame is a multiple of this (the largest wire dtype's size)
PAYLOAD_ALIGNMENT = 8

_U16 = 1 << 16
_U64 = 1 << 64


class Op(enum.IntEnum):
    """What a frame asks for or answers."""

    HELLO = 1
    WELCOME = 2
    ERROR = 3
    OK = 4
    OPEN_SESSION = 10
    CLOSE_SESSION = 11
    GENERATE = 12
    SIGNAL_PHASE = 13
    RESULT = 14
    #: tokens of a streaming generate as they are picked, before its RESULT
    TOKEN = 15
    #: a pass paused at a breakpoint: ``layer``, ``at``, ``step``, ``phase``, ``shape``, ``dtype``
    BREAK = 20
    #: read the paused activation (``what``: "stats" or "fetch"), after ``edits`` (see ``Breakpoints``)
    INSPECT = 21
    #: one edit of it: ``op`` "scale" with ``factor``, or "set" / "add" with one tensor
    EDIT = 22
    #: let the paused pass continue, after ``edits``
    RESUME = 23
    STATUS = 30
    PING = 31


def _unsigned(bound: int) -> Any:
    return [attrs.validators.instance_of(int), attrs.validators.ge(0), attrs.validators.lt(bound)]


@attrs.frozen
class Frame:
    """One decoded (or to-be-encoded) message. Decoded tensors are read-only views: clone to write."""

    op: Op = attrs.field(converter=Op)
    session_id: int = attrs.field(default=0, validator=_unsigned(_U64))
    request_id: int = attrs.field(default=0, validator=_unsigned(_U64))
    meta: dict[str, Any] = attrs.field(
        factory=dict, validator=attrs.validators.instance_of(dict)
    )
    tensors: tuple[torch.Tensor, ...] = attrs.field(default=(), converter=tuple)
    flags: int = attrs.field(default=0, validator=_unsigned(_U16))


def _positive(_instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"WireLimits.{attribute.name} must be a positive int, not {value!r}")


@attrs.frozen
class WireLimits:
    """Bounds ``decode_frame`` enforces on every frame it reads."""

    max_meta_bytes: int = attrs.field(default=64 * 1024, validator=_positive)
    max_payload_bytes: int = attrs.field(default=1 << 30, validator=_positive)
    max_tensors: int = attrs.field(default=64, validator=_positive)
    max_json_depth: int = attrs.field(default=16, validator=_positive)


# --------------------------------------------------------------------------- encode


def encode_frame(frame: Frame, serializer: Serializer) -> list[Buffer]:
    """Encode ``frame`` as buffers to send in order: header and meta in one small ``bytes``,
    then the serializer's buffers untouched (tensor data is neither joined nor copied here).

    A frame without tensors has an empty payload. Raises ``FrameError`` when the meta is not
    plain JSON (non-finite floats included).
    """
    try:
        meta = json.dumps(frame.meta, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise FrameError(f"{frame.op.name} frame: meta is not plain JSON: {exc}") from exc
    meta += b" " * (-(HEADER_SIZE + len(meta)) % PAYLOAD_ALIGNMENT)
    payload = serializer.encode(frame.tensors) if frame.tensors else []
    payload_len = sum(memoryview(part).nbytes for part in payload)
    header = _HEADER.pack(
        MAGIC, VERSION, frame.op, frame.flags, frame.session_id, frame.request_id,
        len(meta), payload_len,
    )
    return [header + meta, *payload]


# --------------------------------------------------------------------------- decode


def _byte_view(buf: Buffer) -> memoryview:
    try:
        view = memoryview(buf)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError) as exc:
        raise FrameError(f"a frame must be a contiguous byte buffer: {exc}") from exc


def _unpack_header(view: memoryview) -> tuple[int, int, int, int, int, int]:
    """(op, flags, session_id, request_id, meta_len, payload_len) after checking magic and version."""
    if len(view) < HEADER_SIZE:
        raise FrameError(f"frame of {len(view)} bytes is shorter than its {HEADER_SIZE}-byte header")
    magic, version, op, flags, session_id, request_id, meta_len, payload_len = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}: not a Djinn frame (expected {MAGIC!r})")
    if version != VERSION:
        raise FrameError(f"frame version {version} is not supported (this side speaks {VERSION})")
    return op, flags, session_id, request_id, meta_len, payload_len


def peek_header(buf: Buffer) -> tuple[int, int, int]:
    """``(op, session_id, request_id)`` of a frame whose header is sound, whatever follows it.

    For answering a frame that fails to decode. Checks size, magic and version only; ``op`` is
    an ``Op`` when known and the raw number otherwise. Raises ``FrameError`` for a broken header.
    """
    op, _flags, session_id, request_id, _meta_len, _payload_len = _unpack_header(_byte_view(buf))
    try:
        op = Op(op)
    except ValueError:
        pass
    return op, session_id, request_id


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_depth(meta: dict[str, Any], max_depth: int) -> None:
    pending: list[tuple[Any, int]] = [(meta, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > max_depth:
            raise FrameError(f"frame meta nests deeper than {max_depth} levels")
        children = node.values() if isinstance(node, dict) else node
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _decode_meta(raw: memoryview, limits: WireLimits) -> dict[str, Any]:
    try:
        meta = json.loads(str(raw, "utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"frame meta is not UTF-8 JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise FrameError(f"frame meta must be a JSON object, not {type(meta).__name__}")
    _check_depth(meta, limits.max_json_depth)
    return meta


def decode_frame(buf: Buffer, serializer: Serializer, limits: WireLimits = WireLimits()) -> Frame:
    """Decode and validate one whole frame; ``buf`` must hold exactly one frame.

    Tensors are zero-copy views of ``buf`` where the serializer allows (keep ``buf`` unchanged
    while they live). Raises ``FrameError`` (``FrameTooLarge`` for a limit) for anything wrong,
    and never another exception type, whatever the bytes.
    """
    view = _byte_view(buf)
    op_number, flags, session_id, request_id, meta_len, payload_len = _unpack_header(view)
    try:
        op = Op(op_number)
    except ValueError:
        raise FrameError(f"unknown op {op_number}") from None
    if meta_len > limits.max_meta_bytes:
        raise FrameTooLarge(f"{op.name} frame meta of {meta_len} bytes exceeds {limits.max_meta_bytes}")
    if payload_len > limits.max_payload_bytes:
        raise FrameTooLarge(
            f"{op.name} frame payload of {payload_len} bytes exceeds {limits.max_payload_bytes}"
        )
    announced = HEADER_SIZE + meta_len + payload_len
    if announced != len(view):
        raise FrameError(
            f"{op.name} frame is {len(view)} bytes but its header announces {announced} "
            f"({HEADER_SIZE} header + {meta_len} meta + {payload_len} payload)"
        )
    meta = _decode_meta(view[HEADER_SIZE : HEADER_SIZE + meta_len], limits)
    tensors: list[torch.Tensor] = []
    if payload_len:
        try:
            tensors = serializer.decode(view[HEADER_SIZE + meta_len :])
        except FrameError:
            raise
        except Exception as exc:  # a serializer must raise FrameError; bytes must never crash us
            raise FrameError(f"{op.name} frame payload is malformed: {type(exc).__name__}: {exc}") from exc
    if len(tensors) > limits.max_tensors:
        raise FrameError(
            f"{op.name} frame carries {len(tensors)} tensors; the limit is {limits.max_tensors}"
        )
    return Frame(op, session_id, request_id, meta, tuple(tensors), flags)


# --------------------------------------------------------------------------- errors

#: every error class the kernel and the wire define, by its wire code
_ERRORS_BY_CODE: Mapping[str, type[DjinnError]] = {
    cls.code: cls
    for module in (errors, wire_errors)
    for cls in vars(module).values()
    if isinstance(cls, type) and issubclass(cls, DjinnError)
}


def error_frame(request_id: int, session_id: int, error: BaseException) -> Frame:
    """An ERROR frame answering ``request_id``: ``{"code", "message"}``; code ``internal`` for
    anything that is not a ``DjinnError``."""
    code = error.code if isinstance(error, DjinnError) else "internal"
    return Frame(Op.ERROR, session_id, request_id, {"code": code, "message": str(error)})


def raise_for_error(frame: Frame) -> None:
    """Raise the ``DjinnError`` subclass an ERROR frame names by its code (``DjinnError`` for an
    unknown code); do nothing for any other frame."""
    if frame.op is not Op.ERROR:
        return
    code = frame.meta.get("code")
    cls = _ERRORS_BY_CODE.get(code, DjinnError) if isinstance(code, str) else DjinnError
    raise cls(str(frame.meta.get("message", f"the peer reported an error ({code!r})")))


def check_edit_tensor(kind: str, shape: tuple[int, ...], dtype: torch.dtype, hidden_shape: tuple[int, ...]) -> None:
    """What a ``set`` or ``add`` edit of a paused activation of ``hidden_shape`` may carry: for
    ``set`` a tensor of its shape, for ``add`` one of its shape or a vector of its last dimension,
    floating-point either way. Raises ``BreakpointError``; the client checks before sending, the
    server again on arrival."""
    want = hidden_shape if kind == "set" else (hidden_shape[-1],)
    if shape != want and not (kind == "add" and shape == hidden_shape):
        raise errors.BreakpointError(f"{kind}: shape {shape} does not match {want}")
    if not dtype.is_floating_point:
        raise errors.BreakpointError(f"{kind}: dtype {dtype} is not a floating-point type")
