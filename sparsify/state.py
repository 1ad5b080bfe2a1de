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
    static cache's length, else the model's ``max_position_embeddings``; under the diffusion loop, the sequence's
    length), and the model's KV heads, head_dim and query heads."""

    batch: int
    capacity: int
    kv_heads: int = 1
    head_dim: int = 1
    heads: int = 1


@dataclass(frozen=True)
class StateSpec:
    """One tensor a method keeps per layer.

    ``shape(size)`` gives its shape from a :class:`StateSize`, batch first. ``dtype`` None: the model's dtype (as
    its keys are). ``crop(tensor, kept)`` updates it in place when the cache is cropped to its first ``kept``
    tokens; None: the method cannot follow a crop, which is refused. Tensors start as zeros, at every new sequence.
    ``host``: kept on the CPU, for values the runtime sets before a forward and ops read without a device
    synchronisation (the diffusion loop's :data:`DIFFUSION_CLOCK`).
    """

    name: str
    shape: Callable[[StateSize], tuple[int, ...]]
    dtype: torch.dtype | None
    crop: Callable[[torch.Tensor, int], None] | None = None
    host: bool = False


# The diffusion loop's clock, per batch row (denoising step, total steps, prompt length), on the host: a method
# that names it in its state_specs reads the step of every forward without a device sync and without a recompile
# (its values change, the graph does not). One tensor serves every layer; SequenceState.set_clock sets it.
DIFFUSION_CLOCK = StateSpec("clock", lambda size: (size.batch, 3), torch.int64, host=True)


@dataclass(frozen=True)
class StateLayout:
    """Per layer, the tensors of the sequence state, as ``(method.tensor name, spec)`` pairs in a fixed order, and
    the methods that keep them (``owners``: each method's spec, as the first rule naming it for the layer gives it;
    the rewrite lets each keep its state in step at every forward of the layer, whichever method computes it)."""

    layers: tuple[tuple[tuple[str, StateSpec], ...], ...]
    owners: tuple[tuple["MethodSpec", ...], ...] = ()
    # Per layer and owner, the prefix of its tensors' names (see prefix), in the owners' order.
    prefixes: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def for_policy(cls, policy: "Policy", num_layers: int) -> "StateLayout":
        """Every tensor that a method some rule (or the default) can pick for a layer keeps. Over-provisioned where a
        rule's other conditions (phase, length, modules) would keep the method off a layer: unused state is zeros.
        One set of tensors per distinct method spec and layer: rules giving one method the same parameters share
        it, rules giving it different ones (two block sizes by length) have one each."""
        layers, owners, prefixes = [], [], []
        for layer in range(num_layers):
            specs: dict[str, StateSpec] = {}
            keepers: list[tuple["MethodSpec", str]] = []
            candidates = [rule.spec for rule in policy.rules
                          if rule.when.layers is None or layer in rule.when.layers] + [policy.default]
            for spec in candidates:
                states = spec.method.state_specs(spec.params)
                if not states or any(known == spec for known, _ in keepers):
                    continue
                same = sum(known.name == spec.name for known, _ in keepers)
                prefix = spec.name if same == 0 else f"{spec.name}#{same + 1}"
                keepers.append((spec, prefix))
                specs.update((f"{prefix}.{state.name}", state) for state in states)
            layers.append(tuple(specs.items()))
            owners.append(tuple(spec for spec, _ in keepers))
            prefixes.append(tuple(prefix for _, prefix in keepers))
        return cls(tuple(layers), tuple(owners), tuple(prefixes))

    def prefix(self, layer: int | None, spec: "MethodSpec") -> str:
        """What the names of ``spec``'s tensors at ``layer`` start with: the method's name, then ``#k`` for the k-th
        distinct parameter set of that method at the layer."""
        if layer is not None and 0 <= layer < len(self.owners):
            for known, prefix in zip(self.owners[layer], self.prefixes[layer]):
                if known == spec:
                    return prefix
        return spec.name

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
        self.clock = self._zeros(DIFFUSION_CLOCK)  # every layer's clock entry is this one tensor
        self.tensors = [[self.clock if spec is DIFFUSION_CLOCK else self._zeros(spec) for _, spec in layer]
                        for layer in layout.layers]
        self.recent = RecentTokens()

    @property
    def batch(self) -> int:
        return self.size.batch

    @property
    def capacity(self) -> int:
        return self.size.capacity

    def _zeros(self, spec: StateSpec) -> torch.Tensor:
        device = torch.device("cpu") if spec.host else self.device
        tensor = torch.zeros(spec.shape(self.size), dtype=spec.dtype or self.dtype, device=device)
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

    def set_clock(self, step: int, steps: int, prompt_tokens: int) -> None:
        """The diffusion loop's next forward is denoising step ``step`` of ``steps``, over a sequence whose first
        ``prompt_tokens`` tokens are the prompt (every row's)."""
        self.clock[:, 0], self.clock[:, 1], self.clock[:, 2] = step, steps, prompt_tokens

    def reset(self) -> None:
        for layer in self.tensors:
            for tensor in layer:
                tensor.zero_()
        self.clock.zero_()
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
            for tensor in self._distinct():
                tensor.copy_(tensor.index_select(0, rows.to(tensor.device)))
            return
        self._replace_rows(lambda t: t.index_select(0, rows.to(t.device)))
        self.size = dataclasses.replace(self.size, batch=rows.numel())

    def repeat_rows(self, repeats: int) -> None:
        """The cache repeated each row ``repeats`` times (beam search's or sampling's expansion)."""
        self._recent_rows(lambda t: t.repeat_interleave(repeats, dim=0))
        self._replace_rows(lambda t: t.repeat_interleave(repeats, dim=0))
        self.size = dataclasses.replace(self.size, batch=self.batch * repeats)

    def _distinct(self) -> list[torch.Tensor]:
        """Every state tensor once (the clock is in every layer that reads it)."""
        return list({id(t): t for t in [self.clock, *(t for layer in self.tensors for t in layer)]}.values())

    def _replace_rows(self, rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every tensor by ``rows`` of it, keeping shared tensors shared."""
        new = {id(t): _fixed_address(rows(t)) for t in self._distinct()}
        self.clock = new[id(self.clock)]
        self.tensors = [[new[id(t)] for t in layer] for layer in self.tensors]

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
