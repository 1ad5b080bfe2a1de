"""transformers integration: an attention implementation, ``"sparsify"``, that describes masks instead of
materialising them.

transformers builds a (B, 1, q_len, kv_len) boolean mask for SDPA whenever it is traced (Dynamo, export): at 128K
tokens that is a 32 GiB tensor, and SDPA handed a mask cannot use its flash kernel. ``sparsify.compile`` gives its
copy of the model this implementation instead, through transformers' own extension points
(``AttentionMaskInterface`` and ``AttentionInterface``):

- the mask function returns a :class:`MaskDescription` (causal or not, the 2-D key padding, the query offset of a
  static cache): O(kv_len) values, never O(q_len x kv_len);
- the attention function calls ``torch.ops.sparsify.attention`` with that description, which the compiler
  matches (causality is then proven by construction, not checked on a tensor) and which, run as it is, computes
  exact attention (SDPA ``is_causal`` in prefill, split-KV flash decoding in decode).

Masks this module does not understand (sliding windows, chunked attention, custom ``and``/``or`` mask functions,
caches whose keys do not start at position 0) are materialised exactly as transformers' SDPA path would build
them, and attention then runs through transformers' own SDPA function: always exact, and reported by ``explain``
as a mask tensor.
"""

from __future__ import annotations


import copy
import math
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from .errors import FallbackWarning
from .ops import visible_keys
from .state import STATE_ATTRIBUTE

ATTN_IMPLEMENTATION = "sparsify"

# Keyword arguments some models pass to their attention function that change what it computes (logit soft-capping,
# attention sinks, position biases, a local window): with any of them set, attention runs through transformers' SDPA.
_SEMANTIC_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "sliding_window", "attention_chunk_size")


@dataclass(frozen=True)
class MaskDescription:
    """What a transformers mask means, in O(kv_len) values.

    ``key_padding``: (B, kv_len) bool, True where a key may be attended (the 2-D ``attention_mask``, padded to the
    cache's length), or None. ``query_offset``: a 0-d integer tensor, the position of the first query in a static
    cache (whose kv_len is its capacity), or None when the keys end with the queries (dynamic caches, no cache).
    """

    causal: bool
    key_padding: torch.Tensor | None
    query_offset: torch.Tensor | None
    # The model's sliding window (``local_size``), when transformers asked for its plain sliding causal mask; the
    # attention confirms it (its ``sliding_window``), else ``exact_mask`` gives transformers' own mask.
    window: int = 0
    exact_mask: Any = None

    def materialise(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The (B or 1, 1, q_len, kv_len) boolean mask transformers would have built (for fallbacks)."""
        if self.exact_mask is not None:
            return self.exact_mask()
        return visible_keys(query, key, self.key_padding, self.query_offset, self.causal)


def sparsify_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
                  mask_function: Any = causal_mask_function, attention_mask: torch.Tensor | None = None,
                  local_size: int | None = None, **kwargs: Any) -> MaskDescription | torch.Tensor | None:
    """transformers' mask interface (the arguments of ``masking_utils.sdpa_mask``)."""
    def exact_mask():  # transformers' own (materialised) mask: where the description does not apply
        rest = {key: value for key, value in kwargs.items() if key != "allow_is_causal_skip"}
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         local_size=local_size, allow_is_causal_skip=False, **rest)

    # transformers' sliding-window causal mask, with nothing or'ed or and'ed onto it (those set use_vmap, packed
    # sequences and a static cache's decode clear allow_is_causal_skip): described by its window, confirmed by the
    # attention's own ``sliding_window`` (a chunked mask also passes local_size; it never passes that).
    sliding = (local_size is not None and not kwargs.get("use_vmap") and kwargs.get("allow_is_causal_skip", False)
               and mask_function is not bidirectional_mask_function)
    understood = mask_function in (causal_mask_function, bidirectional_mask_function) and local_size is None
    if not (understood or sliding) or not isinstance(kv_offset, int) or kv_offset != 0:
        return exact_mask()
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    causal = mask_function is causal_mask_function or sliding
    if not causal:
        query_offset = None  # every key is seen: positions do not matter
    elif isinstance(q_offset, torch.Tensor):
        # A copy: static caches hand out their own length counter, which each layer's update advances in place
        # before that layer's attention reads it.
        query_offset = q_offset.clone()
    elif kv_length == q_offset + q_length:
        query_offset = None  # the keys end with the queries: positions follow from the shapes
    else:
        # A static cache before its first update reports offset 0 as an int, with kv_length its capacity.
        query_offset = torch.tensor(q_offset, dtype=torch.int64, device=kwargs.get("device", "cpu"))
    return MaskDescription(
        causal=causal,
        key_padding=None if padding is None else padding.to(torch.bool),
        query_offset=query_offset,
        window=int(local_size) if sliding else 0,
        exact_mask=exact_mask if sliding else None,
    )


