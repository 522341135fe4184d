"""The whole configuration: a parsed ``plugins.toml`` into frozen attrs records, validated at load.

The kernel's tables (``[plugins]``, ``[memory]``'s budgets) and the validation of a table are the
kernel's (``djinn.kernel.config``); this module adds the server's and the model's tables and the
engine's ``[memory]`` keys, and reads a whole document into a ``DjinnConfig`` (``parse_config``) and
back (``DjinnConfig.to_dict``). Every error names the file, the table and the key, and the allowed
keys or values. The repository's ``plugins.toml`` equals the built-in defaults and says what each
key does; the CLI finds and reads the file (``djinn.cli.load_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
from attrs.validators import ge, gt, in_

from djinn.kernel import config as kernel_config
from djinn.kernel.config import KernelConfig, PluginSelection, build_settings
from djinn.kernel.errors import ConfigError


@attrs.frozen
class ServerSettings:
    """Where the server listens, how much it accepts, and how the engine batches its steps."""

    host: str = "127.0.0.1"
    port: int = attrs.field(default=7070, validator=ge(0))
    #: Prometheus ``/metrics`` and JSON ``/metrics/vmu``; 0 disables the endpoint
    metrics_port: int = attrs.field(default=9095, validator=ge(0))
    #: the OpenAI-compatible HTTP API (and /health, /metrics); 0 disables it
    http_port: int = attrs.field(default=8000, validator=ge(0))
    #: an HTTP API session unused this long is closed and its KV freed
    http_session_ttl_s: float = attrs.field(default=600.0, validator=gt(0))
    max_frame_mb: int = attrs.field(default=1024, validator=gt(0))
    #: a paused forward pass abandoned this long is cleaned up and its memory returned
    pause_timeout_s: float = attrs.field(default=300.0, validator=gt(0))
    #: a connection that has not sent its HELLO this long after connecting is closed
    hello_timeout_s: float = attrs.field(default=10.0, validator=gt(0))
    #: requests of one connection served at once; its further frames wait unread until one ends
    max_requests_per_connection: int = attrs.field(default=256, validator=gt(0))
    #: while serving, the garbage collector skips what start-up left alive (``gc.freeze``)
    freeze_gc_heap: bool = True
    #: how often the scheduler's ``on_tick`` runs (timed prefetch, idle fallback)
    tick_s: float = attrs.field(default=0.05, validator=gt(0))
    #: prompt tokens per engine step: smaller stalls the decoders less, larger reads the weights less often
    prefill_chunk_tokens: int = attrs.field(default=2048, validator=gt(0))
    #: prompt tokens per engine step while decode rows wait for it (0: ``prefill_chunk_tokens``)
    prefill_tokens_while_decoding: int = attrs.field(default=0, validator=ge(0))
    #: sessions decoded together in one step at most
    max_batch: int = attrs.field(default=256, validator=gt(0))
    #: capture decode steps as CUDA graphs (one per padded batch size and KV span)
    cuda_graphs: bool = True
    #: larger decode steps run eagerly (their launch overhead is small beside their work)
    graph_max_batch: int = attrs.field(default=512, validator=gt(0))
    #: how batched decode steps attend: "paged" (each row reads its own KV blocks, a compiled
    #: flex_attention kernel), "masked" (SDPA over all slots under a mask), "auto" (paged on CUDA)
    decode_attention: str = attrs.field(default="auto", validator=in_(("auto", "paged", "masked")))
    #: how prefill chunks attend: "varlen" (each over its own session's keys, PyTorch's variable-length
    #: flash attention; CUDA, bf16/fp16), "masked" (under a dense mask over the pass), "auto" (varlen there)
    prefill_attention: str = attrs.field(default="auto", validator=in_(("auto", "varlen", "masked")))
    #: paged decode steps of rotary families (llama, mistral, qwen2) run one fused, compiled layer (CUDA)
    fused_decode: bool = True
    #: prefill passes of rotary families run a fused layer, two compiled stretches around the
    #: attention (CUDA; pauses inside a layer still work)
    fused_prefill: bool = True
    #: a step's prefill chunks and decode rows run as one pass, which reads the weights once (CUDA)
    mixed_steps: bool = True
    #: a session's greedy tokens do not depend on its batch, breakpoints, evictions or chunking (slower)
    deterministic: bool = False


@attrs.frozen
class ModelSettings:
    """The model every session of this server shares."""

    name: str = "random:tiny-llama"
    dtype: str = attrs.field(default="float32", validator=in_(("float32", "bfloat16", "float16")))
    device: str = attrs.field(default="auto", validator=in_(("auto", "cpu", "cuda")))
    seed: int = 0
    #: how decoder-layer weight matrices are stored: "auto" (in ``dtype``) or "fp8_e4m3" (e4m3 with a
    #: scale per output channel: half the bytes of bf16; served by the ringbuffer streamer)
    weight_dtype: str = attrs.field(default="auto", validator=in_(("auto", "fp8_e4m3")))


@attrs.frozen
class MemorySettings(kernel_config.MemorySettings):
    """The whole ``[memory]`` table: the kernel's budgets, and the engine's KV pool and workspace."""

    #: KV is allocated in blocks of this many tokens
    kv_block_tokens: int = attrs.field(default=64, validator=gt(0))
    #: GPU memory kept out of the KV pool for activations and captured graphs (CUDA only)
    workspace_gb: float = attrs.field(default=1.5, validator=ge(0))
    #: how the KV pool stores keys and values: auto (the model's dtype) | fp8_e4m3 (one byte each)
    kv_dtype: str = attrs.field(default="auto", validator=in_(("auto", "fp8_e4m3")))


@attrs.frozen
class DjinnConfig(KernelConfig):
    """The whole effective configuration: the kernel's tables, the server's and the model's."""

    #: the tables a file may hold, in the order the file lists them
    TABLES: ClassVar[Mapping[str, type]] = {
        "plugins": PluginSelection, "server": ServerSettings, "model": ModelSettings, "memory": MemorySettings,
    }

    server: ServerSettings = ServerSettings()
    model: ModelSettings = ModelSettings()
    memory: MemorySettings = MemorySettings()

    def to_dict(self) -> dict[str, Any]:
        """The configuration as TOML-ready tables in ``TABLES`` order, then ``settings`` (tuples as
        lists, no ``source``)."""
        data = attrs.asdict(self, filter=lambda field, _value: field.name != "source",
                            value_serializer=lambda _inst, _field, v: list(v) if isinstance(v, tuple) else v)
        return {name: data[name] for name in (*self.TABLES, "settings")}


def parse_config(data: Mapping[str, Any], *, source: str) -> DjinnConfig:
    """Validate a parsed TOML document into a ``DjinnConfig``."""
    return DjinnConfig(source=source, **parse_tables(data, DjinnConfig.TABLES, source=source))


def parse_tables(data: Mapping[str, Any], tables: Mapping[str, type], *, source: str) -> dict[str, Any]:
    """Validate a parsed TOML document: each table named in ``tables`` into its attrs class, and
    ``[settings]`` kept as one raw table per plugin. The result is keyword arguments for a
    ``DjinnConfig`` (or a record extending it) whose ``TABLES`` are ``tables``, ``source`` aside."""
    parsed: dict[str, Any] = {}
    for name, table in data.items():
        if name == "settings":
            continue
        if name not in tables:
            allowed = ", ".join([*sorted(tables), "settings"])
            raise ConfigError(f"{source}: unknown table [{name}]; allowed tables: {allowed}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        parsed[name] = build_settings(tables[name], table, source=source, where=name)
    settings = data.get("settings", {})
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        raise ConfigError(f"{source}: [settings] must hold one table per plugin, e.g. [settings.semantic]")
    return {**parsed, "settings": settings}
