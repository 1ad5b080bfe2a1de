"""``sparsify.compile``: capture a model's forward with a Dynamo backend and rewrite every attention in it.

The backend receives one FX graph per frame Dynamo captures (in HF ``generate()``: a prefill frame, then decode
frames, whose cache length becomes symbolic after the first recompile). Each frame is rewritten by the pass
pipeline, then compiled by Inductor (the sparsify ops stay opaque calls) so the rest of the model is fused as
``torch.compile`` would fuse it. When a decision depends on a length that is symbolic in the graph (a policy rule
with ``min_seq_len``/``max_seq_len``, a cost-model threshold), the frame builds, at capture time, one rewritten
variant per distinct set of decisions the lengths can lead to, and picks one per call from the concrete lengths —
a guard of our own, so no recompilation per token.

transformers models are compiled through a private copy that uses the ``"sparsify"`` attention implementation
(``sparsify.hf``): masks are described, never materialised, so no graph holds an N x N tensor.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import functools
import inspect
import itertools
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

import sympy
import torch
import torch.fx

from torch._dynamo.utils import counters
from torch._inductor.compile_fx import compile_fx

from .errors import PolicyWarning, StateError
from .passes.apply_policy import apply_policy
from .passes.cost_model import CostModel, DeviceCeilings, load_ceilings
from .passes.fx_utils import value_of
from .passes.rewrite import fallback_counter_name
from .pipeline import PipelineResult, analyse, decide, run_pipeline
from .policy import Policy
from .rectify import last_token_logits, prepare_call, rectify_period
from .state import STATE_ATTRIBUTE, SequenceState, StateLayout, StateSize, state_for_call

if TYPE_CHECKING:
    from .distributed import HeadSplit


@dataclass(frozen=True)
class CompileOptions:
    """``phase``: "auto" infers prefill/decode from q_len; "diffusion" marks bidirectional calls as diffusion
    steps (the diffusion runtime sets it). ``dynamic`` is passed to ``torch.compile``. ``cost_model_fallback``:
    let the cost model keep attentions dense where it predicts dense is cheaper (off: the policy is followed
    to the letter, e.g. to study a method's accuracy at short lengths). ``inductor``: compile each rewritten graph
    with Inductor (None: on CUDA, where it fuses the rest of the model; off on the CPU, where the rewritten graph
    runs as it is and compiles in seconds). ``cuda_graphs``: replay frames whose shapes are all static (decode with a
    ``StaticCache``) as CUDA graphs, like ``torch.compile(mode="reduce-overhead")`` (None: wherever Inductor runs on
    CUDA). ``hf_attention``: give transformers models the ``"sparsify"`` attention implementation (masks
    described, not materialised); off, the model's own attention is matched in the graph as traced."""

    phase: Literal["auto", "diffusion"] = "auto"
    dynamic: bool | None = None
    cost_model_fallback: bool = True
    inductor: bool | None = None
    cuda_graphs: bool | None = None
    hf_attention: bool = True

    def __post_init__(self):
        if self.phase not in ("auto", "diffusion"):
            raise ValueError(f"phase: {self.phase!r} is not allowed; allowed: auto, diffusion")
        for name in ("inductor", "cuda_graphs"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; allowed: None, True, False")
        if self.cuda_graphs and self.inductor is False:
            raise ValueError("cuda_graphs: True needs inductor (CUDA graphs are Inductor's); allowed with "
                             "inductor: None or True")


class _LengthReader:
    """Evaluates symbolic lengths (keyed as the caller likes) from a call's actual arguments.

    Dynamo passes each size symbol either as a SymInt argument or as a dimension of a tensor argument;
    ``placeholders`` (in argument order) say where.
    """

    def __init__(self, placeholders: list[torch.fx.Node], lengths: dict[Any, sympy.Expr]):
        self.keys = list(lengths)
        symbols = sorted(set().union(*(e.free_symbols for e in lengths.values())), key=str) if lengths else []
        self.getters: list[Callable[[tuple], int]] = []
        for symbol in symbols:
            self.getters.append(_find_symbol(placeholders, symbol))
        self.evaluate = sympy.lambdify(symbols, [lengths[k] for k in self.keys], modules="math")

    def read(self, args: tuple) -> tuple[int, ...]:
        """The values of the size symbols in a call's arguments."""
        return tuple(get(args) for get in self.getters)

    def lengths(self, symbol_values: tuple[int, ...]) -> dict[Any, int]:
        return {key: int(value) for key, value in zip(self.keys, self.evaluate(*symbol_values))}

    def __call__(self, args: tuple) -> dict[Any, int]:
        return self.lengths(self.read(args))


def _find_symbol(placeholders: list[torch.fx.Node], symbol: sympy.Symbol) -> Callable[[tuple], int]:
    for position, node in enumerate(placeholders):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.SymInt) and value.node.expr == symbol:
            return lambda args, p=position: int(args[p])
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and size.node.expr == symbol:
                    return lambda args, p=position, d=dim: int(args[p].shape[d])
    raise LookupError(f"sparsify: size symbol {symbol} is not readable from the graph's inputs")


@dataclass
class Variant:
    """One rewritten graph of a frame and what runs it: Inductor's compiled callable, or the graph itself."""

    result: PipelineResult
    run: Callable
    compiled_by: str  # "inductor", "inductor + CUDA graphs", or why the graph runs as it is
    calls: int = 0
    # Reads the graph's symbolic lengths from a call's arguments; and what it read at the last call.
    length_reader: "_LengthReader | None" = None
    last_symbol_values: tuple[int, ...] | None = None

    def last_lengths(self) -> dict[tuple[int, str], int]:
        """The last call's lengths, ``{(attention index, "q_len" | "kv_len"): n}``, where the graph's lengths are
        symbolic (computed here, for explain, rather than on every call)."""
        if self.length_reader is None or self.last_symbol_values is None:
            return {}
        return self.length_reader.lengths(self.last_symbol_values)


class CompiledFrame:
    """One captured frame: its graph, its attentions, and its rewritten variants.

    Variants are built while Dynamo waits for the backend (Inductor needs Dynamo's shape environment for symbolic
    lengths): one for each distinct set of decisions the frame's lengths can lead to, found by probing the lengths
    at which a decision can change (rule bounds, cost-model thresholds).
    """

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: list, policy: Policy, options: CompileOptions,
                 ceilings: Callable[[int], DeviceCeilings], device: torch.device, state_layout: StateLayout,
                 head_split: HeadSplit | None = None):
        self.original = gm
        self.policy = policy
        self.state_layout = state_layout
        self.head_split = head_split
        self.costs = CostModel(ceilings, options.cost_model_fallback)
        self.diffusion = options.phase == "diffusion"
        self._example_inputs = example_inputs
        _, self.annotations = analyse(gm, diffusion=self.diffusion)
        self._backend = _inductor_setting(gm, self.annotations, options, device)
        self.variants: dict[tuple, Variant] = {}
        self.current: Variant | None = None  # the variant the last call ran (at capture: the last one built)
        self.calls = 0
        symbolic = {a.index: a.kv_len for a in self.annotations.attentions if not isinstance(a.kv_len, int)}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        # Key lengths pick the variant of a call, where variants differ by length: decisions change only at the
        # probed points, so a call's variant is the one of the largest probe at or below its length (a bisection,
        # not the policy and cost model run again per call).
        probes = [(lengths, self._decide(lengths).key) for lengths in self._probe_lengths(symbolic)] if symbolic else []
        keys = {key: lengths for lengths, key in probes}
        self._selector = _LengthReader(placeholders, symbolic) if len(keys) > 1 else None
        self._probe_starts = [max(lengths.values()) for lengths, _ in probes]
        self._probe_keys = [key for _, key in probes]
        self._explain_reader = self._lengths_for_explain(placeholders)
        for key, lengths in keys.items() or [(self._decide(None).key, None)]:
            self._variant(key, lengths)
        self._example_inputs = None  # only needed while Dynamo waits

    def _lengths_for_explain(self, placeholders: list[torch.fx.Node]) -> _LengthReader | None:
        """Reads a call's query and key lengths, for explain to print; None where the graph has no symbolic
        length, or one of its symbols is not an input (explain then prints the lengths as symbols)."""
        lengths = {(a.index, name): getattr(a, name) for a in self.annotations.attentions
                   for name in ("q_len", "kv_len") if not isinstance(getattr(a, name), int)}
        try:
            return _LengthReader(placeholders, lengths) if lengths else None
        except LookupError:
            return None

    def _decide(self, seq_lens: dict[int, int] | None):
        return decide(self.original, self.annotations, self.policy, self.costs, seq_lens)[0]

    def _probe_lengths(self, symbolic: dict[int, Any]) -> list[dict[int, int]]:
        """Lengths on each side of every point where a decision can change, the same for every symbolic attention:
        at run time a frame's key lengths are equal (a decode frame gives each layer's cache its own symbol). The
        points are the rules' length bounds and the cost model's thresholds at the decisions those bounds lead to:
        between two consecutive points nothing a decision depends on changes."""
        points = {1, 1 << 40}
        for rule in self.policy.rules:
            if rule.when.min_seq_len is not None:
                points |= {rule.when.min_seq_len - 1, rule.when.min_seq_len}
            if rule.when.max_seq_len is not None:
                points |= {rule.when.max_seq_len, rule.when.max_seq_len + 1}
        for length in sorted(points):
            report = apply_policy(self.original, self.annotations, self.policy,
                                  {index: length for index in symbolic})[1]
            for decision in report.decisions:
                for segment in decision.segments:
                    threshold = self.costs.threshold(segment, decision.attention)
                    if threshold:
                        points |= {threshold - 1, threshold}
        return [{index: max(length, 1) for index in symbolic} for length in sorted(points)]

    def _variant(self, key: tuple, seq_lens: dict[int, int] | None) -> Variant:
        """Build (at capture: Inductor needs Dynamo's shape environment) the variant of decisions ``key``, which
        these lengths lead to."""
        if key not in self.variants:
            result = run_pipeline(self.original, self.policy, self.costs, diffusion=self.diffusion,
                                  seq_lens=seq_lens, state_layout=self.state_layout, head_split=self.head_split)
            self.variants[key] = dataclasses.replace(self._compile(result),
                                                     length_reader=self._explain_reader)
        self.current = self.variants[key]
        return self.current

    def _compile(self, result: PipelineResult) -> Variant:
        patches, label = self._backend
        if patches is None:
            return Variant(result, result.gm, label)
        skips = counters["inductor"]["cudagraph_skips"]
        run = compile_fx(result.gm, self._example_inputs, config_patches=patches)
        if counters["inductor"]["cudagraph_skips"] > skips:
            # Inductor decides while compiling (e.g. inputs it mutates but cannot prove static): say what it did.
            label = "inductor (CUDA graphs requested, skipped by Inductor: its cudagraphs log says why)"
        return Variant(result, run, label)

    def _variant_of_call(self, args: tuple) -> Variant:
        """The variant for a call's lengths (the frame's key lengths are equal at run time; the longest is read)."""
        length = max(self._selector(args).values())
        key = self._probe_keys[max(bisect.bisect_right(self._probe_starts, length) - 1, 0)]
        self.current = self.variants[key]
        return self.current

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        variant = self._variant_of_call(args) if self._selector is not None else self.current
        variant.calls += 1
        if variant.length_reader is not None:
            variant.last_symbol_values = variant.length_reader.read(args)
        return variant.run(*args)

    @property
    def last(self) -> PipelineResult | None:
        """The pipeline's reports for the variant the last call ran."""
        return self.current.result if self.current is not None else None


