"""Sequence state: the tensors sparse methods carry from one forward to the next, owned by the sequence's KV cache.

A method declares the tensors it keeps per layer (:class:`StateSpec`: a shape from the batch size, the cache's
capacity and the layer's KV heads and head_dim, a dtype, what cropping the cache does to it). Before capture,
:meth:`StateLayout.for_policy` collects every layer's tensors from the methods its rules can pick. At each forward
of a compiled transformers model the compiler finds the cache's :class:`SequenceState` (made at the first forward
over an empty cache, zeroed when the cache is reset) and passes it down the model as the keyword ``sparsify_state``;
the attention implementation hands each layer's tensors to ``sparsify.attention``, so they are inputs of the
captured graph, never module buffers. The rewrite gives them to the methods (``RewriteContext.sequence_state``),
whose ops update them in place and declare it (``mutates_args``): the prefill frame and every decode frame read and
write the same tensors.

Why beside the cache rather than a cache subclass: ``generate()`` makes its own cache (a DynamicCache, or a
StaticCache from ``cache_implementation``) and users pass theirs; a subclass would have to replace each of them.
The state rides on whatever cache the sequence has, as an attribute, and follows the cache's own ``reset``,
``crop``, ``reorder_cache``, ``batch_select_indices`` and ``batch_repeat_interleave`` (wrapped on that cache
object), so it is fresh for every ``generate()`` (a new cache, or a reset one) and never describes tokens the
cache no longer holds. Every tensor has the batch as its first dimension, which is what reordering relies on.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .errors import StateError

if TYPE_CHECKING:
    from .methods.base import MethodSpec
    from .policy import Policy

STATE_ATTRIBUTE = "sparsify_state"  # on the cache object; also the keyword the model's forward passes down


@dataclass(frozen=True)
class StateSize:
    """What a state tensor's shape may depend on: the batch, ``capacity`` (the most tokens the cache can hold: a
    static cache's length, else the model's ``max_position_embeddings``), and the model's KV heads and head_dim."""

    batch: int
    capacity: int
    kv_heads: int = 1
    head_dim: int = 1


@dataclass(frozen=True)
class StateSpec:
    """One tensor a method keeps per layer.

    ``shape(size)`` gives its shape from a :class:`StateSize`, batch first. ``dtype`` None: the model's dtype (as
    its keys are). ``crop(tensor, kept)`` updates it in place when the cache is cropped to its first ``kept``
    tokens; None: the method cannot follow a crop, which is refused. Tensors start as zeros, at every new sequence.
    """

    name: str
    shape: Callable[[StateSize], tuple[int, ...]]
    dtype: torch.dtype | None
    crop: Callable[[torch.Tensor, int], None] | None = None


@dataclass(frozen=True)
class StateLayout:
    """Per layer, the tensors of the sequence state, as ``(method.tensor name, spec)`` pairs in a fixed order, and
    the methods that keep them (``owners``: each method's spec, as the first rule naming it for the layer gives it;
    the rewrite lets each keep its state in step at every forward of the layer, whichever method computes it)."""

    layers: tuple[tuple[tuple[str, StateSpec], ...], ...]
    owners: tuple[tuple["MethodSpec", ...], ...] = ()

    @classmethod
    def for_policy(cls, policy: "Policy", num_layers: int) -> "StateLayout":
        """Every tensor that a method some rule (or the default) can pick for a layer keeps. Over-provisioned where a
        rule's other conditions (phase, length, modules) would keep the method off a layer: unused state is zeros.
        One tensor per method and name and layer, whatever rule picks the method."""
        layers, owners = [], []
        for layer in range(num_layers):
            specs: dict[str, StateSpec] = {}
            keepers: dict[str, "MethodSpec"] = {}
            candidates = [rule.spec for rule in policy.rules
                          if rule.when.layers is None or layer in rule.when.layers] + [policy.default]
            for spec in candidates:
                for state in spec.method.state_specs(spec.params):
                    specs.setdefault(f"{spec.name}.{state.name}", state)
                    keepers.setdefault(spec.name, spec)
            layers.append(tuple(specs.items()))
            owners.append(tuple(keepers.values()))
        return cls(tuple(layers), tuple(owners))

    @property
    def empty(self) -> bool:
        return not any(self.layers)

    def names(self, layer: int) -> tuple[str, ...]:
        return tuple(name for name, _ in self.layers[layer]) if 0 <= layer < len(self.layers) else ()

    def owners_of(self, layer: int) -> tuple["MethodSpec", ...]:
        return self.owners[layer] if 0 <= layer < len(self.owners) else ()


