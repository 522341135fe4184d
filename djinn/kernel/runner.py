"""The layer-by-layer model runner over server-owned KV.

A session's KV lives in one ``KVSlab``: a single contiguous tensor, so eviction is one copy.
``ModelRunner.begin`` embeds a chunk of tokens and returns a ``ForwardCursor``; ``run(until=k)``
runs decoder layers up to ``k`` and stops there (a breakpoint: ``.hidden`` may be read or edited),
``finish()`` runs the rest, the final norm and the head, and commits the chunk to the KV.

The runner calls the model's own modules (embedding, decoder layers, norm, head); attention is the
model's, fed through ``_SlabCache``, the small object the layers call ``update`` on. Per layer it
does nothing but call the layer, plus the streamer's ``before_layer``/``after_layer`` when one is
given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from djinn.kernel.errors import BreakpointError, ModelError
from djinn.kernel.models import LoadedModel, kv_geometry
from djinn.kernel.strategies import Streamer

#: families whose layout the runner knows; anything else is refused at construction
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
DEFAULT_BLOCK_TOKENS = 256


def _round_up(tokens: int, block: int) -> int:
    return -(-tokens // block) * block


@attrs.define(eq=False)
class KVSlab:
    """One session's K and V for every layer: ``tensor`` is ``[L, 2, H_kv, capacity, D]`` (batch 1).

    ``length`` tokens are stored; capacity grows in blocks of ``block_tokens`` by allocate + copy.
    ``tensor`` may be replaced by an equal copy (eviction swaps in a host copy and back, or sets
    it to None while the KV lives in a tier); nothing else here refers to device memory.
    """

    tensor: torch.Tensor | None
    length: int = 0
    block_tokens: int = DEFAULT_BLOCK_TOKENS

    @property
    def capacity(self) -> int:
        """Tokens the slab can hold without growing (0 while it has no tensor)."""
        return 0 if self.tensor is None else self.tensor.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes of the slab's tensor (its whole capacity, not only the stored tokens)."""
        return 0 if self.tensor is None else self.tensor.numel() * self.tensor.element_size()

    def ensure_capacity(self, tokens: int) -> None:
        """Grow the slab, where it lies, so it holds at least ``tokens`` tokens."""
        old = self.tensor
        if old is None:
            raise RuntimeError("the KV slab has no tensor (it is evicted); restore it first")
        if tokens <= old.shape[3]:
            return
        shape = list(old.shape)
        shape[3] = _round_up(tokens, self.block_tokens)
        # a normal tensor, not an inference tensor, so tiers may copy into it outside inference mode
        with torch.inference_mode(False):
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
        new[:, :, :, : self.length].copy_(old[:, :, :, : self.length])
        self.tensor = new


class _SlabCache:
    """What the decoder layers see as ``past_key_values``: writes the chunk's K/V into the slab.

    Layers call ``update(key, value, layer_idx, ...)`` with ``[1, H_kv, T, D]`` states and attend
    over what it returns: views of the slab's ``[0, start + T)``. The slab's tensor is looked up on
    every call, so it may be swapped while a forward pass is paused.
    """

    def __init__(self, kv: KVSlab, start: int) -> None:
        self.kv = kv
        self.start = start

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``[1, H_kv, T, D]`` keys and values at ``[start, start + T)``; return ``[0, start + T)``."""
        end = self.start + key_states.shape[2]
        layer = self.kv.tensor[layer_idx]  # [2, H_kv, capacity, D]
        layer[0, :, self.start : end].copy_(key_states[0])
        layer[1, :, self.start : end].copy_(value_states[0])
        return layer[0, :, :end].unsqueeze(0), layer[1, :, :end].unsqueeze(0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens stored before this chunk."""
        return self.start


