"""The ``resident`` streamer: every layer lives on the device for the whole run.

The per-layer calls are the base class's no-ops, so a forward pass costs what plain PyTorch
costs. A model that does not fit the device budget is refused when it is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from djinn.kernel.errors import ModelError
from djinn.kernel.hookspecs import hookimpl
from djinn.engine.streaming import Streamer

if TYPE_CHECKING:
    import torch

    from djinn.kernel.plugins import StrategyRegistry

GIB = 1 << 30


@attrs.frozen
class ResidentSettings:
    """``[settings.resident]``: nothing to set."""


def module_nbytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each shared tensor counted once."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ResidentStreamer(Streamer):
    """Moves all layers to the device once, at ``prepare``."""

    def __init__(self, settings: ResidentSettings | None = None) -> None:
        self.settings = settings or ResidentSettings()
        self._device_bytes = 0

    def prepare(
        self,
        layers: Sequence[torch.nn.Module],
        device: torch.device,
        budget_bytes: int | None,
    ) -> None:
        """Move ``layers`` to ``device``; ``ModelError`` when they exceed ``budget_bytes`` or hold
        fp8 weights."""
        fp8 = sorted({
            str(t.dtype) for layer in layers for t in (*layer.parameters(), *layer.buffers())
            if t.dtype.is_floating_point and t.element_size() == 1
        })
        if fp8:
            raise ModelError(
                f"the layers hold {', '.join(fp8)} weights ([model] weight_dtype = 'fp8_e4m3'), which "
                f"the resident streamer cannot run: it leaves each layer to compute in its own dtype. "
                f"Select `--plugins ringbuffer`, which expands fp8 weights on the device as each layer "
                f"runs (with a budget that holds every layer, all of them stay resident in fp8), or "
                f"set weight_dtype = 'auto'"
            )
        need = sum(module_nbytes(layer) for layer in layers)
        if budget_bytes is not None and need > budget_bytes:
            raise ModelError(
                f"the {len(layers)} layers need {need} bytes ({need / GIB:.2f} GiB) of device "
                f"memory but the weight budget is {budget_bytes} bytes "
                f"({budget_bytes / GIB:.2f} GiB); stream them through a ring buffer instead "
                f"with `--plugins ringbuffer`"
            )
        for layer in layers:
            layer.to(device)
        self._device_bytes = need

    def device_bytes(self) -> int:
        """Bytes of the layers held on the device."""
        return self._device_bytes



@hookimpl
def djinn_register_strategies(registry: StrategyRegistry) -> None:
    """Offer the ``resident`` streamer."""
    registry.add("streamer", "resident", ResidentStreamer, settings=ResidentSettings)
