"""The ``ringbuffer`` streamer: serve layers larger than device memory through a ring.

``prepare`` gets the device bytes the engine leaves for decoder layers (``budget_bytes``: the
GPU budget less the embeddings, final norm and head, which the runner keeps on the device). It
keeps a KV reserve out of them (``kv_reserve_fraction`` or ``kv_reserve_gb``) and splits the rest:
the first layers that fit stay on the device for good (never streamed), and the others stream
through a ring of at most ``prefetch_layers + 1`` of them, sized from what the resident layers
leave. More resident layers win over a larger ring, down to a ring of two layers (copy one while
the other computes), then of one: every resident layer is bytes a pass no longer copies, while a
ring beyond double buffering only deepens the prefetch. Without a budget every layer streams.

The streamed layers' parameters and buffers are packed, layer by layer in execution order, into
ONE host arena (pinned under CUDA), and each CPU tensor's ``.data`` is re-pointed at its view
there, so host memory holds those weights once. ONE device ring is allocated next and never
again. Each streamed layer has a fixed place in the ring, planned once: layers follow each other
and a layer that does not fit in the tail starts at offset 0 (it never wraps).

During a pass each streamed layer is copied into its place chunk by chunk on a dedicated copy
stream, up to ``prefetch_layers`` streamed layers ahead of the next one to compute (so copies
begin while the resident layers compute). Two events per streamed layer order the streams
without host syncs: ``ready`` (copy done; the compute stream waits on it in ``before_layer``)
and ``release`` (the compute stream has passed the layer; recorded in ``after_layer``; the copy
stream waits on it before overwriting that region). A copy is only issued once every layer it
would overwrite has recorded its release in this pass, because waiting on an event that has not
been recorded yet waits for nothing.

Without CUDA the same code copies synchronously into a CPU ring, and results are bitwise those
of the ``resident`` streamer.

fp8 weights (a model loaded with ``[model] weight_dtype = "fp8_e4m3"``): a module whose ``weight``
is ``torch.float8_e4m3fn`` ``[out, in]`` carries a float32 buffer ``weight_scale`` ``[out]``, and
stands for ``weight.to(dtype) * weight_scale[:, None]`` in the dtype of the layer's other
parameters. The arena, the ring and the resident layers hold the fp8 bytes and the scales, so a
pass copies half the bytes of bf16. ``fp8_matmul`` says how they meet the activations.
"dequantize": in ``before_layer``, on the compute stream, each fp8 weight of the layer is expanded
into ONE device working buffer (sized for the largest layer, allocated at ``prepare``, counted in
the budget) and the module's weight points there while the layer runs; every kernel after that is
the model's own. "scaled_mm": the projections run ``torch._scaled_mm`` on the fp8 weights
themselves, the activations quantized to e4m3 per row (one scale per token): no working buffer
and no expansion, an extra rounding of the activations, and on CUDA it needs compute capability
8.9 or later (Hopper, Ada). It is not batch-invariant: leave it off in deterministic mode.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from djinn.arena import allocate_host_arena, typed_view
from djinn.kernel.errors import ModelError
from djinn.kernel.hookspecs import hookimpl
from djinn.engine.streaming import Streamer, StreamerStats

if TYPE_CHECKING:
    import torch

    from djinn.kernel.plugins import StrategyRegistry

MIB = 1 << 20
GIB = 1 << 30
#: every tensor and every layer starts at a multiple of this in the arena and in the ring: a
#: multiple of every dtype's size (for typed views) and of what vectorised CUDA loads expect
ALIGN = 256


def _round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def chunk_bytes(chunk_mb: float) -> int:
    """Bytes of one copy for ``chunk_mb`` MiB: a multiple of ``ALIGN``, at least one."""
    return max(ALIGN, int(chunk_mb * MIB) // ALIGN * ALIGN)


def _positive_number(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, not {value!r}")


def _check_chunk_mb(instance: object, attribute: attrs.Attribute, value: object) -> None:
    _positive_number(value, attribute.name)


def _check_ring_mb(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if value is not None:
        _positive_number(value, attribute.name)


def _check_prefetch(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an integer, not {value!r}")
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value!r}")


def _check_resident_layers(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if value is not None:
        _check_prefetch(instance, attribute, value)


#: how fp8 weights meet the activations (see the module docstring)
FP8_MATMULS = ("dequantize", "scaled_mm")


def _check_fraction(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{attribute.name} must be a number, not {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"{attribute.name} must be in [0, 1), not {value!r}")


def _check_reserve_gb(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{attribute.name} must be a number, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{attribute.name} must be a finite number >= 0, not {value!r}")


@attrs.frozen
class RingbufferSettings:
    """``[settings.ringbuffer]``.

    ``chunk_mb``: size of one host-to-device copy (MiB). ``ring_mb``: ring size (MiB); None
    sizes it from the budget left after the resident layers (at most ``prefetch_layers + 1``
    layers; the whole model when there is no budget). ``prefetch_layers``: how many streamed
    layers may be in flight ahead of the next one to compute. ``reuse``: skip copying a layer
    whose bytes are still in its place in the ring from an earlier pass (weights are read-only).
    ``resident_layers``: at most this many leading layers stay on the device (None: as many as
    fit; 0: stream every layer). ``kv_reserve_fraction``: the share of the layer budget left
    free for the KV cache; ``kv_reserve_gb`` (GiB), when set, replaces it with a fixed size.
    ``progress``: show a progress bar on stderr while layers are packed and placed (None: only
    when stderr is a terminal). ``fp8_matmul``: for fp8 weights, "dequantize" them into a working
    buffer after their copy, or run the GEMMs on them with ``torch._scaled_mm`` ("scaled_mm").
    """

    chunk_mb: float = attrs.field(default=64.0, validator=_check_chunk_mb)
    ring_mb: float | None = attrs.field(default=None, validator=_check_ring_mb)
    prefetch_layers: int = attrs.field(default=2, validator=_check_prefetch)
    reuse: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    resident_layers: int | None = attrs.field(default=None, validator=_check_resident_layers)
    kv_reserve_fraction: float = attrs.field(default=0.25, validator=_check_fraction)
    kv_reserve_gb: float | None = attrs.field(default=None, validator=_check_reserve_gb)
    progress: bool | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(bool))
    )
    fp8_matmul: str = attrs.field(default="dequantize", validator=attrs.validators.in_(FP8_MATMULS))


@attrs.frozen
class Placement:
    """Where one layer sat in the ring during a pass, and whether it was copied there."""

    layer: int
    offset: int
    nbytes: int
    copied: bool


@attrs.frozen(eq=False)
class _Slot:
    """One parameter or buffer: the object the layer uses and its two homes."""

    tensor: torch.Tensor  # the module's own Parameter/buffer; only its .data is swapped
    host: torch.Tensor  # its view in the host arena
    ring: torch.Tensor  # its view in the ring, at the layer's place


@attrs.frozen(eq=False)
class _Fp8Weight:
    """One fp8 weight of a layer, where the layer reads it on the device, and its expansion."""

    param: torch.Tensor  # the module's weight Parameter; only its .data is swapped
    source: torch.Tensor  # [out, in] fp8 on the device: its ring view, or itself when resident
    scale: torch.Tensor  # [out] float32 on the device, beside it
    work: torch.Tensor  # [out, in] its view of the working buffer, in the compute dtype


@attrs.frozen(eq=False)
class _LayerPlan:
    """One streamed layer: where it lives in the arena and in the ring."""

    layer: int  # its index among all the layers
    host_offset: int
    nbytes: int  # bytes copied per pass (padding between tensors included)
    ring_offset: int
    slots: tuple[_Slot, ...]
    overlaps: tuple[int, ...]  # other layers whose ring places intersect this one's


def _overlaps(offsets: list[int], sizes: list[int]) -> list[tuple[int, ...]]:
    """For each layer, the other layers whose ring ranges intersect its own."""
    return [
        tuple(
            other
            for other, (other_start, other_size) in enumerate(zip(offsets, sizes))
            if other != index
            and size
            and other_size
            and other_start < start + size
            and start < other_start + other_size
        )
        for index, (start, size) in enumerate(zip(offsets, sizes))
    ]


def _layer_tensors(layer: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers of ``layer``, each shared tensor once, in registration order."""
    unique: dict[int, torch.Tensor] = {}
    for tensor in (*layer.parameters(), *layer.buffers()):
        unique.setdefault(id(tensor), tensor)
    return list(unique.values())