def _inductor_setting(gm: torch.fx.GraphModule, annotations, options: CompileOptions, device: torch.device
                      ) -> tuple[dict | None, str]:
    """(Inductor config patches, label) for a frame; patches None where its rewritten graph runs as it is, the
    label then saying why."""
    inductor = options.inductor if options.inductor is not None else device.type == "cuda"
    if not inductor:
        return None, "runs as rewritten (inductor off, the default on the CPU)"
    if torch.is_grad_enabled():
        # Inductor would build a training graph, and the sparsify ops are for inference (they have no backward).
        return None, "runs as rewritten: captured with grad enabled (call the model under torch.no_grad())"
    graphs = options.cuda_graphs if options.cuda_graphs is not None else device.type == "cuda"
    # Decode frames only: prefill frames vary in length and synchronise once per forward (prefill_is_plain).
    decode = bool(annotations.attentions) and all(a.phase == "decode" for a in annotations.attentions)
    if graphs and device.type == "cuda" and decode and not _has_symbolic_inputs(gm):
        return {"triton.cudagraphs": True}, "inductor + CUDA graphs"
    return {}, "inductor"


def _has_symbolic_inputs(gm: torch.fx.GraphModule) -> bool:
    """Whether a frame takes a symbolic size (then CUDA graphs would be recorded again for every new size)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = value_of(node)
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in value.shape):
            return True
    return False


def _graph_device(gm: torch.fx.GraphModule) -> torch.device:
    for node in gm.graph.nodes:
        value = value_of(node)
        if node.op == "placeholder" and isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.device
    return torch.device("cpu")


class SparsifyBackend:
    """The Dynamo backend: every frame it is given becomes a :class:`CompiledFrame`."""

    def __init__(self, policy: Policy, options: CompileOptions, state_layout: StateLayout,
                 head_split: HeadSplit | None = None):
        self.policy = policy
        self.options = options
        self.state_layout = state_layout
        self.head_split = head_split
        self.frames: list[CompiledFrame] = []
        self._ceilings: dict[tuple[torch.device, int], DeviceCeilings] = {}

    def ceilings(self, device: torch.device, head_dim: int) -> DeviceCeilings:
        """The device's ceilings for a head_dim, loaded (on a GPU, calibrated if the disk cache lacks it) on first
        use, once per device and head_dim."""
        if (device, head_dim) not in self._ceilings:
            self._ceilings[device, head_dim] = load_ceilings(device, head_dim)
        return self._ceilings[device, head_dim]

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        device = _graph_device(gm)
        frame = CompiledFrame(gm, example_inputs, self.policy, self.options,
                              functools.partial(self.ceilings, device), device, self.state_layout, self.head_split)
        self.frames.append(frame)
        if not any(f.annotations.attentions for f in self.frames) and self.policy.uses_sparse_methods:
            warnings.warn("sparsify: 0 attentions matched in a captured frame: it runs unchanged (no sparse method "
                          "applies); sparsify.explain lists what was captured", PolicyWarning, stacklevel=2)
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
    uncompiled: Any = None  # sparsify.hf.UncompiledCalls of a transformers model, else None
    geometry: tuple[int, int, int] | None = None  # the model's (KV heads, head_dim, heads) where it keeps state
    head_split: HeadSplit | None = None  # how a tensor-parallel model's heads are split over its ranks

    def sequence_state(self, batch: int, capacity: int, device: torch.device, dtype: torch.dtype
                       ) -> SequenceState | None:
        """A fresh sequence state for ``batch`` rows of at most ``capacity`` tokens, for a caller that runs whole
        sequences without a cache (the diffusion loop passes it as ``sparsify_state`` to every step of one
        request); None where the policy's methods keep no state."""
        layout = self.backend.state_layout
        if layout.empty or self.geometry is None:
            return None
        return SequenceState(layout, StateSize(batch, capacity, *self.geometry), device, dtype)

    @property
    def uncompiled_calls(self) -> int:
        """Attention calls that ran outside sparsify's graphs (exact dense attention, not the policy's method)."""
        return self.uncompiled.count if self.uncompiled is not None else 0

    def unused_rules(self) -> list[str]:
        """The policy's rules that no attention of any captured frame matched (they did nothing)."""
        used = {segment.rule for frame in self.frames for variant in frame.variants.values()
                for decision in variant.result.decisions.decisions for segment in decision.segments}
        return [rule.describe() for rule in self.policy.rules if rule.describe() not in used]

    def fallback_calls(self) -> dict[str, int]:
        """Calls on which an attention ran densely instead of its method, by reason, over every variant run."""
        counts: dict[str, int] = {}
        for frame in self.frames:
            for variant in frame.variants.values():
                for decision in variant.result.decisions.decisions:
                    # Each guarded segment of an attention counts the same call: count the attention once.
                    runtime = max((runtime_fallbacks(variant, decision.attention, s) for s in decision.segments),
                                  default=0)
                    if runtime:
                        counts[RUNTIME_FALLBACK] = counts.get(RUNTIME_FALLBACK, 0) + runtime
        if self.uncompiled_calls:
            counts[UNCOMPILED] = self.uncompiled_calls
        return counts

    @property
    def frames(self) -> list[CompiledFrame]:
        return self.backend.frames

    @property
    def calls(self) -> int:
        """Calls that went through sparsify's rewritten graphs (a call Dynamo ran eagerly does not count)."""
        return sum(frame.calls for frame in self.frames)

    def applied(self) -> tuple[set[str], set[str]]:
        """(methods other than dense that some call ran, reasons some call or decision ran dense), over every
        variant that ran: a variant built at capture but never called, or a sparse segment whose every call a guard
        replaced by dense attention, does not count as the method applied."""
        methods, reasons = set(), set()
        for frame in self.frames:
            for variant in frame.variants.values():
                for decision in variant.result.decisions.decisions:
                    if decision.untouched is not None:
                        reasons.add(decision.untouched)
                    for segment in decision.segments:
                        if segment.fallback:
                            reasons.add(segment.fallback)
                        elif segment.spec.name != "dense" and variant.calls > runtime_fallbacks(
                                variant, decision.attention, segment):
                            methods.add(segment.spec.name)
        return methods, reasons | set(self.fallback_calls())


