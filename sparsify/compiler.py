"""``sparsify.compile``: capture a model's forward with a Dynamo backend and rewrite every attention in it.

The backend receives one FX graph per frame Dynamo captures (in HF ``generate()``: a prefill frame, then decode
frames, whose cache length becomes symbolic after the first recompile). Each frame is rewritten by the pass
pipeline. When a decision depends on a length that is symbolic in the graph (a policy rule with
``min_seq_len``/``max_seq_len``), the frame keeps one rewritten variant per distinct set of decisions and picks
one per call from the concrete lengths — a guard of our own, so no recompilation per token.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import sympy
import torch
import torch.fx

from .passes.cost_model import CostModel, DeviceCeilings, load_ceilings
from .passes.fx_utils import value_of
from .pipeline import PipelineResult, analyse, copy_graph_module, decide, run_pipeline
from .policy import Policy


@dataclass(frozen=True)
class CompileOptions:
    """``phase``: "auto" infers prefill/decode from q_len; "diffusion" marks bidirectional calls as diffusion
    steps (the diffusion runtime sets it). ``dynamic`` is passed to ``torch.compile``. ``cost_model_fallback``:
    let the cost model keep attentions dense where it predicts dense is cheaper (off: the policy is followed
    to the letter, e.g. to study a method's accuracy at short lengths)."""

    phase: Literal["auto", "diffusion"] = "auto"
    dynamic: bool | None = None
    cost_model_fallback: bool = True

    def __post_init__(self):
        if self.phase not in ("auto", "diffusion"):
            raise ValueError(f"phase: {self.phase!r} is not allowed; allowed: auto, diffusion")


class _LengthReader:
    """Evaluates attentions' symbolic key lengths from a call's actual arguments.

    Dynamo passes each size symbol either as a SymInt argument or as a dimension of a tensor argument;
    ``placeholders`` (in argument order) say where.
    """

    def __init__(self, placeholders: list[torch.fx.Node], lengths: dict[int, sympy.Expr]):
        self.indices = list(lengths)
        symbols = sorted(set().union(*(e.free_symbols for e in lengths.values())), key=str) if lengths else []
        self.getters: list[Callable[[tuple], int]] = []
        for symbol in symbols:
            self.getters.append(_find_symbol(placeholders, symbol))
        self.evaluate = sympy.lambdify(symbols, [lengths[i] for i in self.indices], modules="math")

    def __call__(self, args: tuple) -> dict[int, int]:
        values = self.evaluate(*(get(args) for get in self.getters))
        return {index: int(value) for index, value in zip(self.indices, values)}


def _find_symbol(placeholders: list[torch.fx.Node], symbol: sympy.Symbol) -> Callable[[tuple], int]:
    for position, node in enumerate(placeholders):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.SymInt) and value.node.expr == symbol:
            return lambda args, p=position: int(args[p])
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and size.node.expr == symbol:
                    return lambda args, p=position, d=dim: int(args[p].shape[d])
    raise RuntimeError(f"sparsify: size symbol {symbol} is not readable from the graph's inputs")


class CompiledFrame:
    """One captured frame: its graph, its attentions, and the rewritten variants built so far."""

    def __init__(self, gm: torch.fx.GraphModule, policy: Policy, options: CompileOptions, ceilings: DeviceCeilings):
        self.original = gm
        self.policy = policy
        self.costs = CostModel(ceilings, options.cost_model_fallback)
        self.diffusion = options.phase == "diffusion"
        _, self.annotations = analyse(gm, diffusion=self.diffusion)
        self.variants: dict[tuple, PipelineResult] = {}
        self.last: PipelineResult | None = None
        self.calls = 0
        symbolic = {a.index: a.kv_len for a in self.annotations.attentions if not isinstance(a.kv_len, int)}
        self._reader = None
        # Lengths matter when a rule tests them, or when a sparse method may meet the cost model's threshold.
        if symbolic and (policy.depends_on_length or policy.uses_sparse_methods):
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            self._reader = _LengthReader(placeholders, symbolic)
        if self._reader is None:
            self.last = self._variant(None)

    def _variant(self, seq_lens: dict[int, int] | None) -> PipelineResult:
        decisions, _ = decide(self.original, self.annotations, self.policy, self.costs, seq_lens)
        if decisions.key not in self.variants:
            self.variants[decisions.key] = run_pipeline(
                copy_graph_module(self.original), self.policy, self.costs, diffusion=self.diffusion, seq_lens=seq_lens
            )
        return self.variants[decisions.key]

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self._reader is not None:
            self.last = self._variant(self._reader(args))
        return self.last.gm(*args)


