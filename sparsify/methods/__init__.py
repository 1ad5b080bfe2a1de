"""Attention methods, one per file; importing this package registers them all."""

from . import block_topk, delta, dense, lessismore, resa, sink_window, sparsed  # noqa: F401
from .base import METHODS, AttentionMethod, MethodSpec, register_method

__all__ = ["METHODS", "AttentionMethod", "MethodSpec", "register_method"]