def _fp8_modules(layer: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """The modules of ``layer`` whose weight is stored in fp8; ``ModelError`` on an fp8 tensor
    that is not such a weight beside its ``weight_scale``."""
    import torch

    found = []
    for module in layer.modules():
        own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        stray = [n for n, t in own.items() if _is_fp8(t) and n != "weight"]
        if stray:
            raise ModelError(f"{name}: fp8 tensors {stray} of a {type(module).__name__} are not weights with scales")
        weight, scale = own.get("weight"), own.get("weight_scale")
        if weight is None or not _is_fp8(weight):
            continue
        if scale is None or scale.dtype != torch.float32 or scale.shape != weight.shape[:1]:
            raise ModelError(
                f"{name}: a {type(module).__name__} has an fp8 weight of shape {tuple(weight.shape)} "
                f"without a float32 weight_scale of shape ({weight.shape[0]},) beside it"
            )
        found.append(module)
    return found


def _is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype.is_floating_point and tensor.element_size() == 1


def _compute_dtype(layer: torch.nn.Module, name: str, fp8: list[torch.nn.Module]) -> torch.dtype:
    """The dtype of ``layer``'s floating-point tensors other than its fp8 weights (``fp8``) and
    their scales: the dtype those weights expand to."""
    skip = {id(t) for module in fp8 for t in (module.weight, module.weight_scale)}
    dtypes = {
        t.dtype for t in (*layer.parameters(), *layer.buffers()) if t.dtype.is_floating_point and id(t) not in skip
    }
    if len(dtypes) != 1:
        raise ModelError(
            f"{name} holds fp8 weights beside tensors of dtypes {sorted(map(str, dtypes))}; the "
            f"ringbuffer streamer expands fp8 weights to the one dtype of the layer's other tensors"
        )
    return dtypes.pop()


def _scaled_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s projection of ``x`` ``[..., in]`` as one fp8 GEMM: ``x`` is quantized to e4m3
    per row, then ``torch._scaled_mm`` applies the row scales and the weight's channel scales."""
    import torch

    weight, scale = module.weight, module.weight_scale  # [out, in] fp8, [out] float32
    fp8_max = torch.finfo(weight.dtype).max
    rows = x.reshape(-1, x.shape[-1]).float()  # [M, in]
    amax = rows.abs().amax(dim=1, keepdim=True)  # [M, 1]
    row_scale = torch.where(amax > 0, amax / fp8_max, 1.0)  # [M, 1]
    quantized = (rows / row_scale).clamp_(-fp8_max, fp8_max).to(weight.dtype)  # [M, in]
    # the weight's transpose is column-major, the layout the fp8 GEMM takes as its second operand
    out = torch._scaled_mm(
        quantized, weight.t(), scale_a=row_scale, scale_b=scale[None, :], out_dtype=x.dtype
    )  # [M, out]
    if module.bias is not None:
        out = out + module.bias
    return out.view(*x.shape[:-1], weight.shape[0])


def _check_scaled_mm(device: torch.device) -> None:
    """``ModelError`` unless ``torch._scaled_mm`` runs on ``device``: probed once on a 16 x 16
    problem, so an unsupported device fails at start-up rather than in the first request."""
    import torch

    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ModelError(
            f"fp8_matmul = 'scaled_mm' needs a GPU of compute capability 8.9 or later; {name} is "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}: use fp8_matmul = 'dequantize'"
        )
    probe = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)  # [16, 16]
    one = torch.ones(16, 1, device=device)  # [16, 1]
    try:
        torch._scaled_mm(probe, probe.t(), scale_a=one, scale_b=one.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:
        raise ModelError(
            f"fp8_matmul = 'scaled_mm': torch._scaled_mm does not run on {device} with torch "
            f"{torch.__version__} ({str(exc).splitlines()[0]}); use fp8_matmul = 'dequantize'"
        ) from None


@functools.cache
def _malloc_trim() -> Callable[[], None]:
    """A function that gives the host memory freed so far back to the system (glibc's
    ``malloc_trim``; a no-op elsewhere). Tensors below malloc's mmap threshold (which rises as
    large blocks are freed) live in its heap, and the heap keeps what they free: without this,
    packing a model's layers into the arena would hold them twice."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


@contextlib.contextmanager
def _progress(show: bool | None, total: int, description: str) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr over ``total`` steps (None: only when stderr is a terminal);
    yields the function that advances it by one."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


class _Clock:
    """Sums durations by kind: host time without CUDA, CUDA event time with it.

    CUDA durations are read only once their end event has completed (``query``, never a host
    sync), so totals cover finished GPU work.
    """

    def __init__(self, use_cuda: bool) -> None:
        self.use_cuda = use_cuda
        self.seconds: dict[str, float] = {"copy": 0.0, "stall": 0.0, "pass": 0.0}
        self.nbytes: dict[str, int] = {"copy": 0, "stall": 0, "pass": 0}
        self._pending: list[tuple[str, Any, Any, int]] = []

    def start(self, stream: Any) -> Any:
        """Mark the start of a timed span on ``stream`` (None without CUDA)."""
        if not self.use_cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def stop(self, token: Any, stream: Any, kind: str, nbytes: int = 0) -> None:
        """End the span begun with ``token``; it counts ``nbytes`` towards ``kind``."""
        if not self.use_cuda:
            self.seconds[kind] += time.perf_counter() - token
            self.nbytes[kind] += nbytes
            return
        import torch

        end = torch.cuda.Event(enable_timing=True)
        end.record(stream)
        self._pending.append((kind, token, end, nbytes))

    def harvest(self) -> None:
        """Add the spans whose GPU work has finished."""
        waiting = []
        for kind, start, end, nbytes in self._pending:
            if end.query():
                self.seconds[kind] += start.elapsed_time(end) / 1000.0
                self.nbytes[kind] += nbytes
            else:
                waiting.append((kind, start, end, nbytes))
        self._pending = waiting


class RingbufferStreamer(Streamer):
    """Keeps the leading layers that fit on the device and streams the others through one ring.

    ``chunk_bytes`` (from ``chunk_mb``) only decides how each layer's copy is split, and is read
    at every copy: a benchmark may change it between passes of one prepared streamer.
    """

    streams_weights = True

    def __init__(self, settings: RingbufferSettings | None = None) -> None:
        self.settings = settings or RingbufferSettings()
        self.chunk_bytes = chunk_bytes(self.settings.chunk_mb)
        self._prepared = False
        self._plans: list[_LayerPlan] = []  # the streamed layers, in layer order
        self._position: list[int | None] = []  # per layer: its index in _plans (None: resident)
        self._upcoming: list[int] = []  # per layer: the first streamed position at or after it
        self._layer_nbytes: list[int] = []  # per layer: its bytes, padding between tensors included
        self.resident_layers = 0  # the leading layers kept on the device
        self._resident_bytes = 0
        self._fp8: list[tuple[_Fp8Weight, ...]] = []  # per layer: its weights to expand (dequantize)
        self._work: torch.Tensor | None = None  # [work_bytes] uint8, device: fp8 weights expanded
        self._arena: torch.Tensor | None = None  # [arena_bytes] uint8, host
        self._ring: torch.Tensor | None = None  # [ring_bytes] uint8, device
        self._device: torch.device | None = None
        self._use_cuda = False
        self._copy_stream: Any = None
        self._compute_stream: Any = None
        # the per-pass state below is indexed by streamed position, not by layer
        self._ready: list[Any] = []  # its copy into the ring is done
        self._release: list[Any] = []  # compute has passed it
        self._valid: list[bool] = []  # its bytes are (being) copied to its place
        self._in_use: list[bool] = []  # staged in this pass, release not recorded yet
        self._copied: list[bool] = []  # copied (not reused) in this pass
        self._next_issue = 0
        self._in_pass = False
        self._pass_token: Any = None
        self._pass_bytes = 0
        self.placements: list[Placement] = []  # this pass, or the last one once it ended
        self.passes = 0
        self.bytes_streamed = 0
        self.bytes_reused = 0
        self._clock = _Clock(use_cuda=False)

    # ------------------------------------------------------------------ prepare

    def prepare(
        self,
        layers: Sequence[torch.nn.Module],
        device: torch.device,
        budget_bytes: int | None,
    ) -> None:
        """Split ``layers`` between the device and the ring within ``budget_bytes``; keep the
        resident ones on ``device``, pack the others into the host arena, plan their ring
        places, allocate the ring.

        ``budget_bytes`` is the device memory the engine leaves for decoder layers (None: no
        limit; every layer then streams); fp8 weights to expand take their working buffer out of
        it first. ``ModelError``, before any layer is touched, when a streamed layer is larger
        than the ring, the ring does not fit the budget, or fp8 weights are malformed or (with
        ``fp8_matmul = "scaled_mm"``) the device has no fp8 GEMM.
        """
        import torch

        if self._prepared:
            raise RuntimeError("the ringbuffer streamer is already prepared; prepare runs once")
        if not layers:
            raise ModelError("the ringbuffer streamer needs at least one layer")
        device = torch.device(device)
        use_cuda = device.type == "cuda"
        if use_cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())

        layouts = self._layout(layers)
        names = [f"layer {i} ({type(layer).__name__})" for i, layer in enumerate(layers)]
        sizes = [nbytes for nbytes, _ in layouts]
        fp8 = [_fp8_modules(layer, name) for layer, name in zip(layers, names)]
        dequantize = self.settings.fp8_matmul == "dequantize"
        dtypes = [_compute_dtype(layer, name, modules) if modules else None
                  for layer, name, modules in zip(layers, names, fp8)]
        work_bytes = 0
        if any(fp8) and dequantize:
            work_bytes = max(
                sum(_round_up(m.weight.numel() * dtype.itemsize) for m in modules)
                for modules, dtype in zip(fp8, dtypes) if modules
            )
        elif any(fp8):
            _check_scaled_mm(device)
        resident, ring_bytes = self._split(names, sizes, budget_bytes, work_bytes)
        streamed = list(range(resident, len(layers)))
        ring_offsets = (
            self._plan_ring([names[i] for i in streamed], [sizes[i] for i in streamed], ring_bytes)
            if streamed else []
        )
        overlaps = _overlaps(ring_offsets, [sizes[i] for i in streamed])
        host_offsets = []
        arena_bytes = 0
        for i in streamed:
            host_offsets.append(arena_bytes)
            arena_bytes += _round_up(sizes[i])

        kept = sum(sizes[:resident])
        with _progress(
            self.settings.progress, len(layers),
            f"ringbuffer: {resident} layers resident ({kept / GIB:.2f} GiB), {len(streamed)} "
            f"packed into {'pinned ' if use_cuda else ''}host memory ({arena_bytes / GIB:.2f} GiB)",
        ) as advance:
            for layer in layers[:resident]:
                layer.to(device)
                advance()
            ring = torch.empty(ring_bytes, dtype=torch.uint8, device=device)  # [ring_bytes]
            work = torch.empty(work_bytes, dtype=torch.uint8, device=device)  # [work_bytes]
            plans: list[_LayerPlan] = []

            def pack(arena: torch.Tensor) -> None:
                for position, index in enumerate(streamed):
                    host_offset, ring_offset = host_offsets[position], ring_offsets[position]
                    slots = []
                    for tensor, relative in layouts[index][1]:
                        host = typed_view(arena, host_offset + relative, tensor.dtype, tensor.shape)
                        host.copy_(tensor.data)
                        # the module keeps its own tensor objects; the old storage is freed here,
                        # as the arena's pages are first written: host memory holds each layer once
                        tensor.data = host
                        ring_view = typed_view(ring, ring_offset + relative, tensor.dtype, tensor.shape)
                        slots.append(_Slot(tensor=tensor, host=host, ring=ring_view))
                    plans.append(
                        _LayerPlan(
                            layer=index,
                            host_offset=host_offset,
                            nbytes=sizes[index],
                            ring_offset=ring_offset,
                            slots=tuple(slots),
                            overlaps=overlaps[position],
                        )
                    )
                    _malloc_trim()()
                    advance()

            arena = allocate_host_arena(arena_bytes, pinned=use_cuda and arena_bytes > 0, fill=pack)  # [arena_bytes]
        ring_views = {id(slot.tensor): slot.ring for plan in plans for slot in plan.slots}
        self._fp8 = []
        for modules, dtype in zip(fp8, dtypes):
            weights, offset = [], 0
            for module in modules if dequantize else ():
                weight, scale = module.weight, module.weight_scale
                view = typed_view(work, offset, dtype, weight.shape)
                offset += _round_up(view.numel() * dtype.itemsize)
                # a streamed layer's tensors are read from the ring, a resident one's where they are
                source = ring_views.get(id(weight), weight.data)
                weights.append(_Fp8Weight(weight, source, ring_views.get(id(scale), scale), view))
            for module in () if dequantize else modules:
                module.forward = functools.partial(_scaled_linear, module)
            self._fp8.append(tuple(weights))
        self._work = work
        self._plans, self._arena, self._ring, self._device = plans, arena, ring, device
        self._use_cuda = use_cuda
        self._layer_nbytes = sizes
        self.resident_layers = resident
        self._resident_bytes = sum(
            t.numel() * t.element_size() for layer in layers[:resident] for t in _layer_tensors(layer)
        )
        self._position = [None] * resident + list(range(len(streamed)))
        self._upcoming = [min(max(0, i - resident), len(streamed)) for i in range(len(layers))]
        count = len(plans)
        self._valid, self._in_use, self._copied = [False] * count, [False] * count, [False] * count
        self._clock = _Clock(use_cuda)
        if use_cuda:
            self._copy_stream = torch.cuda.Stream(device=device)
            # the ring is written on the copy stream: tell the caching allocator, so that
            # freeing it never hands its memory out while a copy is still in flight
            ring.record_stream(self._copy_stream)
            self._ready = [torch.cuda.Event() for _ in range(count)]
            self._release = [torch.cuda.Event() for _ in range(count)]
        self._prepared = True

    @staticmethod
    def _layout(layers: Sequence[torch.nn.Module]) -> list[tuple[int, list[tuple[torch.Tensor, int]]]]:
        """Per layer: (bytes, [(tensor, offset in the layer)]); ``ModelError`` on shared tensors."""
        owner: dict[int, int] = {}
        layouts = []
        for i, layer in enumerate(layers):
            entries = []
            relative = 0
            for tensor in _layer_tensors(layer):
                if id(tensor) in owner:
                    raise ModelError(
                        f"a tensor of shape {tuple(tensor.shape)} is shared by layers "
                        f"{owner[id(tensor)]} and {i}; the ringbuffer streamer needs each "
                        f"layer to own its weights"
                    )
                owner[id(tensor)] = i
                relative = _round_up(relative)
                entries.append((tensor, relative))
                relative += tensor.numel() * tensor.element_size()
            layouts.append((relative, entries))
        return layouts

    def kv_reserve_bytes(self, budget_bytes: int) -> int:
        """The part of ``budget_bytes`` left free for the KV cache."""
        gb = self.settings.kv_reserve_gb
        if gb is not None:
            return min(budget_bytes, int(gb * GIB))
        return int(budget_bytes * self.settings.kv_reserve_fraction)

    def _reserve_words(self) -> str:
        gb = self.settings.kv_reserve_gb
        if gb is not None:
            return f"kv_reserve_gb={gb}"
        return f"kv_reserve_fraction={self.settings.kv_reserve_fraction}"

    def _split(
        self, names: list[str], sizes: list[int], budget_bytes: int | None, work_bytes: int = 0
    ) -> tuple[int, int]:
        """How many leading layers stay resident, and the ring's bytes, beside ``work_bytes`` of
        fp8 working buffer."""
        settings = self.settings
        padded = [_round_up(size) for size in sizes]
        count = len(sizes)
        if budget_bytes is None:
            if settings.ring_mb is None:
                return 0, sum(padded)
            return 0, int(settings.ring_mb * MIB) // ALIGN * ALIGN
        reserve = self.kv_reserve_bytes(budget_bytes)
        room = budget_bytes - reserve - work_bytes
        work = f" and the fp8 working buffer takes {work_bytes} bytes" if work_bytes else ""
        limit = count if settings.resident_layers is None else min(count, settings.resident_layers)
        kept = [0]
        for size in padded:
            kept.append(kept[-1] + size)

        if settings.ring_mb is not None:
            ring = int(settings.ring_mb * MIB) // ALIGN * ALIGN
            if ring > room:
                raise ModelError(
                    f"ring_mb={settings.ring_mb} asks for a ring of {ring} bytes but the device "
                    f"budget left for decoder layers is {budget_bytes} bytes, {room} bytes once "
                    f"{self._reserve_words()} keeps {reserve} bytes for the KV cache{work}; lower "
                    f"ring_mb or leave it unset"
                )
            resident = max(k for k in range(limit + 1) if kept[k] <= room - ring)
            return resident, ring

        def ring_for(resident: int, layers: int) -> int:
            rest = padded[resident:]
            return min(sum(rest), layers * max(rest)) if rest else 0

        # double buffering first (one layer copies while another computes), then a single layer
        for buffers in sorted({min(2, settings.prefetch_layers + 1), 1}, reverse=True):
            for resident in range(limit, -1, -1):
                if kept[resident] + ring_for(resident, buffers) <= room:
                    left = (room - kept[resident]) // ALIGN * ALIGN
                    return resident, min(left, ring_for(resident, settings.prefetch_layers + 1))
        largest = max(range(count), key=lambda i: sizes[i])
        raise ModelError(
            f"{names[largest]} needs {sizes[largest]} bytes ({sizes[largest] / MIB:.2f} MiB) of "
            f"ring, but the device budget left for decoder layers is {budget_bytes} bytes "
            f"({budget_bytes / GIB:.2f} GiB: the GPU budget less the embeddings, final norm and "
            f"head) and {self._reserve_words()} keeps {reserve} bytes ({reserve / GIB:.2f} GiB) "
            f"of it for the KV cache{work}, leaving {room} bytes ({room / MIB:.2f} MiB); raise [memory] "
            f"gpu_memory_budget_gb or lower the KV reserve in [settings.ringbuffer]"
        )

    @staticmethod
    def _plan_ring(names: list[str], sizes: list[int], ring_bytes: int) -> list[int]:
        """Each layer's ring offset: after the previous one, or at 0 when the tail is short."""
        largest = max(range(len(sizes)), key=lambda i: sizes[i])
        if _round_up(sizes[largest]) > ring_bytes:
            raise ModelError(
                f"{names[largest]} needs {sizes[largest]} bytes "
                f"({sizes[largest] / MIB:.2f} MiB) but the ring holds {ring_bytes} bytes "
                f"({ring_bytes / MIB:.2f} MiB); raise ring_mb or the device budget to at "
                f"least the largest layer"
            )
        offsets = []
        cursor = 0
        for size in sizes:
            if cursor + _round_up(size) > ring_bytes:
                cursor = 0
            offsets.append(cursor)
            cursor += _round_up(size)
        return offsets

    # ------------------------------------------------------------------ one pass

    def begin_pass(self) -> None:
        """Start a pass on the current CUDA stream and prefetch the first streamed layers."""
        self._open_pass()
        self._issue_through(self.settings.prefetch_layers)

    def before_layer(self, index: int) -> None:
        """Make the compute stream wait for layer ``index``'s copy; point it at the ring.

        A resident layer needs nothing, but its turn issues the copies of the streamed layers
        that follow it. Also serves a pass resumed after another one ran in between (a paused
        forward pass): when the next streamed layer is not staged, whatever is staged is
        released and staging restarts there.
        """
        if not self._in_pass:
            self._open_pass()
        position = self._position[index]
        upcoming = self._upcoming[index]
        if upcoming < len(self._plans) and not self._in_use[upcoming] and upcoming != self._next_issue:
            # resumed after another pass, or layers skipped
            self._release_staged()
            self._next_issue = upcoming
        if position is not None and not self._in_use[position] and not self._issue(position):
            # a staged layer holds the place; none is running now, so release them all
            self._release_staged()
            self._issue(position)
        self._issue_through(upcoming + self.settings.prefetch_layers)
        if position is None:
            self._expand(index)
            return
        if self._use_cuda:
            stream = self._compute_stream
            # a reused layer waits too: the pass that copied it may have ended before using it
            token = self._clock.start(stream) if self._copied[position] else None
            stream.wait_event(self._ready[position])
            if token is not None:
                self._clock.stop(token, stream, "stall")
        for slot in self._plans[position].slots:
            slot.tensor.data = slot.ring
        self._expand(index)

    def _expand(self, index: int) -> None:
        """Expand layer ``index``'s fp8 weights into the working buffer (compute stream) and
        point the modules there: ``weight.to(dtype) * weight_scale[:, None]``, rounded once."""
        for weight in self._fp8[index]:
            weight.work.copy_(weight.source).mul_(weight.scale[:, None])
            weight.param.data = weight.work

    def after_layer(self, index: int) -> None:
        """Let the copy stream overwrite layer ``index``'s place once compute has passed it."""
        position = self._position[index]
        if position is None:
            for weight in self._fp8[index]:
                weight.param.data = weight.source
            return
        if not self._in_use[position]:
            raise RuntimeError(f"after_layer({index}) without before_layer({index})")
        for slot in self._plans[position].slots:
            slot.tensor.data = slot.host
        if self._use_cuda:
            self._release[position].record(self._compute_stream)
        self._in_use[position] = False
        self._issue_through(position + 1 + self.settings.prefetch_layers)

    def end_pass(self) -> None:
        """Close the pass: count it and release layers staged but not run."""
        if not self._in_pass:
            raise RuntimeError("end_pass without begin_pass")
        self._release_staged()
        self._clock.stop(self._pass_token, self._compute_stream, "pass", self._pass_bytes)
        self._clock.harvest()
        self._in_pass = False
        self.passes += 1

    def _open_pass(self) -> None:
        import torch

        if not self._prepared:
            raise RuntimeError("the ringbuffer streamer is not prepared")
        self._release_staged()  # a pass that ended without end_pass
        if self._use_cuda:
            self._compute_stream = torch.cuda.current_stream(self._device)
        self._in_pass = True
        self._next_issue = 0
        self._pass_bytes = 0
        self._copied = [False] * len(self._plans)
        self.placements = []
        self._pass_token = self._clock.start(self._compute_stream)

    def _issue_through(self, last: int) -> None:
        """Issue copies in layer order up to streamed position ``last``, stopping at the first
        blocked one."""
        last = min(last, len(self._plans) - 1)
        while self._next_issue <= last and self._issue(self._next_issue):
            pass

    def _issue(self, position: int) -> bool:
        """Stage the streamed layer at ``position`` (copy it, or reuse its bytes); False when its
        place is busy."""
        plan = self._plans[position]
        if self.settings.reuse and self._valid[position]:
            copied = False
            self.bytes_reused += plan.nbytes
        else:
            occupants = [o for o in (*plan.overlaps, position) if self._valid[o]]
            if any(self._in_use[o] for o in occupants):
                return False
            for other in occupants:
                self._valid[other] = False
            self._copy(position, occupants)
            self._valid[position] = True
            copied = True
            self.bytes_streamed += plan.nbytes
            self._pass_bytes += plan.nbytes
        self._in_use[position] = True
        self._copied[position] = copied
        self.placements.append(Placement(plan.layer, plan.ring_offset, plan.nbytes, copied))
        self._next_issue = position + 1
        return True

    def _copy(self, position: int, occupants: list[int]) -> None:
        """Copy the streamed layer at ``position`` into its ring place, chunk by chunk."""
        import torch

        plan = self._plans[position]
        source = self._arena[plan.host_offset : plan.host_offset + plan.nbytes]  # [nbytes]
        target = self._ring[plan.ring_offset : plan.ring_offset + plan.nbytes]  # [nbytes]
        if not self._use_cuda:
            token = self._clock.start(None)
            self._copy_chunks(source, target, non_blocking=False)
            self._clock.stop(token, None, "copy", plan.nbytes)
            return
        stream = self._copy_stream
        with torch.cuda.stream(stream):
            # occupants only ever lose their place once their release is recorded (in this
            # pass or an earlier one); older occupants are covered by copy-stream order
            for other in occupants:
                stream.wait_event(self._release[other])
            token = self._clock.start(stream)
            # non_blocking is asynchronous only because the arena is pinned
            self._copy_chunks(source, target, non_blocking=True)
            self._ready[position].record(stream)
            self._clock.stop(token, stream, "copy", plan.nbytes)

    def _copy_chunks(self, source: torch.Tensor, target: torch.Tensor, non_blocking: bool) -> None:
        for start in range(0, source.numel(), self.chunk_bytes):
            end = start + self.chunk_bytes
            target[start:end].copy_(source[start:end], non_blocking=non_blocking)

    def _release_staged(self) -> None:
        """Release layers staged in a pass that did not run them (on the compute stream)."""
        for position, staged in enumerate(self._in_use):
            if staged:
                for slot in self._plans[position].slots:
                    slot.tensor.data = slot.host
                if self._use_cuda:
                    self._release[position].record(self._compute_stream)
                self._in_use[position] = False

    # ------------------------------------------------------------------ figures

    @property
    def ring(self) -> torch.Tensor:
        """The device ring: a 1-D uint8 tensor, allocated once at ``prepare``."""
        if self._ring is None:
            raise RuntimeError("the ringbuffer streamer is not prepared")
        return self._ring

    @property
    def arena(self) -> torch.Tensor:
        """The host arena holding the streamed layers' weights: a 1-D uint8 tensor."""
        if self._arena is None:
            raise RuntimeError("the ringbuffer streamer is not prepared")
        return self._arena

    @property
    def layer_nbytes(self) -> list[int]:
        """Bytes of each layer (resident or streamed), as a copy of it moves them."""
        return list(self._layer_nbytes)

    @property
    def pass_bytes(self) -> int:
        """Bytes a pass streams when it reuses nothing: the streamed layers' bytes."""
        return sum(plan.nbytes for plan in self._plans)

    def ring_bytes(self) -> int:
        """Bytes of the device ring (0 before ``prepare``)."""
        return 0 if self._ring is None else self._ring.numel()

    @property
    def work_bytes(self) -> int:
        """Bytes of the device buffer fp8 weights are expanded into (0: none)."""
        return 0 if self._work is None else self._work.numel()

    def device_bytes(self) -> int:
        """Bytes of the device ring, the resident layers and the fp8 working buffer (0 before
        ``prepare``)."""
        return self.ring_bytes() + self._resident_bytes + self.work_bytes

    def stats(self) -> StreamerStats:
        """Bytes streamed and reused, passes, and times of finished work.

        ``effective_gbps`` is bytes streamed per second of pass; ``copy_gbps`` per second of
        copying. Without CUDA every copy stalls compute, so ``stall_seconds`` is the copy time.
        """
        self._clock.harvest()
        seconds, nbytes = self._clock.seconds, self._clock.nbytes
        stall = seconds["stall"] if self._use_cuda else seconds["copy"]
        return StreamerStats(
            device_bytes=self.device_bytes(),
            ring_bytes=self.ring_bytes(),
            arena_bytes=0 if self._arena is None else self._arena.numel(),
            layers=len(self._layer_nbytes),
            passes=self.passes,
            bytes_streamed=self.bytes_streamed,
            bytes_reused=self.bytes_reused,
            seconds=seconds["pass"],
            copy_seconds=seconds["copy"],
            stall_seconds=stall,
            effective_gbps=_gbps(nbytes["pass"], seconds["pass"]),
            copy_gbps=_gbps(nbytes["copy"], seconds["copy"]),
        )


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


@hookimpl
def djinn_register_strategies(registry: StrategyRegistry) -> None:
    """Offer the ``ringbuffer`` streamer."""
    registry.add("streamer", "ringbuffer", RingbufferStreamer, settings=RingbufferSettings)