def _graph_device(gm: torch.fx.GraphModule) -> torch.device:
    for node in gm.graph.nodes:
        value = value_of(node)
        if node.op == "placeholder" and isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.device
    return torch.device("cpu")


class SparsifyBackend:
    """The Dynamo backend: every frame it is given becomes a :class:`CompiledFrame`."""

    def __init__(self, policy: Policy, options: CompileOptions):
        self.policy = policy
        self.options = options
        self.frames: list[CompiledFrame] = []
        self.ceilings: dict[torch.device, DeviceCeilings] = {}

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        device = _graph_device(gm)
        if device not in self.ceilings:
            self.ceilings[device] = load_ceilings(device)
        frame = CompiledFrame(gm, self.policy, self.options, self.ceilings[device])
        self.frames.append(frame)
        return frame

    @property
    def compilations(self) -> int:
        return len(self.frames)


@dataclass
class SparsifyHandle:
    """Attached to a compiled model as ``.sparsify``: the policy, options and every captured frame."""

    policy: Policy
    options: CompileOptions
    backend: SparsifyBackend
    model_name: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def frames(self) -> list[CompiledFrame]:
        return self.backend.frames

    @property
    def calls(self) -> int:
        """Calls that went through sparsify's rewritten graphs (a call Dynamo ran eagerly does not count)."""
        return sum(frame.calls for frame in self.frames)

    def applied(self) -> tuple[set[str], set[str]]:
        """(methods other than dense that some attention runs, fallback reasons seen), over every variant built."""
        methods, reasons = set(), set()
        for frame in self.frames:
            for result in frame.variants.values():
                for decision in result.decisions.decisions:
                    if decision.untouched is not None:
                        reasons.add(decision.untouched)
                    for segment in decision.segments:
                        if segment.fallback:
                            reasons.add(segment.fallback)
                        elif segment.spec.name != "dense":
                            methods.add(segment.spec.name)
        return methods, reasons


def _own_forward(module: torch.nn.Module) -> Callable:
    """``module.forward`` behind a code object of its own.

    Dynamo keeps compiled frames, and its recompile limit, per code object. Copies of one model compiled with
    different policies would otherwise share ``type(model).forward``'s budget; once it ran out, Dynamo would run
    the plain (dense) forward without a word.
    """
    method = type(module).forward

    def forward(*args, **kwargs):
        return method(module, *args, **kwargs)

    forward.__code__ = forward.__code__.replace()
    functools.update_wrapper(forward, method)
    return forward


def check_policy_against(model: torch.nn.Module, policy: Policy) -> None:
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if layers is not None and heads is not None:
        policy.check_against_model(int(layers), int(heads))


def compile(model: torch.nn.Module, policy: "Policy | str | dict" = "dense", **options: Any) -> torch.nn.Module:
    """Return ``model`` with every attention of its forward rewritten by ``policy``.

    The result is a shallow copy of ``model`` (sharing its weights) whose ``forward`` is compiled, so it calls
    and ``generate()``s like the model; ``result.sparsify`` holds the policy and the captured frames
    (``sparsify.explain(result)`` prints them). The model itself is not changed.
    """
    resolved = Policy.load(policy)
    compile_options = CompileOptions(**options)
    check_policy_against(model, resolved)
    backend = SparsifyBackend(resolved, compile_options)
    compiled = copy.copy(model)
    compiled.forward = torch.compile(_own_forward(compiled), backend=backend, dynamic=compile_options.dynamic)
    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    compiled.sparsify = SparsifyHandle(resolved, compile_options, backend, model_name=name)
    return compiled
