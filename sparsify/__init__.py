"""sparsify: a compiler for sparse attention in PyTorch.

``fast = sparsify.compile(model, policy)`` rewrites every attention of the model's graph into
``torch.ops.sparsify.*`` ops chosen by a declarative policy; ``sparsify.explain(fast)`` says what it did.
"""

from . import methods, ops, testing  # noqa: F401  (registers the methods and the custom ops)
from .compiler import CompileOptions, compile
from .errors import PolicyError, PolicyWarning, ShapeError, SparsifyError
from .explain import explain
from .export import export
from .methods.base import METHODS, AttentionMethod, MethodSpec, register_method
from .policy import Policy, policy_json_schema, preset_names

__version__ = "0.1.0"

__all__ = [
    "METHODS", "AttentionMethod", "CompileOptions", "MethodSpec", "Policy", "PolicyError", "PolicyWarning",
    "ShapeError", "SparsifyError", "compile", "explain", "export", "policy_json_schema", "preset_names",
    "register_method",
]
