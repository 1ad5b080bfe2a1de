"""``sparsify eval``: what sparsity costs in accuracy, on a real model, against dense.

Retrieval tasks generated here (RULER-style, no downloads), fidelity against dense (per-layer error, KL and
top-1 agreement over a prompt and a teacher-forced continuation), and long greedy generation agreement.
It uses the library only through its public API: ``sparsify.compile`` and ``sparsify.explain``.
"""

from .runner import EvalConfig, EvalResult, evaluate
from .tasks import TASKS, Sample, Task

__all__ = ["TASKS", "EvalConfig", "EvalResult", "Sample", "Task", "evaluate"]