def _attention_mask(
    start: int, tokens: int, window: int | None, device: torch.device, additive: torch.dtype | None
) -> torch.Tensor | None:
    """The mask of ``tokens`` queries at positions ``start..`` over keys ``0..start+tokens``.

    ``None`` where attention needs none: sdpa's own causal mode covers a chunk with no prefix
    (what ``generate`` does), and one query attends to every key. ``additive`` is the dtype of the
    eager implementation's additive mask; sdpa takes a boolean one ``[1, 1, T, start + T]``.
    """
    end = start + tokens
    clipped = window is not None and end > window
    if not clipped and (tokens == 1 or (start == 0 and additive is None)):
        return None
    query_pos = torch.arange(start, end, device=device)[:, None]  # [T, 1]
    key_pos = torch.arange(end, device=device)[None, :]  # [1, start + T]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= query_pos - key_pos < window
    allowed = allowed[None, None]  # [1, 1, T, start + T]
    if additive is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive, device=device).masked_fill_(
        ~allowed, torch.finfo(additive).min
    )


def _unique_nbytes(modules: Sequence[torch.nn.Module]) -> int:
    """Bytes of the modules' parameters and buffers, each tensor counted once (tied weights)."""
    tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _layer_windows(config: Any, family: str) -> list[int | None]:
    """Each layer's sliding-attention window (None: full causal attention)."""
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if family == "mistral":
        return [window] * layers
    if family == "qwen2":
        types = getattr(config, "layer_types", None) or ["full_attention"] * layers
        return [window if t == "sliding_attention" else None for t in types[:layers]]
    return [None] * layers


