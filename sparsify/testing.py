"""Helpers for users' own regression tests: compare a sparsified model with the dense one."""

from __future__ import annotations

from typing import Any

import torch


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@torch.no_grad()
def assert_close_to_dense(
    model: torch.nn.Module,
    compiled: torch.nn.Module,
    inputs: torch.Tensor | dict,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    min_top1_agreement: float | None = None,
) -> dict[str, float]:
    """Run both models on ``inputs`` and compare their logits (or outputs).

    With ``min_top1_agreement`` set, the check is instead that at least that share of positions have the same
    argmax (for sparse policies, which are not meant to be exact). Returns the measured numbers.
    """
    kwargs = inputs if isinstance(inputs, dict) else {"input_ids": inputs}
    expected = _logits(model(**kwargs)).float()
    actual = _logits(compiled(**kwargs)).float()
    if expected.shape != actual.shape:
        raise AssertionError(f"output shapes differ: dense {tuple(expected.shape)}, sparsified {tuple(actual.shape)}")
    max_abs = (expected - actual).abs().max().item()
    agreement = (expected.argmax(-1) == actual.argmax(-1)).float().mean().item()
    numbers = {"max_abs_diff": max_abs, "top1_agreement": agreement}
    if min_top1_agreement is not None:
        if agreement < min_top1_agreement:
            raise AssertionError(f"top-1 agreement {agreement:.4f} < {min_top1_agreement} ({numbers})")
    else:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    return numbers