@dataclass
class RecentTokens:
    """A sequence's host-side record: the tokens its cache holds (counted from the calls, never read from the
    device), the per-token inputs of its decode steps since the last rectification (``sparsify.rectify``), and how
    many rectifications it had."""

    tokens: int = 0
    steps: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)
    rectifications: int = 0

    def forget(self, tokens: int = 0) -> None:
        """The cache now holds ``tokens`` tokens, and no decode step waits for rectification."""
        self.tokens, self.steps = tokens, []


class SequenceState:
    """The state of one sequence (a batch of rows): per layer, the tensors of its :class:`StateLayout`, and its
    :class:`RecentTokens`."""

    def __init__(self, layout: StateLayout, size: StateSize, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.layout = layout
        self.size = size
        self.device = torch.device(device)
        self.dtype = dtype  # the model's: that of the tensors whose spec names none
        self.tensors = [[self._zeros(spec) for _, spec in layer] for layer in layout.layers]
        self.recent = RecentTokens()

    @property
    def batch(self) -> int:
        return self.size.batch

    @property
    def capacity(self) -> int:
        return self.size.capacity

    def _zeros(self, spec: StateSpec) -> torch.Tensor:
        tensor = torch.zeros(spec.shape(self.size), dtype=spec.dtype or self.dtype, device=self.device)
        if tensor.dim() == 0 or tensor.shape[0] != self.batch:
            raise ValueError(f"sequence state {spec.name}: shape {tuple(tensor.shape)} must start with the batch "
                             f"({self.batch})")
        return _fixed_address(tensor)

    def layer(self, index: int) -> list[torch.Tensor]:
        """Layer ``index``'s tensors in :meth:`StateLayout.names` order (empty for a layer without state)."""
        return self.tensors[index] if 0 <= index < len(self.tensors) else []

    def get(self, layer: int, name: str) -> torch.Tensor:
        """One tensor, by layer and ``method.tensor`` name."""
        names = self.layout.names(layer)
        if name not in names:
            raise KeyError(f"sequence state: layer {layer} has no {name!r}; it has {', '.join(names) or 'nothing'}")
        return self.tensors[layer][names.index(name)]

    def reset(self) -> None:
        for layer in self.tensors:
            for tensor in layer:
                tensor.zero_()
        self.recent = RecentTokens()

    def crop(self, kept: int) -> None:
        """The cache now holds its first ``kept`` tokens (in place, addresses kept). Refused, naming the tensor,
        where a method cannot follow (checked before any tensor changes)."""
        for layer in self.layout.layers:
            for name, spec in layer:
                if spec.crop is None:
                    raise StateError(f"sequence state {name}: its method cannot follow a cropped cache (no crop rule "
                                     f"in its StateSpec), and the cache was cropped to {kept} tokens; generate "
                                     "without cropping (assisted decoding, contrastive search) or use a policy "
                                     "without this method")
        for layer, tensors in zip(self.layout.layers, self.tensors):
            for (_, spec), tensor in zip(layer, tensors):
                spec.crop(tensor, kept)
        self.recent.forget(kept)

    def select_rows(self, rows: torch.Tensor) -> None:
        """The cache kept (and reordered) these batch rows: beam search's reordering, or a selection of rows."""
        self._recent_rows(lambda t: t.index_select(0, rows.to(t.device)))
        if rows.numel() == self.batch:  # a reordering: same shapes, so in place (addresses kept)
            for tensors in self.tensors:
                for tensor in tensors:
                    tensor.copy_(tensor.index_select(0, rows.to(tensor.device)))
            return
        self.tensors = [[_fixed_address(tensor.index_select(0, rows.to(tensor.device))) for tensor in tensors]
                        for tensors in self.tensors]
        self.size = dataclasses.replace(self.size, batch=rows.numel())

    def repeat_rows(self, repeats: int) -> None:
        """The cache repeated each row ``repeats`` times (beam search's or sampling's expansion)."""
        self._recent_rows(lambda t: t.repeat_interleave(repeats, dim=0))
        self.tensors = [[_fixed_address(tensor.repeat_interleave(repeats, dim=0)) for tensor in tensors]
                        for tensors in self.tensors]
        self.size = dataclasses.replace(self.size, batch=self.batch * repeats)


    def _recent_rows(self, rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-row operation to the remembered decode inputs that have one row per sequence row."""
        self.recent.steps = [{name: rows(t) if t.dim() > 1 and t.shape[0] == self.batch else t
                              for name, t in step.items()} for step in self.recent.steps]


def _fixed_address(tensor: torch.Tensor) -> torch.Tensor:
    """Decode frames mutate state tensors and replay as CUDA graphs only if their addresses stay (as a static
    cache's do): tell Dynamo so, without a guard (a new sequence's state does not recompile)."""
    torch._dynamo.mark_static_address(tensor, guard=False)
    return tensor


def state_of(cache: Any) -> SequenceState | None:
    """The sequence state a cache carries (None before the first compiled forward over it)."""
    return getattr(cache, STATE_ATTRIBUTE, None)


def state_for_call(cache: Any, layout: StateLayout, size: StateSize, device: torch.device, dtype: torch.dtype
                   ) -> SequenceState:
    """The sequence state of a forward over ``cache`` (None: no cache, a state for this call alone), for the call's
    batch and the model's ``dtype``.

    Made, and attached to the cache, when the cache is empty; a cache that already holds tokens this state never
    saw (filled by another model) is refused, since the state would describe the wrong sequence."""
    if cache is None:
        return SequenceState(layout, size, device, dtype)
    state = state_of(cache)
    if state is not None and state.layout is layout and state.batch == size.batch \
            and state.device == torch.device(device):
        return state
    held = cache.get_seq_length()
    held = int(held) if isinstance(held, torch.Tensor) else held  # a static cache's length: once per new state
    if held:
        raise StateError(f"sparsify: the cache already holds {held} tokens that this model's sequence state did not "
                         "see (the cache was filled by another model, or its batch changed); start the sequence "
                         "with the compiled model, from an empty cache")
    state = SequenceState(layout, size, device, dtype)
    setattr(cache, STATE_ATTRIBUTE, state)
    _follow_cache(cache)
    return state


def _follow_cache(cache: Any) -> None:
    """Make this cache object's own reset, crop and batch operations carry its state along.

    Bound to the cache object (``types.MethodType``), each calling its class's method: a deep copy of the cache
    (transformers' prompt-reuse recipe) rebinds them to the copy, which then updates its own copied state."""
    for name, follow in _FOLLOWERS.items():
        if hasattr(type(cache), name) and not isinstance(cache.__dict__.get(name), types.MethodType):
            cache.__dict__[name] = types.MethodType(follow, cache)


def _crop(cache, *args, **kwargs):
    # Compared by the cache's own count before and after: what a crop's argument means changed across versions
    # (5.17 keeps that many tokens, 5.2x removes that many), and a crop that removes nothing is no crop.
    before = int(cache.get_seq_length())
    result = type(cache).crop(cache, *args, **kwargs)
    kept = int(cache.get_seq_length())
    if state_of(cache) is not None and kept != before:
        state_of(cache).crop(kept)
    return result


def _then(name: str, update: Callable[..., None]) -> Callable:
    """The cache class's method ``name``, then ``update(state, *its arguments)`` where the cache has a state."""

    def follow(cache, *args, **kwargs):
        result = getattr(type(cache), name)(cache, *args, **kwargs)
        if state_of(cache) is not None:
            update(state_of(cache), *args, **kwargs)
        return result

    return follow


_FOLLOWERS = {
    "reset": _then("reset", lambda state: state.reset()),
    "crop": _crop,
    # Keyword names as transformers' own methods have them, so calls by keyword reach the state too.
    "reorder_cache": _then("reorder_cache", lambda state, beam_idx: state.select_rows(beam_idx)),
    "batch_select_indices": _then("batch_select_indices",
                                  lambda state, indices: state.select_rows(torch.as_tensor(indices))),
    "batch_repeat_interleave": _then("batch_repeat_interleave", lambda state, repeats: state.repeat_rows(repeats)),
}