class ModelRunner:
    """Runs one session's forward pass at a time, layer by layer, over its ``KVSlab``.

    ``device`` is where the pass computes (default: the loaded model's device); the embeddings,
    final norm and head are moved there. The decoder layers are moved there too, unless a
    ``streamer`` is given: the runner then hands them to ``streamer.prepare(layers, device,
    budget_bytes)`` once, here, and calls its per-pass and per-layer methods on every pass.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        streamer: Streamer | None = None,
        device: str | torch.device | None = None,
        budget_bytes: int | None = None,
    ) -> None:
        family = loaded.family
        if family not in SUPPORTED_FAMILIES:
            raise ModelError(
                f"the layer-by-layer runner does not support the {family!r} family of "
                f"{loaded.name!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        model, config = loaded.model, loaded.config
        # the modules dispatch on this attribute; transformers offers no public reader
        attention = getattr(config, "_attn_implementation", None) or "eager"
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ModelError(
                f"attention implementation {attention!r} is not supported by the runner; "
                f"load the model with one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        self.family = family
        self.config = config
        self.streamer = streamer
        self._gpt2 = family == "gpt2"
        if self._gpt2:
            if getattr(config, "add_cross_attention", False):
                raise ModelError(f"{loaded.name!r}: GPT-2 with cross-attention is not a decoder-only model")
            body = model.transformer
            self._embed = body.wte
            self._embed_positions = body.wpe
            self._dropout = body.drop
            self.layers: list[torch.nn.Module] = list(body.h)
            self._norm = body.ln_f
            self.max_positions: int | None = config.n_positions
            outside_layers = [body.wte, body.wpe, body.ln_f, model.lm_head]
        else:
            body = model.model
            self._embed = body.embed_tokens
            self._rotary = body.rotary_emb
            self.layers = list(body.layers)[: config.num_hidden_layers]
            self._norm = body.norm
            self.max_positions = None
            outside_layers = [body.embed_tokens, body.rotary_emb, body.norm, model.lm_head]
        self._head = model.lm_head
        self.num_layers, self.kv_heads, self.head_dim = kv_geometry(config)
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        self.device = torch.device(device) if device is not None else loaded.device
        self.dtype = self._embed.weight.dtype
        self.kv_bytes_per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype.itemsize
        self._additive_mask = self.dtype if attention == "eager" else None
        self._windows = _layer_windows(config, family)

        for module in outside_layers:
            module.to(self.device)
        self._outside_layers_bytes = _unique_nbytes(outside_layers)
        if streamer is None:
            for layer in self.layers:
                layer.to(self.device)
            self._layers_bytes = _unique_nbytes(self.layers)
        else:
            streamer.prepare(self.layers, self.device, budget_bytes)

    def device_weight_bytes(self) -> int:
        """Device memory the weights take: embeddings, norm and head, plus the layers or the
        streamer's share (resident copies or its ring)."""
        layers = self._layers_bytes if self.streamer is None else self.streamer.device_bytes()
        return self._outside_layers_bytes + layers

    def kv_bytes(self, tokens: int, *, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> int:
        """Bytes of a slab that holds ``tokens`` tokens (capacity rounded up to whole blocks)."""
        return _round_up(tokens, block_tokens) * self.kv_bytes_per_token

    def kv_growth_bytes(self, kv: KVSlab, tokens: int) -> int:
        """Bytes ``kv.ensure_capacity(tokens)`` would add (0 when the slab is large enough)."""
        return max(0, self.kv_bytes(tokens, block_tokens=kv.block_tokens) - kv.nbytes)

    def new_kv(self, capacity_tokens: int = 0, *, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> KVSlab:
        """An empty slab on the runner's device, with room for ``capacity_tokens`` (block-rounded)."""
        shape = (self.num_layers, 2, self.kv_heads, _round_up(capacity_tokens, block_tokens), self.head_dim)
        with torch.inference_mode(False):
            tensor = torch.empty(shape, dtype=self.dtype, device=self.device)
        return KVSlab(tensor=tensor, block_tokens=block_tokens)

    def ids_tensor(self, ids: Sequence[int]) -> torch.Tensor:
        """Token ids as the ``[1, T]`` tensor ``begin`` takes, on the runner's device."""
        return torch.tensor([list(ids)], dtype=torch.long, device=self.device)

    def token_picker(
        self, temperature: float = 0.0, top_k: int | None = None, seed: int | None = None
    ) -> Callable[[torch.Tensor], int]:
        """A function from logits ``[vocab]`` to a token: argmax when ``temperature`` is 0, else
        sampling from the ``top_k`` best (all when None or 0) with a generator seeded by ``seed``
        (a random seed when None)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {top_k}")
        if temperature == 0:
            return lambda logits: int(logits.argmax())
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)

        def pick(logits: torch.Tensor) -> int:
            scores = logits / temperature  # [vocab]
            candidates = None
            if top_k and top_k < scores.shape[0]:
                scores, candidates = scores.topk(top_k)  # [top_k] each
            choice = torch.multinomial(scores.softmax(-1), 1, generator=generator)  # [1]
            return int(choice if candidates is None else candidates[choice])

        return pick

    @torch.inference_mode()
    def begin(self, kv: KVSlab, input_ids: torch.Tensor) -> ForwardCursor:
        """Start a forward pass of ``input_ids`` ``[1, T]`` appended after ``kv.length`` tokens.

        A fresh prompt, a chunk appended to a context, or a one-token decode step alike. Nothing
        is committed to ``kv.length`` until ``finish()``.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [1, T] with T >= 1, not {list(input_ids.shape)}")
        start = kv.length
        tokens = input_ids.shape[1]
        end = start + tokens
        if self.max_positions is not None and end > self.max_positions:
            raise ModelError(
                f"a context of {end} tokens exceeds the model's {self.max_positions} positions"
            )
        kv.ensure_capacity(end)
        ids = input_ids.to(self.device)
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)  # [1, T]
        cache = _SlabCache(kv, start)
        hidden = self._embed(ids)  # [1, T, hidden]
        by_window: dict[int | None, dict[str, Any]] = {}
        for window in set(self._windows):
            mask = _attention_mask(start, tokens, window, self.device, self._additive_mask)
            by_window[window] = dict(
                attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
        if self._gpt2:
            hidden = self._dropout(hidden + self._embed_positions(positions))
        else:
            rope = self._rotary(hidden, positions)  # (cos, sin), each [1, T, head_dim]
            for kwargs in by_window.values():
                kwargs["position_embeddings"] = rope
        layer_kwargs = [by_window[window] for window in self._windows]
        return ForwardCursor(self, kv, hidden, positions, layer_kwargs)

    @torch.inference_mode()
    def last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head on the last position of ``hidden`` ``[1, T, hidden]``: float32 ``[vocab]``."""
        last = hidden[:, -1:]  # [1, 1, hidden]
        return self._head(self._norm(last))[0, -1].float()  # [vocab]


class ForwardCursor:
    """One forward pass in progress: ``layer`` is the next layer to run, ``hidden`` the residual
    stream ``[1, T, hidden]`` after the layers run so far.

    A breakpoint at layer ``L`` is ``run(until=L + 1)``: ``hidden`` is then layer ``L``'s output.
    Replace it by assignment, or edit it in place under ``torch.inference_mode()`` (it is an
    inference tensor), before ``run()`` or ``finish()`` continue.
    """

    def __init__(
        self,
        runner: ModelRunner,
        kv: KVSlab,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        layer_kwargs: list[dict[str, Any]],
    ) -> None:
        self.runner = runner
        self.kv = kv
        self.start = kv.length
        self.positions = positions  # [1, T]
        self.layer = 0
        self.num_layers = runner.num_layers
        self.finished = False
        self._hidden = hidden  # [1, T, hidden]
        self._layer_kwargs = layer_kwargs

    @property
    def hidden(self) -> torch.Tensor:
        """The residual stream ``[1, T, hidden]`` after layer ``layer - 1``."""
        return self._hidden

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(self._hidden.shape):
            raise BreakpointError(
                f"an edited activation must keep the shape {list(self._hidden.shape)}, "
                f"not {list(value.shape)}"
            )
        self._hidden = value.to(device=self._hidden.device, dtype=self._hidden.dtype)

    @torch.inference_mode()
    def run(self, until: int | None = None) -> None:
        """Run layers ``[layer, until)`` (to the last layer when ``until`` is None)."""
        stop = self.num_layers if until is None else until
        if self.finished or not self.layer <= stop <= self.num_layers:
            raise BreakpointError(
                f"cannot run to layer {stop}: the pass is at layer {self.layer} of "
                f"{self.num_layers}{' and finished' if self.finished else ''}"
            )
        first = self.layer
        layers = self.runner.layers
        kwargs = self._layer_kwargs
        hidden = self._hidden
        streamer = self.runner.streamer
        if streamer is None:
            for i in range(first, stop):
                hidden = layers[i](hidden, **kwargs[i])
        else:
            if first == 0 and stop > 0:
                streamer.begin_pass()
            for i in range(first, stop):
                streamer.before_layer(i)
                hidden = layers[i](hidden, **kwargs[i])
                streamer.after_layer(i)
            if stop == self.num_layers and first < stop:
                streamer.end_pass()
        self._hidden = hidden
        self.layer = stop

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """Run the remaining layers, then norm + head on the last position; return float32 logits
        ``[vocab]`` and commit the chunk (``kv.length += T``)."""
        if self.finished:
            raise BreakpointError("this forward pass has already finished")
        if self.layer < self.num_layers:
            self.run()
        if self.kv.length != self.start:
            raise RuntimeError(
                f"the KV went from {self.start} to {self.kv.length} tokens during this forward pass"
            )
        logits = self.runner.last_logits(self._hidden)
        self.kv.length = self.start + self.positions.shape[1]
        self.finished = True
        return logits


def _generate(
    runner: ModelRunner,
    kv: KVSlab,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], int],
) -> list[int]:
    tokens: list[int] = []
    if max_new_tokens <= 0:
        return tokens
    logits = runner.begin(kv, input_ids).finish()
    while True:
        tokens.append(pick(logits))
        if len(tokens) == max_new_tokens:
            return tokens
        logits = runner.begin(kv, runner.ids_tensor(tokens[-1:])).finish()


def greedy_generate(
    runner: ModelRunner, kv: KVSlab, input_ids: torch.Tensor, max_new_tokens: int
) -> list[int]:
    """Prefill ``input_ids`` ``[1, T]`` after ``kv``'s context and decode greedily.

    The last returned token is not yet in ``kv`` (feed it with the next call).
    """
    return _generate(runner, kv, input_ids, max_new_tokens, runner.token_picker())


def sample_generate(
    runner: ModelRunner,
    kv: KVSlab,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Like ``greedy_generate`` but sampling with ``temperature`` and ``top_k``, seeded."""
    picker = runner.token_picker(temperature, top_k, seed)
    return _generate(runner, kv, input_ids, max_new_tokens, picker)
