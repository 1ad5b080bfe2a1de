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
from .state import RecentTokens

# Keyword inputs with one entry per token of the call (their last dimension): concatenated over a rectified chunk.
PER_TOKEN = ("input_ids", "position_ids", "cache_position", "token_type_ids")


def rectify_period(policy: Policy) -> int:
    """The policy's rectification period: the smallest :meth:`~sparsify.AttentionMethod.rectify_every` > 0 of the
    methods its rules (or its default) name, 0 for none."""
    periods = [spec.method.rectify_every(spec.params) for spec in [rule.spec for rule in policy.rules]
               + [policy.default]]
    return min((p for p in periods if p > 0), default=0)


def prepare_call(recent: RecentTokens, cache: Any, kwargs: dict, every: int) -> tuple[dict, bool]:
    """The keyword arguments of this forward, and whether it is a rectification. ``kwargs`` holds the call's
    ``input_ids`` (B, n). A decode step (n == 1 over a cache that holds tokens) is remembered; the ``every``-th
    since the last rectification crops the cache back by ``every - 1`` tokens and becomes a forward over the last
    ``every`` tokens. Host-side only: nothing here reads a device tensor."""
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
    chunk = dict(kwargs)
    for name in steps[-1]:
        chunk[name] = torch.cat([step[name] for step in steps], dim=-1)
    recent.forget(held)
    recent.rectifications += 1
    return chunk, True


def rewind(cache: Any, tokens: int) -> None:
    """Remove the cache's last ``tokens`` tokens, so that the next forward writes them again: ``crop`` with a
    negative count (the form every transformers version reads as "remove"); a static cache's layers without a
    ``crop`` (transformers 5.17) move their write position back, as later versions' crop does."""
    layers = getattr(cache, "layers", ())
    if all(hasattr(layer, "crop") for layer in layers):
        cache.crop(-tokens)
        return
    for layer in layers:
        layer.cumulative_length.sub_(tokens)  # in place: its address is static


def last_token_logits(output: Any) -> Any:
    """A rectified forward's output with the logits of its last token only (as the decode step would give)."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] > 1:
        output.logits = logits[:, -1:]
    return output
