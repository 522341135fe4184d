"""The ``ringbuffer`` streamer: serve layers larger than device memory through a ring.

At ``prepare`` every layer's parameters and buffers are packed, layer by layer in execution
order, into ONE host arena (pinned under CUDA), and each CPU tensor's ``.data`` is re-pointed at
its view there, so host memory holds the weights once. ONE device ring is allocated next and
never again. Each layer has a fixed place in the ring, planned once: layers follow each other
and a layer that does not fit in the tail starts at offset 0 (it never wraps).

During a pass layer ``i`` is copied into its place chunk by chunk on a dedicated copy stream,
up to ``prefetch_layers`` layers ahead of the layer computing. Two events per layer order the
streams without host syncs: ``ready`` (copy done; the compute stream waits on it in
``before_layer``) and ``release`` (the compute stream has passed the layer; recorded in
``after_layer``; the copy stream waits on it before overwriting that region). A copy is only
issued once every layer it would overwrite has recorded its release in this pass, because
waiting on an event that has not been recorded yet waits for nothing.

Without CUDA the same code copies synchronously into a CPU ring, and results are bitwise those
of the ``resident`` streamer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from djinn.arena import allocate_host_arena, typed_view
from djinn.kernel.errors import ModelError
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import Streamer, StreamerStats

if TYPE_CHECKING:
    import torch

    from djinn.kernel.plugins import StrategyRegistry

MIB = 1 << 20
#: every tensor and every layer starts at a multiple of this in the arena and in the ring: a
#: multiple of every dtype's size (for typed views) and of what vectorised CUDA loads expect
ALIGN = 256


def _round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


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


@attrs.frozen
class RingbufferSettings:
    """``[settings.ringbuffer]``.

    ``chunk_mb``: size of one host-to-device copy (MiB). ``ring_mb``: ring size (MiB); None
    takes the device weight budget (capped at the model's size). ``prefetch_layers``: how many
    layers may be in flight ahead of the one computing. ``reuse``: skip copying a layer whose
    bytes are still in its place in the ring from an earlier pass (weights are read-only).
    """

    chunk_mb: float = attrs.field(default=64.0, validator=_check_chunk_mb)
    ring_mb: float | None = attrs.field(default=None, validator=_check_ring_mb)
    prefetch_layers: int = attrs.field(default=2, validator=_check_prefetch)
    reuse: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))


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
class _LayerPlan:
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
    """Streams layer weights from a host arena through one device ring, ahead of compute."""

    streams_weights = True

    def __init__(self, settings: RingbufferSettings | None = None) -> None:
        self.settings = settings or RingbufferSettings()
        self.chunk_bytes = max(ALIGN, int(self.settings.chunk_mb * MIB) // ALIGN * ALIGN)
        self._plans: list[_LayerPlan] = []
        self._arena: torch.Tensor | None = None  # [arena_bytes] uint8, host
        self._ring: torch.Tensor | None = None  # [ring_bytes] uint8, device
        self._use_cuda = False
        self._copy_stream: Any = None
        self._compute_stream: Any = None
        self._ready: list[Any] = []  # per layer: its copy into the ring is done
        self._release: list[Any] = []  # per layer: compute has passed it
        self._valid: list[bool] = []  # the layer's bytes are (being) copied to its place
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
        """Pack ``layers`` into the host arena, plan their ring places, allocate the ring.

        ``ModelError`` when a layer is larger than the ring or the ring exceeds the budget.
        """
        import torch

        if self._plans:
            raise RuntimeError("the ringbuffer streamer is already prepared; prepare runs once")
        if not layers:
            raise ModelError("the ringbuffer streamer needs at least one layer")
        device = torch.device(device)
        self._use_cuda = device.type == "cuda"
        if self._use_cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())

        layouts, arena_bytes = self._layout(layers)
        ring_bytes = self._ring_bytes(arena_bytes, budget_bytes)
        names = [f"layer {i} ({type(layer).__name__})" for i, layer in enumerate(layers)]

        sizes = [nbytes for _, nbytes, _ in layouts]
        ring_offsets = self._plan_ring(names, sizes, ring_bytes)
        overlaps = _overlaps(ring_offsets, sizes)

        arena = allocate_host_arena(arena_bytes, pinned=self._use_cuda)  # [arena_bytes]
        ring = torch.empty(ring_bytes, dtype=torch.uint8, device=device)  # [ring_bytes]
        plans = []
        for i, (host_offset, nbytes, entries) in enumerate(layouts):
            slots = []
            for tensor, relative in entries:
                host = typed_view(arena, host_offset + relative, tensor.dtype, tensor.shape)
                host.copy_(tensor.data)
                # the module keeps its own tensor objects; the old storage is freed here
                tensor.data = host
                ring_view = typed_view(
                    ring, ring_offsets[i] + relative, tensor.dtype, tensor.shape
                )
                slots.append(_Slot(tensor=tensor, host=host, ring=ring_view))
            plans.append(
                _LayerPlan(
                    host_offset=host_offset,
                    nbytes=nbytes,
                    ring_offset=ring_offsets[i],
                    slots=tuple(slots),
                    overlaps=overlaps[i],
                )
            )
        self._plans, self._arena, self._ring = plans, arena, ring
        count = len(plans)
        self._valid, self._in_use, self._copied = [False] * count, [False] * count, [False] * count
        self._clock = _Clock(self._use_cuda)
        if self._use_cuda:
            self._copy_stream = torch.cuda.Stream(device=device)
            # the ring is written on the copy stream: tell the caching allocator, so that
            # freeing it never hands its memory out while a copy is still in flight
            ring.record_stream(self._copy_stream)
            self._ready = [torch.cuda.Event() for _ in range(count)]
            self._release = [torch.cuda.Event() for _ in range(count)]

    @staticmethod
    def _layout(
        layers: Sequence[torch.nn.Module],
    ) -> tuple[list[tuple[int, int, list[tuple[torch.Tensor, int]]]], int]:
        """Per layer: (arena offset, bytes, [(tensor, offset in the layer)]); arena size."""
        owner: dict[int, int] = {}
        layouts = []
        cursor = 0
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
            layouts.append((cursor, relative, entries))
            cursor += _round_up(relative)
        return layouts, cursor

    def _ring_bytes(self, model_bytes: int, budget_bytes: int | None) -> int:
        ring_mb = self.settings.ring_mb
        if ring_mb is None:
            if budget_bytes is None:
                return model_bytes
            return min(model_bytes, budget_bytes // ALIGN * ALIGN)
        ring = int(ring_mb * MIB) // ALIGN * ALIGN
        if budget_bytes is not None and ring > budget_bytes:
            raise ModelError(
                f"ring_mb={ring_mb} asks for a ring of {ring} bytes but the device weight "
                f"budget is {budget_bytes} bytes; lower ring_mb or leave it unset"
            )
        return ring

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
        """Start a pass on the current CUDA stream and prefetch the first layers."""
        self._open_pass()
        self._issue_through(self.settings.prefetch_layers)

    def before_layer(self, index: int) -> None:
        """Make the compute stream wait for layer ``index``'s copy; point it at the ring.

        Also serves a pass resumed after another one ran in between (a paused forward pass):
        when ``index`` is not staged, whatever is staged is released and staging restarts here.
        """
        if not self._in_pass:
            self._open_pass()
        if not self._in_use[index]:
            if index != self._next_issue:  # resumed after another pass, or layers skipped
                self._release_staged()
                self._next_issue = index
            if not self._issue(index):
                # a staged layer holds the place; none is running now, so release them all
                self._release_staged()
                self._issue(index)
        self._issue_through(index + self.settings.prefetch_layers)
        if self._use_cuda:
            stream = self._compute_stream
            # a reused layer waits too: the pass that copied it may have ended before using it
            token = self._clock.start(stream) if self._copied[index] else None
            stream.wait_event(self._ready[index])
            if token is not None:
                self._clock.stop(token, stream, "stall")
        for slot in self._plans[index].slots:
            slot.tensor.data = slot.ring

    def after_layer(self, index: int) -> None:
        """Let the copy stream overwrite layer ``index``'s place once compute has passed it."""
        if not self._in_use[index]:
            raise RuntimeError(f"after_layer({index}) without before_layer({index})")
        for slot in self._plans[index].slots:
            slot.tensor.data = slot.host
        if self._use_cuda:
            self._release[index].record(self._compute_stream)
        self._in_use[index] = False
        self._issue_through(index + 1 + self.settings.prefetch_layers)

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

        if not self._plans:
            raise RuntimeError("the ringbuffer streamer is not prepared")
        self._release_staged()  # a pass that ended without end_pass
        if self._use_cuda:
            self._compute_stream = torch.cuda.current_stream(self._ring.device)
        self._in_pass = True
        self._next_issue = 0
        self._pass_bytes = 0
        self._copied = [False] * len(self._plans)
        self.placements = []
        self._pass_token = self._clock.start(self._compute_stream)

    def _issue_through(self, last: int) -> None:
        """Issue copies in layer order up to layer ``last``, stopping at the first blocked one."""
        last = min(last, len(self._plans) - 1)
        while self._next_issue <= last and self._issue(self._next_issue):
            pass

    def _issue(self, index: int) -> bool:
        """Stage layer ``index`` (copy it, or reuse its bytes); False when its place is busy."""
        plan = self._plans[index]
        if self.settings.reuse and self._valid[index]:
            copied = False
            self.bytes_reused += plan.nbytes
        else:
            occupants = [o for o in (*plan.overlaps, index) if self._valid[o]]
            if any(self._in_use[o] for o in occupants):
                return False
            for other in occupants:
                self._valid[other] = False
            self._copy(index, occupants)
            self._valid[index] = True
            copied = True
            self.bytes_streamed += plan.nbytes
            self._pass_bytes += plan.nbytes
        self._in_use[index] = True
        self._copied[index] = copied
        self.placements.append(Placement(index, plan.ring_offset, plan.nbytes, copied))
        self._next_issue = index + 1
        return True

    def _copy(self, index: int, occupants: list[int]) -> None:
        """Copy layer ``index`` into its ring place, chunk by chunk."""
        import torch

        plan = self._plans[index]
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
            self._ready[index].record(stream)
            self._clock.stop(token, stream, "copy", plan.nbytes)

    def _copy_chunks(self, source: torch.Tensor, target: torch.Tensor, non_blocking: bool) -> None:
        for start in range(0, source.numel(), self.chunk_bytes):
            end = start + self.chunk_bytes
            target[start:end].copy_(source[start:end], non_blocking=non_blocking)

    def _release_staged(self) -> None:
        """Release layers staged in a pass that did not run them (on the compute stream)."""
        for index, staged in enumerate(self._in_use):
            if staged:
                for slot in self._plans[index].slots:
                    slot.tensor.data = slot.host
                if self._use_cuda:
                    self._release[index].record(self._compute_stream)
                self._in_use[index] = False

    # ------------------------------------------------------------------ figures

    @property
    def ring(self) -> torch.Tensor:
        """The device ring: a 1-D uint8 tensor, allocated once at ``prepare``."""
        if self._ring is None:
            raise RuntimeError("the ringbuffer streamer is not prepared")
        return self._ring

    @property
    def arena(self) -> torch.Tensor:
        """The host arena holding every layer's weights: a 1-D uint8 tensor."""
        if self._arena is None:
            raise RuntimeError("the ringbuffer streamer is not prepared")
        return self._arena

    @property
    def layer_nbytes(self) -> list[int]:
        """Bytes copied for each layer when it is streamed."""
        return [plan.nbytes for plan in self._plans]

    def device_bytes(self) -> int:
        """Bytes of the device ring (0 before ``prepare``)."""
        return 0 if self._ring is None else self._ring.numel()

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
            ring_bytes=self.device_bytes(),
            arena_bytes=0 if self._arena is None else self._arena.numel(),
            layers=len(self._plans),
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
