"""Rectification (ReSA): every ``every`` decode steps, the step re-encodes its sequence's last ``every`` tokens
densely instead of one, overwriting their K/V in every layer (and, through each layer's state update, the block
summaries they touch). The sampled tokens stay; what changes is the cache that later steps read, which sparse
decoding would otherwise let drift.

It happens inside the compiled model's forward, so ``generate()`` (greedy or sampling, EOS, batches, any cache)
and a user's own decode loop (``fast(input_ids=next_tokens, past_key_values=cache, ...)``, step after step) are
rectified alike: a decode step's per-token inputs are remembered on the sequence state, and on every ``every``-th
step the cache is cropped back by ``every - 1`` tokens and the forward runs over the last ``every`` tokens, their
per-token inputs concatenated, returning the logits of the last one. That forward has ``every`` query tokens over
a non-empty cache, so the policy's prefill rules decide its attention (a sparse prefill method is exact there:
its guard sees a call that is not a plain prefill).
"""

from __future__ import annotations

from typing import Any

import torch

from .policy import Policy
from .state import SequenceState

# Keyword inputs with one entry per token of the call (their last dimension): concatenated over a rectified chunk.
PER_TOKEN = ("input_ids", "position_ids", "cache_position", "token_type_ids")


def rectify_period(policy: Policy) -> int:
    """The policy's rectification period: the smallest :meth:`~sparsify.AttentionMethod.rectify_every` > 0 of the
    methods its rules (or its default) name, 0 for none."""
    periods = [spec.method.rectify_every(spec.params) for spec in [rule.spec for rule in policy.rules]
               + [policy.default]]
    return min((p for p in periods if p > 0), default=0)


def prepare_call(state: SequenceState, cache: Any, kwargs: dict, every: int) -> tuple[dict, bool]:
    """The keyword arguments of this forward, and whether it is a rectification. ``kwargs`` holds the call's
    ``input_ids`` (B, n). A decode step (n == 1 over a cache that holds tokens) is remembered; the ``every``-th
    since the last rectification crops the cache back by ``every - 1`` tokens and becomes a forward over the last
    ``every`` tokens. Host-side only: nothing here reads a device tensor (the cache is rewound by the count kept
    on the host)."""
    recent = state.recent
    length = kwargs["input_ids"].shape[1]
    if length != 1 or recent.tokens == 0:  # a prompt, or a chunk of the caller's: nothing to rectify before it
        recent.forget(recent.tokens + length)
        return kwargs, False
    recent.steps.append({name: kwargs[name] for name in PER_TOKEN if isinstance(kwargs.get(name), torch.Tensor)})
    held = recent.tokens + 1
    if len(recent.steps) < every:
        recent.tokens = held
        return kwargs, False
    steps = recent.steps
    rewind(cache, every - 1)
    state.crop(held - every)  # the state follows, as it follows a crop of the cache (forgetting the steps)
    chunk = dict(kwargs)
    for name in steps[-1]:
        chunk[name] = torch.cat([step[name] for step in steps], dim=-1)
    recent.forget(held)
    recent.rectifications += 1
    return chunk, True


def rewind(cache: Any, tokens: int) -> None:
    """Remove the cache's last ``tokens`` tokens, layer by layer, so that the next forward writes them again: a
    static layer moves its write position back in place (``cumulative_length``, a tensor whose address stays;
    5.2x's own crop does the same), any other layer crops with a negative count (the form every transformers
    version reads as "remove"). The layers' own methods, not the cache's ``crop``: that one reads the cache's length
    from the device."""
    for layer in getattr(cache, "layers", ()):
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.sub_(tokens)
        else:
            layer.crop(-tokens)


def last_token_logits(output: Any) -> Any:
    """A rectified forward's output as the decode step would give it: the last token's logits (and hidden states
    and attentions, where asked for), in a model output or a plain tuple (``return_dict=False``, logits first)."""
    if isinstance(output, tuple):
        return (_last(output[0]), *output[1:]) if output else output
    for name, last in (("logits", _last), ("hidden_states", _last), ("attentions", _last_row)):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            setattr(output, name, last(value))
        elif isinstance(value, tuple):
            setattr(output, name, tuple(last(t) for t in value))
    return output


def _last(x: torch.Tensor) -> torch.Tensor:
    """(B, n, ...) -> (B, 1, ...)."""
    return x[:, -1:] if x.dim() >= 2 else x


def _last_row(x: torch.Tensor) -> torch.Tensor:
    """Attention weights (B, H, n, L) -> (B, H, 1, L)."""
    return x[:, :, -1:] if x.dim() == 4 else x
