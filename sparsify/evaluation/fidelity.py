"""Fidelity against dense, which needs no task: how far a policy's outputs drift from the dense model's.

* per layer, the relative error ``||o_sparse - o_dense|| / ||o_dense||`` of each attention module's output over
  the prompt (errors accumulate: layer i sees layer i-1's drift);
* over the prompt, KL(dense || sparse) of next-token distributions (mean, and by position in 16 buckets) and
  top-1 agreement;
* over a teacher-forced continuation (the dense model's own greedy tokens fed one at a time through the KV
  cache, so decode-phase methods run as in generation), KL and top-1 agreement per step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules in layer order (HF: ``...layers.<i>.self_attn``)."""
    found = [module for name, module in model.named_modules() if name.endswith("self_attn")]
    if not found:
        raise ValueError("fidelity: no '*.self_attn' modules found in the model")
    return found


@contextmanager
def recording(modules: list[torch.nn.Module]):
    """Record every output of ``modules`` (first element of a tuple) into a list per module, while active."""
    store: list[list[torch.Tensor]] = [[] for _ in modules]

    def make_hook(index):
        def hook(module, args, output):
            store[index].append((output[0] if isinstance(output, tuple) else output).detach())
        return hook

    handles = [module.register_forward_hook(make_hook(i)) for i, module in enumerate(modules)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def kl_and_agreement(dense_logits: torch.Tensor, sparse_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position KL(dense || sparse) and top-1 equality; logits (..., vocab)."""
    dense_log = F.log_softmax(dense_logits.float(), -1)
    sparse_log = F.log_softmax(sparse_logits.float(), -1)
    kl = (dense_log.exp() * (dense_log - sparse_log)).sum(-1)
    return kl, (dense_logits.argmax(-1) == sparse_logits.argmax(-1)).float()


@torch.no_grad()
def measure(model, compiled, ids: torch.Tensor, continuation: int) -> dict:
    """Fidelity of ``compiled`` against ``model`` (its dense self) on prompt ``ids`` (1, L)."""
    # The compiled model is a copy with modules of its own (sharing the weights): each is recorded on its own.
    with recording(attention_modules(model)) as store:
        dense = model(ids, use_cache=True)
        dense_layers = [outputs[-1] for outputs in store]
    with recording(attention_modules(compiled)) as store:
        sparse = compiled(ids, use_cache=True)
        sparse_layers = [outputs[-1] for outputs in store]
    layer_error = [((s.float() - d.float()).norm() / d.float().norm()).item()
                   for d, s in zip(dense_layers, sparse_layers)]
    kl, top1 = kl_and_agreement(dense.logits[0], sparse.logits[0])
    buckets = [chunk.mean().item() for chunk in kl.chunk(16)]
    result = {"seq_len": ids.shape[1], "layer_rel_error": layer_error, "prompt_kl": kl.mean().item(),
              "prompt_kl_by_position": buckets, "prompt_top1": top1.mean().item()}
    if continuation:
        tokens = dense.logits[:, -1:].argmax(-1)
        dense_cache, sparse_cache = dense.past_key_values, sparse.past_key_values
        step_kl, step_top1 = [], []
        for _ in range(continuation):
            dense_step = model(tokens, past_key_values=dense_cache, use_cache=True)
            sparse_step = compiled(tokens, past_key_values=sparse_cache, use_cache=True)
            kl, top1 = kl_and_agreement(dense_step.logits[0, -1], sparse_step.logits[0, -1])
            step_kl.append(kl.item())
            step_top1.append(top1.item())
            dense_cache, sparse_cache = dense_step.past_key_values, sparse_step.past_key_values
            tokens = dense_step.logits[:, -1:].argmax(-1)  # teacher forcing: both follow dense's tokens
        result.update(continuation_kl=step_kl, continuation_top1=sum(step_top1) / len(step_top1))
    return result


@torch.no_grad()
def generation_agreement(model, compiled, ids: torch.Tensor, tokens: int) -> dict:
    """Greedy generation of ``tokens`` tokens by both; share of equal positions and the common prefix length."""
    dense = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)[0, ids.shape[1]:]
    sparse = compiled.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)[0, ids.shape[1]:]
    equal = (dense == sparse).float()
    prefix = int(equal.cumprod(0).sum().item())
    return {"tokens": tokens, "agreement": equal.mean().item(), "common_prefix": prefix}
