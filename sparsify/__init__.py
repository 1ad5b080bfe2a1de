"""sparsify: a compiler for sparse attention in PyTorch.

``fast = sparsify.compile(model, policy)`` rewrites every attention of the model's graph into
``torch.ops.sparsify.*`` ops chosen by a declarative policy; ``sparsify.explain(fast)`` says what it did.
"""

import importlib.util
import os
import sys


def _checkout_root_after_site_packages() -> None:
    """Run from a source checkout (``python -m pytest`` or ``python -m sparsify`` there), the checkout's root is
    first on sys.path, and its ``kernels/`` folder (the source of ``sparsify.kernels``) would be found as the
    top-level ``kernels`` that transformers (>= 5.25) imports from the ``kernels`` distribution, breaking
    ``import transformers``. So the root goes to the end of sys.path, after site-packages, where it is still
    found for what only it has (installed, ``kernels`` is then the distribution). Nothing changes when the root
    is not on sys.path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    on_path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) == root]
    if not on_path or "kernels" in sys.modules:
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin != os.path.join(root, "kernels", "__init__.py"):
        return
    for entry in on_path:
        sys.path.remove(entry)
    sys.path.extend(on_path)


_checkout_root_after_site_packages()

from . import methods, ops, testing  # noqa: E402,F401  (registers the methods and the custom ops)
from .compiler import CompileOptions, compile  # noqa: E402
from .errors import PolicyError, PolicyWarning, ShapeError, SparsifyError  # noqa: E402
from .explain import explain  # noqa: E402
from .export import export  # noqa: E402
from .methods.base import METHODS, AttentionMethod, MethodSpec, register_method  # noqa: E402
from .policy import Policy, policy_json_schema, preset_names  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "METHODS", "AttentionMethod", "CompileOptions", "MethodSpec", "Policy", "PolicyError", "PolicyWarning",
    "ShapeError", "SparsifyError", "compile", "explain", "export", "policy_json_schema", "preset_names",
    "register_method",
]
