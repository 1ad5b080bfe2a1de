"""Cost model: predicted time of each attention from FLOPs against per-device ceilings, in sympy.

For a sparse segment it (1) picks the kernel's launch config (block sizes, warps, stages) for the head_dim from
the device's calibrated table, (2) predicts sparse and dense time as sympy expressions of the key length ``N``,
solves for the length below which dense is cheaper, and falls back to dense there (the reason goes to
``explain``). Methods say how many (query, key) pairs they visit through ``AttentionMethod.visited_pairs``.

Ceilings come from a calibration run once per device and head_dim, the first time a sparse segment of that
head_dim is planned (SDPA's rate and the kernel's rate per candidate config, each config a kernel compile, so only
the head_dims a model has are calibrated), cached on disk under ``~/.cache/sparsify``; on a CPU nominal numbers
are used (the CPU path is the reference).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sympy
import torch
import torch.fx

from ..kernels.block_sparse_attention import KernelConfig
from ..methods.base import parse_method_spec
from .apply_policy import DENSE, HeadSegment, PolicyReport

N = sympy.Symbol("N", positive=True)

# Candidate launch configs per head_dim, each tried with and without TMA loads; calibration picks the fastest,
# the first is the default (no calibration, or no CUDA).
_SHAPES: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    64: ((128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 2), (128, 64, 4, 2),
         (128, 128, 4, 3), (128, 128, 4, 2)),
    128: ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3),
          (128, 32, 4, 4), (128, 64, 4, 2)),
    256: ((64, 64, 4, 2), (64, 32, 4, 2)),
}
CANDIDATE_CONFIGS: dict[int, tuple[KernelConfig, ...]] = {
    dim: tuple(KernelConfig(*shape, use_tma=tma) for tma in (False, True) for shape in shapes)
    for dim, shapes in _SHAPES.items()
}


# What the calibration times each candidate on (AttentionMethod.calibration_problem names one): "contiguous", a
# dense causal problem (its key blocks one run per query block); "scattered", bidirectional attention over a random
# SCATTERED_DENSITY of the key blocks of each query block and head, as block top-k selections visit them.
CALIBRATION_PROBLEMS = ("contiguous", "scattered")
SCATTERED_DENSITY = 0.3
CALIBRATION_SHAPE = (8192, 8)  # (tokens, heads) of the bf16 problems, B=1


def calibration_dim(head_dim: int) -> int:
    """The candidate head_dim whose configs serve ``head_dim``: the nearest size up (else the largest)."""
    return min(CANDIDATE_CONFIGS, key=lambda d: (d < head_dim, abs(d - head_dim)))


@dataclass(frozen=True)
class DeviceCeilings:
    """Rates of one device. ``*_tflops`` are achieved attention rates (4*D FLOPs per visited pair): ``rates`` per
    calibrated head_dim (dense SDPA, the kernel's best config), ``dense_tflops``/``sparse_tflops`` for the rest
    (nominal on a CPU; on a GPU every head_dim a sparse segment has is calibrated before it is planned)."""

    name: str
    dense_tflops: float
    sparse_tflops: float
    launch_overhead_ms: float
    configs: dict[int, KernelConfig] = field(default_factory=dict)  # per head_dim, the contiguous problem's best
    # Every candidate the calibration ran: {"head_dim", "problem", "config" (as a dict), "tflops"}; and those that
    # failed.
    measured: list[dict] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    rates: dict[int, tuple[float, float]] = field(default_factory=dict)  # head_dim -> (dense, sparse) TFLOP/s

    def rates_for(self, head_dim: int) -> tuple[float, float]:
        """(dense, sparse) TFLOP/s for ``head_dim``: its calibration's, else the device-wide values."""
        return self.rates.get(calibration_dim(head_dim), (self.dense_tflops, self.sparse_tflops))

    def with_calibration(self, other: "DeviceCeilings") -> "DeviceCeilings":
        """These ceilings with ``other``'s head_dims added or replaced (a calibration of head_dims these lack: a
        cache file from before per-head_dim rates holds measurements of them, which the new ones replace). The
        device-wide rates stay the first calibration's: every head_dim planned on a GPU has its own."""
        dims = set(other.rates)
        kept = [m for m in self.measured if m["head_dim"] not in dims]
        rejected = {key: why for key, why in self.rejected.items() if not any(key.startswith(f"D={d} ") for d in dims)}
        return dataclasses.replace(self, configs={**self.configs, **other.configs}, measured=kept + other.measured,
                                   rejected={**rejected, **other.rejected}, rates={**self.rates, **other.rates})

    def _timings(self, head_dim: int, problem: str) -> list[dict]:
        """The kernel's measured candidates on ``problem`` that serve ``head_dim``: its own, else the next size
        up's (entries from before problems were recorded are the contiguous problem's)."""
        dim = head_dim if any(m["head_dim"] == head_dim for m in self.measured) else calibration_dim(head_dim)
        return [m for m in self.measured if m["head_dim"] == dim and m["config"] != "sdpa"
                and m.get("problem", "contiguous") == problem]

    def rate_of(self, head_dim: int, config: KernelConfig, problem: str) -> float | None:
        """The rate the calibration measured for ``config`` on ``problem`` (``head_dim``'s candidates, else the
        next size up's), None where it did not time it."""
        asked = dataclasses.asdict(config)
        return next((m["tflops"] for m in self._timings(head_dim, problem) if m["config"] == asked), None)

    def config_for(self, head_dim: int, blocks: tuple[int, int] | None = None,
                   problem: str = "contiguous") -> KernelConfig:
        """The fastest config the calibration measured on ``problem`` for ``head_dim`` (with ``blocks`` =
        (block_m, block_n) if given, for layouts whose block size is fixed by the method), else the default
        candidate."""
        if problem not in CALIBRATION_PROBLEMS:
            raise ValueError(f"problem: {problem!r} is not one of {', '.join(CALIBRATION_PROBLEMS)}")
        default = self.configs.get(head_dim) or self.configs.get(calibration_dim(head_dim)) or \
            CANDIDATE_CONFIGS[calibration_dim(head_dim)][0]
        if blocks is None and problem == "contiguous":
            return default
        fitting = [m for m in self._timings(head_dim, problem)
                   if blocks is None or (m["config"]["block_m"], m["config"]["block_n"]) == blocks]
        if fitting:
            return KernelConfig(**max(fitting, key=lambda m: m["tflops"])["config"])
        if blocks is None:
            return default
        defaults = [c for c in CANDIDATE_CONFIGS.get(calibration_dim(head_dim), ()) if (c.block_m, c.block_n) == blocks]
        return defaults[0] if defaults else KernelConfig(*blocks)


# The CPU path runs the PyTorch reference: sparse work costs about as much per pair as dense, plus overhead.
CPU_NOMINAL = DeviceCeilings("cpu (nominal)", dense_tflops=0.2, sparse_tflops=0.1, launch_overhead_ms=1.0)


def dense_pairs(causal: bool):
    return N * (N + 1) / 2 if causal else N * N


def predicted_ms(pairs, batch_heads: int, head_dim: int, tflops: float, overhead_ms: float):
    return 4 * head_dim * batch_heads * pairs / (tflops * 1e12) * 1e3 + overhead_ms


def dense_threshold(sparse_ms, dense_ms) -> int | None:
    """Smallest length at which the sparse prediction beats dense (0 if always, None if never)."""
    gap = sympy.simplify(dense_ms - sparse_ms)
    roots = [r for r in sympy.solve(sympy.Eq(gap, 0), N) if r.is_real and r > 0]
    # Past the last crossing the sign of the gap no longer changes: it says which one wins from there on.
    start = int(math.ceil(max(float(r) for r in roots))) if roots else 0
    return start if gap.subs(N, start + 1) > 0 else None


@dataclass
class CostReport:
    """The planned decisions (the policy's, with launch configs, predictions and cost fallbacks), and a summary."""

    decisions: PolicyReport
    fallbacks: int
    predictions: dict[str, str]


@dataclass(frozen=True)
class _Plan:
    config: KernelConfig
    threshold: int | None
    sparse_ms: object  # callable: length -> predicted ms
    dense_ms: object
    device: str  # the name of the device the prediction is for


class CostModel:
    """Predictions on one device. The sympy work (building expressions, solving for the threshold) runs once per
    (method, heads, head_dim, causal), not once per call: decisions are re-taken per call when lengths are
    symbolic. ``allow_fallback`` off keeps every sparse segment sparse (with its prediction).

    ``ceilings(head_dim)`` loads the device's ceilings for a head_dim when a sparse segment of it is first planned:
    on a GPU without cached ceilings for it that calibrates (kernel compiles and timings), which a dense-only policy
    should not pay for."""

    def __init__(self, ceilings: Callable[[int], DeviceCeilings], allow_fallback: bool = True):
        self._load_ceilings = ceilings
        self.allow_fallback = allow_fallback
        self._plans: dict[tuple, _Plan] = {}

    def _plan(self, spec, batch_heads: int, head_dim: int, causal: bool) -> _Plan:
        key = (spec, batch_heads, head_dim, causal)
        if key not in self._plans:
            ceilings = self._load_ceilings(head_dim)
            problem = spec.method.calibration_problem(spec.params)
            config = ceilings.config_for(head_dim, spec.method.kernel_blocks(spec.params), problem)
            dense_tflops, sparse_tflops = ceilings.rates_for(head_dim)
            sparse_tflops = ceilings.rate_of(head_dim, config, problem) or sparse_tflops
            sparse = predicted_ms(spec.method.visited_pairs(spec.params, N, config), batch_heads, head_dim,
                                  sparse_tflops, 2 * ceilings.launch_overhead_ms)
            dense = predicted_ms(dense_pairs(causal), batch_heads, head_dim, dense_tflops,
                                 ceilings.launch_overhead_ms)
            self._plans[key] = _Plan(config, dense_threshold(sparse, dense), sympy.lambdify(N, sparse),
                                     sympy.lambdify(N, dense), ceilings.name)
        return self._plans[key]

    def _segment_plan(self, segment: HeadSegment, attention) -> _Plan | None:
        if segment.spec.name == DENSE or not hasattr(segment.spec.method, "visited_pairs"):
            return None
        batch_heads = (attention.batch if isinstance(attention.batch, int) else 1) * (segment.stop - segment.start)
        return self._plan(segment.spec, batch_heads, attention.head_dim, attention.causal)

    def threshold(self, segment: HeadSegment, attention) -> int | None:
        """The key length from which the segment's method is predicted cheaper than dense (None: no such length,
        or nothing to decide), when fallbacks are allowed."""
        plan = self._segment_plan(segment, attention)
        return plan.threshold if plan is not None and self.allow_fallback else None

    def plan_segment(self, segment: HeadSegment, attention, length: int | None) -> HeadSegment:
        plan = self._segment_plan(segment, attention)
        if plan is None:
            return segment
        if length is None:
            return dataclasses.replace(segment, config=plan.config)
        predicted = (f"sparse {plan.sparse_ms(length):.3f} ms vs dense {plan.dense_ms(length):.3f} ms at N={length} "
                     f"on {plan.device}")
        if self.allow_fallback and (plan.threshold is None or length < plan.threshold):
            # The reason names the threshold, not this length's numbers: it is part of the variant's key.
            where = "at every length" if plan.threshold is None else f"below N={plan.threshold}"
            return dataclasses.replace(
                segment, spec=parse_method_spec(DENSE, segment.rule), intended=segment.spec, config=None,
                predicted=predicted,
                fallback=f"cost model: dense is cheaper {where} on {plan.device}",
            )
        return dataclasses.replace(segment, config=plan.config, predicted=predicted)


def cost_model(
    gm: torch.fx.GraphModule, decisions: PolicyReport, model: CostModel, seq_lens: dict[int, int] | None
) -> tuple[torch.fx.GraphModule, CostReport]:
    """Attach launch configs and predictions to sparse segments; fall back to dense where it is cheaper. The
    decisions given are left as they are: the planned ones are the report's."""
    fallbacks, predictions = 0, {}
    updated = []
    for decision in decisions.decisions:
        attention = decision.attention
        length = attention.kv_len if isinstance(attention.kv_len, int) else (seq_lens or {}).get(attention.index)
        segments = []
        for segment in decision.segments:
            new = model.plan_segment(segment, attention, length)
            fallbacks += new.spec.name == DENSE and segment.spec.name != DENSE
            if new.predicted:
                predictions[f"{attention.name}[{segment.start}:{segment.stop}]"] = new.predicted
            segments.append(new)
        updated.append(dataclasses.replace(decision, segments=tuple(segments)))
    return gm, CostReport(PolicyReport(updated), fallbacks, predictions)


# -- calibration -------------------------------------------------------------------------------------------------


def cache_path(device_name: str) -> Path:
    """The disk cache of a device's ceilings, named by what a calibration's results depend on: the device, torch,
    and the calibration itself (its candidates, problems and sizes, hashed), so that a change to any of these
    calibrates again instead of reading timings that lack the new candidates."""
    root = Path(os.environ.get("SPARSIFY_CACHE", Path.home() / ".cache" / "sparsify"))
    safe = "".join(c if c.isalnum() else "-" for c in f"{device_name}-torch{torch.__version__}")
    recipe = json.dumps([{d: [dataclasses.asdict(c) for c in configs] for d, configs in CANDIDATE_CONFIGS.items()},
                         CALIBRATION_PROBLEMS, SCATTERED_DENSITY, CALIBRATION_SHAPE], sort_keys=True)
    return root / f"ceilings-{safe}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.json"


def _read_cache(path: Path) -> DeviceCeilings | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data["configs"] = {int(d): KernelConfig(**c) for d, c in data["configs"].items()}
    data["rates"] = {int(d): tuple(r) for d, r in data.get("rates", {}).items()}
    return DeviceCeilings(**data)


def load_ceilings(device: torch.device, head_dim: int) -> DeviceCeilings:
    """The device's ceilings, with ``head_dim`` calibrated: nominal on CPU; on CUDA read from the disk cache, the
    head_dim calibrated (and added to the cache) if the cache lacks it.

    Under a process group of several ranks (tensor parallelism), every rank must plan with the same ceilings (a
    rank falling back to dense where another runs a method that gathers across ranks would leave that one
    waiting): rank 0 reads or calibrates, every rank waits at a barrier (whatever its own view of the cache, which
    rank 0 may be writing), then all read rank 0's file."""
    if device.type != "cuda":
        return CPU_NOMINAL
    import torch.distributed as dist

    path = cache_path(torch.cuda.get_device_name(device))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            _cached_or_calibrated(path, device, calibration_dim(head_dim))
        dist.barrier()
        ceilings = _read_cache(path)
        if ceilings is None:
            raise RuntimeError(f"sparsify: rank {dist.get_rank()} cannot see the ceilings rank 0 wrote to {path}: "
                               "across hosts, every rank must see one cache folder (set SPARSIFY_CACHE to a shared "
                               "one)")
        return ceilings
    return _cached_or_calibrated(path, device, calibration_dim(head_dim))


def _cached_or_calibrated(path: Path, device: torch.device, dim: int) -> DeviceCeilings:
    """The cache at ``path`` if it holds ``dim``, else it with ``dim`` calibrated, written back."""
    cached = _read_cache(path)
    if cached is not None and dim in cached.rates:
        return cached
    calibrated = calibrate(device, dim)
    ceilings = calibrated if cached is None else cached.with_calibration(calibrated)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # a reader never sees half a file
    temporary.write_text(json.dumps(dataclasses.asdict(ceilings), indent=2))
    os.replace(temporary, path)
    return ceilings


def calibration_layouts(config: KernelConfig, seq_len: int, heads: int, device) -> dict:
    """{problem: layout} for ``config``'s blocks: the causal layout, and a bidirectional one keeping a random
    SCATTERED_DENSITY of the key blocks of each query block and head (CALIBRATION_PROBLEMS), drawn from a fixed
    seed, so configs of the same blocks are timed on the same layout."""
    from ..kernels.layout import causal_layout
    from ..kernels.sparsed import kernel_layout

    n_blocks = -(-seq_len // config.block_m)
    generator = torch.Generator(device=device).manual_seed(1)
    kept = torch.rand(1, heads, n_blocks, n_blocks, device=device, generator=generator) < SCATTERED_DENSITY
    return {"contiguous": causal_layout(seq_len, seq_len, config.block_m, config.block_n, device=device),
            "scattered": kernel_layout(kept, seq_len, config.block_m, config.block_n, seq_len // config.block_n)}


def calibrate(device: torch.device, head_dim: int) -> DeviceCeilings:
    """Time SDPA and every candidate config of the kernel for ``head_dim`` on each of CALIBRATION_PROBLEMS, in
    bf16 at CALIBRATION_SHAPE: a kernel compile per candidate and direction (most of the time), then a few
    milliseconds of timing each. A config that fails on any problem is no candidate at all."""
    import triton.testing

    from ..kernels.block_sparse_attention import block_sparse_attention

    seq_len, heads = CALIBRATION_SHAPE
    causal_pairs = seq_len * (seq_len + 1) / 2
    generator = torch.Generator(device=device).manual_seed(0)
    best: tuple[float, KernelConfig] | None = None
    measured: list[dict] = []
    rejected: dict[str, str] = {}
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, device=device, dtype=torch.bfloat16, generator=generator)
               for _ in range(3))
    flops = 4 * head_dim * heads * causal_pairs
    ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    dense_rate = flops / ms / 1e9
    measured.append({"head_dim": head_dim, "problem": "contiguous", "config": "sdpa", "tflops": dense_rate})
    for config in CANDIDATE_CONFIGS[head_dim]:
        rates = {}
        for problem, layout in calibration_layouts(config, seq_len, heads, device).items():
            try:
                ms = triton.testing.do_bench(lambda: block_sparse_attention(q, k, v, layout, config=config))
            except Exception as error:  # a config this device cannot run (shared memory, TMA) is no candidate
                rejected[f"D={head_dim} {problem} {config}"] = f"{type(error).__name__}: {str(error)[:200]}"
                break
            pairs = causal_pairs if problem == "contiguous" else layout.density() * seq_len ** 2
            rates[problem] = 4 * head_dim * heads * pairs / ms / 1e9
        else:
            measured += [{"head_dim": head_dim, "problem": problem, "config": dataclasses.asdict(config),
                          "tflops": rate} for problem, rate in rates.items()]
            if best is None or rates["contiguous"] > best[0]:
                best = (rates["contiguous"], config)
    if best is None:
        raise RuntimeError(f"sparsify: no kernel config ran on {torch.cuda.get_device_name(device)} for head_dim "
                           f"{head_dim}: {rejected}")
    launch = triton.testing.do_bench(lambda: torch.empty(1, device=device).add_(1))
    return DeviceCeilings(
        name=torch.cuda.get_device_name(device), dense_tflops=dense_rate, sparse_tflops=best[0],
        launch_overhead_ms=launch, configs={head_dim: best[1]}, measured=measured, rejected=rejected,
        rates={head_dim: (dense_rate, best[0])},
    )