def sparsify_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> ((B, Lq, Hq, Dv), None)."""
    state = kwargs.pop(STATE_ATTRIBUTE, None)  # the sequence state the compiled forward passes down
    window = attention_mask.window if isinstance(attention_mask, MaskDescription) else 0
    confirmed = bool(window) and kwargs.get("sliding_window") == window
    if confirmed:
        kwargs.pop("sliding_window")  # the description carries it
    # A local mask that is not this attention's sliding window (a chunked one, say) gets transformers' own mask.
    changes_semantics = (bool(window) and not confirmed) or any(kwargs.get(name) is not None
                                                                for name in _SEMANTIC_KWARGS)
    if not isinstance(attention_mask, MaskDescription) or dropout or changes_semantics:
        if isinstance(attention_mask, MaskDescription):
            attention_mask = attention_mask.materialise(query, key)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if not torch.compiler.is_compiling():
        count_uncompiled_call(module)
    causal = attention_mask.causal and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    layer_state = state.layer(module.layer_idx) if state is not None and hasattr(module, "layer_idx") else []
    out = torch.ops.sparsify.attention(query, key, value, attention_mask.key_padding, attention_mask.query_offset,
                                       None, causal, scale, layer_state, window)
    return out.transpose(1, 2).contiguous(), None


@dataclass
class UncompiledCalls:
    """Attention calls of a compiled model that ran outside sparsify's graphs: Dynamo ran the model's own forward
    (a frame it could not capture, or its recompile limit). Exact dense attention, never the policy's method."""

    count: int = 0


def count_uncompiled_call(module: torch.nn.Module) -> None:
    calls = getattr(module, "sparsify_uncompiled_calls", None)
    if calls is None:  # the model was not made by sparsify.compile (the implementation used directly)
        return
    if calls.count == 0:
        warnings.warn("sparsify: an attention ran outside sparsify's compiled graphs (Dynamo ran the model's own "
                      "forward), so it computed exact dense attention, not the policy's method; sparsify.explain "
                      "counts these calls", FallbackWarning, stacklevel=3)
    calls.count += 1


def padding_for_generate(*, attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                         **kwargs: Any) -> torch.Tensor | None:
    """Stands in for ``create_masks_for_generate``, which ``generate()`` calls outside the forward when the cache is
    static: the 2-D padding mask padded to the cache's length, so the forward keeps one input shape for every decode
    step (one graph, CUDA-graph replayable) and builds its mask description itself."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5.2x
    if attention_mask is None or attention_mask.dim() != 2 or cache is None:
        return attention_mask
    kv_length, kv_offset = cache.get_mask_sizes(inputs_embeds.shape[1], 0)
    missing = kv_length + kv_offset - attention_mask.shape[-1]
    padding = attention_mask.to(torch.bool)  # bool on every step, or the last one (no padding left) recompiles
    return F.pad(padding, (0, missing)) if missing > 0 else padding


# Model types whose attention modules pass transformers' mask straight to the attention function, with no
# arithmetic of their own on it (others read ``mask.ndim`` or add biases to it): the only ones given the
# ``"sparsify"`` implementation. Others keep their own attention, matched in the traced graph.
DESCRIBED_MASK_MODELS = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo", "olmo2", "granite",
    "smollm3",
})


def can_install(model: torch.nn.Module) -> bool:
    """A transformers model of a type in :data:`DESCRIBED_MASK_MODELS` using SDPA: its attention computes exactly
    what SDPA with transformers' mask computes, so describing the mask changes nothing but the cost. (Eager models
    may rely on the eager path for soft-capping or sinks, which SDPA does not do.)"""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in DESCRIBED_MASK_MODELS
            and getattr(config, "_attn_implementation", None) == "sdpa")


def install(model: torch.nn.Module) -> UncompiledCalls:
    """Make ``model`` (a private copy: its config is changed) use the ``"sparsify"`` attention implementation.
    Returns the counter of its attention calls that will run outside sparsify's graphs."""
    uncompiled = UncompiledCalls()
    for module in model.modules():
        if hasattr(module, "layer_idx"):  # transformers' attention modules (and the layers holding them)
            module.sparsify_uncompiled_calls = uncompiled
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    model.create_masks_for_generate = padding_for_generate
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        # generate() would otherwise torch.compile the forward again, around sparsify's own compiled forward.
        generation_config.disable_compile = True
        if any(p.is_cuda for p in model.parameters()):
            model.generate = types.MethodType(generate_with_static_cache, model)
    return uncompiled


CACHE_ARGUMENTS = ("past_key_values", "cache", "cache_implementation")  # "cache": transformers 5.2x's name


def with_default_cache(kwargs: dict, generation_config) -> dict:
    """``generate()``'s keyword arguments, asking for a static cache unless the call or the generation config
    (the model's, or one passed) already names a cache or a cache implementation."""
    passed = kwargs.get("generation_config")
    config = passed or generation_config
    if any(kwargs.get(name) is not None for name in CACHE_ARGUMENTS) or (
            config is not None and config.cache_implementation is not None):
        return kwargs
    if passed is not None:  # into a copy of the config passed: transformers warns of keywords beside a config
        passed = copy.deepcopy(passed)
        passed.cache_implementation = "static"
        return {**kwargs, "generation_config": passed}
    return {**kwargs, "cache_implementation": "static"}


def generate_with_static_cache(model, *args, **kwargs):
    """On the GPU, generate() preallocates a static cache unless told otherwise: a DynamicCache copies the whole
    cache at every step (torch.cat) and changes shape, so decode could not replay a CUDA graph. (Set per call, not
    in the generation config: transformers refuses a config's cache implementation beside a cache passed in.)"""
    return type(model).generate(model, *args, **with_default_cache(kwargs, model.generation_config))


AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sparsify_mask)
AttentionInterface.register(ATTN_IMPLEMENTATION, sparsify_attention)
