"""The errors sparsify raises for bad input. Each message names the offending field and what is allowed."""


class SparsifyError(Exception):
    """Base class of every error sparsify raises on purpose."""


class PolicyError(SparsifyError, ValueError):
    """A policy that cannot be honoured: unknown method or key, wrong type, layer out of range..."""


class PolicyWarning(UserWarning):
    """A policy that works but probably not as meant (duplicate or unreachable rules)."""


class ShapeError(SparsifyError, ValueError):
    """Tensors a kernel or op cannot take (rank, head counts, dtype, device)."""


class FallbackWarning(UserWarning):
    """Attention that ran densely where the policy asked for a sparse method, for a reason only known at run time
    (Dynamo running the model's own forward, a padded batch). ``explain`` counts every such call."""


class StateError(SparsifyError):
    """A sequence's sparse state that cannot follow what was done to its cache (a crop its method cannot follow,
    a cache filled by another model)."""