RUNTIME_FALLBACK = "dense at run time: a padded batch, a non-empty cache, or a mask that was not causal"
UNCOMPILED = "ran outside sparsify's graphs (Dynamo ran the model's own forward): exact dense attention"


def runtime_fallbacks(variant: Variant, attention, segment) -> int:
    """Calls on which a guard replaced this segment's sparse output by dense attention (0 for unguarded ones)."""
    counter = getattr(variant.result.gm, f"sparsify_state_{fallback_counter_name(attention, segment.start)}", None)
    return int(counter) if counter is not None else 0


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


def model_head_split(model: torch.nn.Module) -> HeadSplit | None:
    """How a tensor-parallel ``model``'s heads are split over its ranks (:func:`sparsify.distributed.head_split`);
    None outside a process group, where no weight can be sharded (and torch.distributed.tensor is not imported)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from .distributed import head_split

    return head_split(model)


def policy_for(model: torch.nn.Module, policy: Policy, split: HeadSplit | None = None) -> Policy:
    """``policy`` bound to ``model`` (:meth:`Policy.for_model`) when its config gives layer and head counts, else
    as it is. On a tensor-parallel model (``split``, :func:`sparsify.distributed.head_split`'s answer) its heads,
    checked against the whole model's, are mapped to this rank's own
    (:meth:`sparsify.distributed.HeadSplit.local_policy`)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if layers is None or heads is None:
        return policy
    bound = policy.for_model(int(layers), int(heads), kv_heads=int(kv_heads) if kv_heads else None)
    return split.local_policy(bound) if split is not None else bound


# Dynamo compiles a new frame for each distinct set of keyword arguments and for prefill and decode (static, then
# symbolic lengths): 8, its default per code object, is too few for one model used in several ways, and past it
# Dynamo runs the plain forward silently. Our forward has a code object of its own, so this budget is its alone.
RECOMPILE_LIMIT = 64


def _private_copy(model: torch.nn.Module, hf_attention: bool) -> torch.nn.Module:
    """A copy of ``model`` sharing its parameters and buffers. For transformers models with ``hf_attention`` the
    copy's modules and config are its own (deep-copied, tensors shared) and use the ``"sparsify"`` attention
    implementation; otherwise a shallow copy."""
    # A transformers model means transformers is imported already; other models never import it.
    transformers = sys.modules.get("transformers")
    if not (hf_attention and transformers is not None and isinstance(model, transformers.PreTrainedModel)):
        return copy.copy(model)
    from . import hf

    if not hf.can_install(model):
        return copy.copy(model)

    shared = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    copied = copy.deepcopy(model, shared)
    copied.sparsify_uncompiled_calls = hf.install(copied)
    return copied


def _num_layers(model: torch.nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)


def _capacity(cache: Any, model: torch.nn.Module) -> int:
    """The most tokens a sequence can hold: a static cache's length, else the model's context length (a dynamic
    cache's layers may report a sliding window's length, which is not the sequence's)."""
    if cache is not None and getattr(cache, "is_compileable", False):
        length = cache.get_max_length()  # transformers >= 5.16's name
        if isinstance(length, int) and length > 0:
            return length
    length = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if length <= 0:
        raise StateError("sparsify: the policy's methods keep sequence state sized by the context length, and "
                         "neither the cache nor config.max_position_embeddings gives one; pass a StaticCache")
    return length


def _forward_parameters(model: torch.nn.Module) -> list[str]:
    """The names of the model's forward parameters, in order, ``self`` left out (for binding positional ones)."""
    return list(inspect.signature(type(model).forward).parameters)[1:]


def _kv_geometry(config: Any, split: HeadSplit | None) -> tuple[int, int, int]:
    """(KV heads, head_dim, query heads) of a transformers config, in :class:`StateSize`'s order: this rank's own
    heads under tensor parallelism (``split``)."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if split is not None:
        return split.kv_heads, head_dim, split.q_heads
    return int(getattr(config, "num_key_value_heads", None) or heads), head_dim, heads


def _cache_keyword(model: torch.nn.Module) -> str:
    """The forward's name for the cache: ``cache`` in transformers 5.2x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _dynamic_cache(config: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=config)


def allocate_static_cache(cache: Any, model: torch.nn.Module, inputs: Any) -> None:
    """Allocate an empty static cache's tensors before the compiled forward runs, as transformers' ``generate()``
    does for a chunked prefill (its ``_get_static_cache_init_shape`` and the cache's ``early_initialization``).
    Left to the first ``update``, the allocation happens inside the captured prefill, whose guards then require an
    empty cache: the next ``generate()`` with the same (reset) cache would capture and compile the prefill again.
    ``inputs``: the call's ``input_ids`` (B, N) or ``inputs_embeds`` (B, N, hidden), for the batch size. Caches
    transformers would not initialise early (several devices, MLA, uneven tensor parallelism) stay lazy."""
    layers = getattr(cache, "layers", None)
    if (not layers or getattr(layers[0], "is_initialized", True) or not getattr(cache, "is_compileable", False)
            or not isinstance(inputs, torch.Tensor) or not hasattr(cache, "early_initialization")
            or not hasattr(model, "_get_static_cache_init_shape")):
        return
    shape = model._get_static_cache_init_shape()
    if shape is not None:
        num_heads, head_dim = shape
        cache.early_initialization(batch_size=inputs.shape[0], num_heads=num_heads, head_dim=head_dim,
                                   dtype=model.dtype, device=model.device)


def mark_static_cache(cache: Any) -> None:
    """Tell Dynamo that a preallocated (static) cache's tensors keep their addresses, as its own
    ``mark_static_address`` would when the cache is filled outside a compiled region. A cache that
    :func:`allocate_static_cache` leaves lazy is filled inside the compiled prefill, so without this the decode
    frame sees it as ordinary inputs that it mutates, and Inductor refuses to replay it as a CUDA graph."""
    layers = getattr(cache, "layers", ())
    if layers and hasattr(getattr(layers[-1], "keys", None), "_dynamo_static_input_type"):
        return  # marked at an earlier step (the prefill fills every layer): nothing per decode step
    if cache is None or not getattr(cache, "is_compileable", False):
        return
    for layer in layers:
        if not getattr(layer, "is_initialized", False):
            continue
        for name in ("keys", "values", "cumulative_length"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor) and not hasattr(tensor, "_dynamo_static_input_type"):
                torch._dynamo.mark_static_address(tensor, guard=False)  # a new cache: no recompile


def compile(model: torch.nn.Module, policy: "Policy | str | dict" = "dense", **options: Any) -> torch.nn.Module:
    """Return ``model`` with every attention of its forward rewritten by ``policy``.

    The result is a copy of ``model`` (sharing its weights) whose ``forward`` is compiled, so it calls and
    ``generate()``s like the model; ``result.sparsify`` holds the policy and the captured frames
    (``sparsify.explain(result)`` prints them). The model itself is not changed.
    """
    resolved = Policy.load(policy)
    compile_options = CompileOptions(**options)
    if compile_options.phase == "auto" and getattr(model, "is_diffusion_lm", False):
        # A masked diffusion LM's bidirectional forwards are denoising steps (sparsify.diffusion).
        compile_options = dataclasses.replace(compile_options, phase="diffusion")
    split = model_head_split(model)
    if split is not None and split.ranks > 1 and compile_options.cuda_graphs is None:
        # A collective inside sparsify's ops (LessIsMore's gather over the ranks) is not tried under CUDA graph
        # capture yet: replay sharded frames as they are.
        compile_options = dataclasses.replace(compile_options, cuda_graphs=False)
    resolved = policy_for(model, resolved, split)
    compiled = _private_copy(model, compile_options.hf_attention)
    # Sequence state reaches the graph through the sparsify attention implementation alone.
    carries_state = hasattr(compiled, "sparsify_uncompiled_calls")
    layout = StateLayout.for_policy(resolved, _num_layers(model)) if carries_state else StateLayout(())
    backend = SparsifyBackend(resolved, compile_options, layout, split)
    dynamo_forward = torch.compile(_own_forward(compiled), backend=backend, dynamic=compile_options.dynamic)
    every = rectify_period(resolved) if not layout.empty else 0
    # Asked once, not at every decode step.
    parameters = _forward_parameters(compiled) if every else []
    geometry = _kv_geometry(compiled.config, split) if not layout.empty else None

    @functools.wraps(dynamo_forward)
    def forward(*args, **kwargs):
        if every and args:  # by keyword from here on, so that a rectification can replace the per-token inputs
            kwargs = {**dict(zip(parameters, args)), **kwargs}
            args = ()
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        inputs = args[0] if args else kwargs.get("input_ids")
        inputs = inputs if inputs is not None else kwargs.get("inputs_embeds")
        allocate_static_cache(cache, compiled, inputs)
        mark_static_cache(cache)
        rectified = False
        # The diffusion loop passes its request's state (SparsifyHandle.sequence_state): each call is the whole
        # sequence, with no cache to carry it.
        if STATE_ATTRIBUTE not in kwargs and not layout.empty and isinstance(inputs, torch.Tensor):
            if cache is None and kwargs.get("use_cache", compiled.config.use_cache):
                # The cache the model would make itself, made here so that the state rides on it: a caller who
                # passes the returned cache back continues the same sequence.
                cache = kwargs[_cache_keyword(compiled)] = _dynamic_cache(compiled.config)
            size = StateSize(inputs.shape[0], _capacity(cache, compiled), *geometry)
            state = kwargs[STATE_ATTRIBUTE] = state_for_call(cache, layout, size, compiled.device, compiled.dtype)
            if state.recent.tokens + inputs.shape[1] > state.capacity:
                raise StateError(f"sparsify: this call takes the sequence to {state.recent.tokens + inputs.shape[1]} "
                                 f"tokens, past the {state.capacity} its sequence state was sized for (a static "
                                 "cache's length, else config.max_position_embeddings); pass a StaticCache that "
                                 "holds the whole sequence")
            if every and cache is not None and isinstance(kwargs.get("input_ids"), torch.Tensor):
                kwargs, rectified = prepare_call(state, cache, kwargs, every)
            elif inputs.shape[1]:
                state.recent.forget(state.recent.tokens + inputs.shape[1])
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            output = dynamo_forward(*args, **kwargs)
        return last_token_logits(output) if rectified else output

    compiled.forward = forward
    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    compiled.sparsify = SparsifyHandle(resolved, compile_options, backend, model_name=name,
                                       uncompiled=getattr(compiled, "sparsify_uncompiled_calls", None),
                                       geometry=geometry, head_split=split)
    return compiled
