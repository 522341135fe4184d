"""Configuration: a parsed ``plugins.toml`` into frozen attrs records, validated at load.

Every error names the file, the table and the key, and the allowed keys or values. The repository's
``plugins.toml`` equals the built-in defaults and says what each key does; the CLI finds and reads
the file (``djinn.cli.load_config``).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
from attrs.validators import ge, gt, in_

from djinn.kernel.errors import ConfigError


def _names(value: Any) -> tuple[str, ...]:
    """Accept a string or a list of strings for a multi-choice slot."""
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class PluginSelection:
    """Which strategy fills each slot (the names are the plugins' entry-point names)."""

    scheduler: str = "semantic"
    tiers: tuple[str, ...] = attrs.field(default=("pinned_host",), converter=_names)
    #: which tier a KV copy goes to, which copies a full tier demotes, what a restore promotes
    tier_placement: str = "tiered"
    streamer: str = "resident"
    transports: tuple[str, ...] = attrs.field(default=("tcp", "inproc"), converter=_names)
    serializer: str = "arrow"
    extensions: tuple[str, ...] = attrs.field(default=(), converter=_names)

    def names(self) -> tuple[str, ...]:
        """Every selected name, in slot order."""
        return (self.scheduler, *self.tiers, self.tier_placement, self.streamer, *self.transports, self.serializer,
                *self.extensions)


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
class MemorySettings:
    """Budgets that the kernel's accounting enforces."""

    #: cap on GPU bytes the kernel may use (weights + KV + workspace); 0 means the device's free memory
    gpu_memory_budget_gb: float = attrs.field(default=0.0, validator=ge(0))
    #: requests that may wait for memory at once; one more fails with AdmissionError
    admission_queue: int = attrs.field(default=256, validator=ge(0))
    #: KV is allocated in blocks of this many tokens
    kv_block_tokens: int = attrs.field(default=64, validator=gt(0))
    #: GPU memory kept out of the KV pool for activations and captured graphs (CUDA only)
    workspace_gb: float = attrs.field(default=1.5, validator=ge(0))
    #: how the KV pool stores keys and values: auto (the model's dtype) | fp8_e4m3 (one byte each)
    kv_dtype: str = attrs.field(default="auto", validator=in_(("auto", "fp8_e4m3")))


_TABLES: dict[str, type] = {
    "plugins": PluginSelection, "server": ServerSettings, "model": ModelSettings, "memory": MemorySettings,
}


@attrs.frozen
class DjinnConfig:
    """The whole effective configuration."""

    source: str = "<defaults>"
    plugins: PluginSelection = PluginSelection()
    server: ServerSettings = ServerSettings()
    model: ModelSettings = ModelSettings()
    memory: MemorySettings = MemorySettings()
    #: raw ``[settings.NAME]`` tables, validated by the plugin manager against each plugin's class
    settings: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as TOML-ready tables (tuples as lists, no ``source``)."""
        return attrs.asdict(self, filter=lambda field, _value: field.name != "source",
                            value_serializer=lambda _inst, _field, v: list(v) if isinstance(v, tuple) else v)


T = TypeVar("T")


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether a TOML value fits a field's annotation (str, int, float, bool, tuple[T, ...], unions)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if origin is tuple:
        item = args[0] if args else Any
        if item is str and isinstance(value, str):
            return True  # a single name for a multi-choice slot
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation in (int, float):  # an int fits a float field; a bool fits neither
        return isinstance(value, (int, annotation)) and not isinstance(value, bool)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def build_settings(cls: type[T], table: Mapping[str, Any], *, source: str, where: str) -> T:
    """Build an attrs settings class from a TOML table, failing with file, table and key named: for
    the kernel's own tables and for every plugin's ``[settings.NAME]`` table."""
    fields = {f.name: f for f in attrs.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "(none)"
            raise ConfigError(f"{source}: unknown key {key!r} in [{where}]; allowed keys: {allowed}")
        if not _type_ok(value, hints.get(key, Any)):
            expected = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise ConfigError(f"{source}: [{where}] {key} = {value!r} has the wrong type; expected {expected}")
    for key, value in table.items():  # validators one by one, so a bad value is named with its key
        f = fields[key]
        if f.validator is not None:
            try:
                f.validator(None, f, f.converter(value) if f.converter else value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: bad value for {key!r} in [{where}]: {_explain(exc)}") from None
    try:
        return cls(**table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: bad value in [{where}]: {_explain(exc)}") from None


def _explain(exc: Exception) -> str:
    # attrs' in_ validator raises ValueError(msg, attribute, options, value)
    if len(exc.args) == 4 and isinstance(exc.args[1], attrs.Attribute):
        _msg, attribute, options, value = exc.args
        return f"{attribute.name} = {value!r}; allowed values: {', '.join(map(str, options))}"
    return str(exc.args[0]) if exc.args else str(exc)


def parse_config(data: Mapping[str, Any], *, source: str) -> DjinnConfig:
    """Validate a parsed TOML document into a ``DjinnConfig``."""
    tables: dict[str, Any] = {}
    for name, table in data.items():
        if name == "settings":
            continue
        if name not in _TABLES:
            allowed = ", ".join([*sorted(_TABLES), "settings"])
            raise ConfigError(f"{source}: unknown table [{name}]; allowed tables: {allowed}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        tables[name] = build_settings(_TABLES[name], table, source=source, where=name)
    settings = data.get("settings", {})
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        raise ConfigError(f"{source}: [settings] must hold one table per plugin, e.g. [settings.semantic]")
    return DjinnConfig(source=source, settings=settings, **tables)

