"""The base of every attention method and the method registry.

A method is one file under ``sparsify/methods``: a frozen, validated parameter dataclass, a subclass of
:class:`AttentionMethod` that registers itself with :func:`register_method`, and the custom ops only it calls
(registered by that module; the Triton kernels behind them live in ``kernels/``). Adding a method is that file, its
kernel file and its tests.

The contract, as the passes use it: the policy asks the method whether it can serve a matched attention
(:meth:`~AttentionMethod.unsupported_reason`, for the phases it declares), the cost model how many (query, key)
pairs it visits (``visited_pairs``), the runtime which sequence state it keeps (:meth:`~AttentionMethod.state_specs`)
and the group planner what it publishes or reads (:meth:`~AttentionMethod.provides`,
:meth:`~AttentionMethod.needs`). The rewrite then emits its nodes in two parts, like FlashInfer's plan/run: what it
builds before it runs (:meth:`~AttentionMethod.plan`: layouts, row sets, selections) and what it runs per layer
(:meth:`~AttentionMethod.run`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pydantic

from ..errors import PolicyError
from ..registry import Registry, unknown_name_message

if TYPE_CHECKING:
    import torch.fx

    from ..passes.annotate import AttentionInfo
    from ..passes.rewrite import RewriteContext
    from ..state import StateSpec

PHASES = ("prefill", "decode", "diffusion")


@dataclass(frozen=True)
class MethodSpec:
    """A method name with its validated parameters: what a policy rule resolves to."""

    name: str
    params: Any

    @property
    def method(self) -> "AttentionMethod":
        return METHODS.get(self.name)

    def describe(self) -> str:
        fields = dataclasses.asdict(self.params) if dataclasses.is_dataclass(self.params) else {}
        if not fields:
            return self.name
        return f"{self.name}({', '.join(f'{k}={_short(v)}' for k, v in fields.items())})"

    def to_json(self) -> dict:
        return {"use": self.name, "with": dataclasses.asdict(self.params)}


def _short(value: Any) -> str:
    if isinstance(value, dict) and "name" in value and "params" in value:
        return value["name"] + json.dumps(value["params"], separators=(",", ":"))
    return repr(value)


class AttentionMethod:
    """One way of computing attention. Subclasses set ``name``, ``Params`` and ``phases``.

    ``Params`` is a frozen dataclass; its fields carry pydantic ``Field`` constraints in ``Annotated`` so that a
    policy's ``with:`` block is validated field by field, with the field named in every error.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    phases: ClassVar[tuple[str, ...]] = PHASES
    summary: ClassVar[str] = ""
    # True when the method intersects its pattern with the model's own sliding window (Mistral's), so it can serve
    # such layers; the others leave them to exact (windowed) dense attention.
    serves_model_window: ClassVar[bool] = False
    # True when one call chooses something from all the query heads of a layer together (LessIsMore's unified
    # set): a rule may not give the method some of a layer's heads only.
    whole_layers: ClassVar[bool] = False
    params_validator: "ParamsValidator"  # set by register_method

    def unsupported_reason(self, params: Any, attn: "AttentionInfo") -> str | None:
        """Why this method cannot serve ``attn`` (then it stays dense), or None when it can."""
        if attn.mask_kind != "none" and not (attn.mask_guard or attn.prefill_guard):
            return (f"an attention mask tensor is given ({attn.mask_kind}: padding or a custom mask), "
                    f"which {self.name} cannot honour")
        if attn.phase not in self.phases:
            return f"{self.name} serves phases {', '.join(self.phases)}, not {attn.phase}"
        if attn.match.model_window and not self.serves_model_window:
            return (f"the model's own sliding window ({attn.match.model_window} tokens) is not intersected with "
                    f"{self.name}'s pattern")
        if attn.causal and attn.q_len != attn.kv_len and not attn.match.causal_by_position:
            return "is_causal with q_len != kv_len (SDPA aligns that causal mask top-left)"
        return None

    def serves_left_padding(self, params: Any) -> bool:
        """Whether the method serves a left-padded batch sparsely: the rewrite shifts each row to start at position 0
        (``ctx.row_starts`` says by how much; ``ctx.unshifted`` holds the batch as given), and the method computes
        each row as it would alone. The others fall back to exact attention on such calls. False by default."""
        return False

    def layout(self, params: Any, q, k, config) -> Any:
        """The ``BlockLayout`` this method would visit for q: (B, Hq, Lq, D), k: (B, Hkv, Lk, D), or None for
        methods without one (used to draw patterns; the rewritten graph builds its layouts with ops)."""
        return None

    def calibration_problem(self, params: Any) -> str:
        """The calibration problem whose timings choose this method's launch config (``passes.cost_model``):
        "contiguous" (runs of key blocks: causal, windows, sinks; the default) or "scattered" (key blocks picked one
        by one, as top-k selections pick them: an index load before each K/V load)."""
        return "contiguous"

    def kernel_blocks(self, params: Any) -> tuple[int, int] | None:
        """(block_m, block_n) the block-sparse kernel must run with, where the method's own pattern fixes them;
        None (the default): the cost model picks the device's fastest."""
        return None

    def structure(self, params: Any, config) -> str:
        """How the emitted nodes are organised under launch ``config``, for ``explain`` (e.g. what is fused);
        empty when there is nothing to say."""
        return ""

    def state_specs(self, params: Any) -> tuple["StateSpec", ...]:
        """The tensors this method keeps per layer across forwards (``sparsify.state``), which :meth:`emit` reads
        and updates through ``ctx.sequence_state(name)``; none by default."""
        return ()

    def update_state(self, params: Any, attn: "AttentionInfo", ctx: "RewriteContext") -> None:
        """Emit the nodes that keep this method's sequence state in step with the cache, at every forward of a layer
        whose state holds it, whichever method computes that forward's attention (a dense prefill builds what a
        sparse decode reads). Runs before the attention; ``ctx.k``/``ctx.v`` are the layer's whole cache. Nothing by
        default."""

    def rectify_every(self, params: Any) -> int:
        """Every how many generated tokens the method wants the decode loop to re-encode the last ones densely
        (``sparsify.rectify``); 0, the default: never."""
        return 0

    def for_model(self, params: Any, num_layers: int) -> Any:
        """``params`` for a model of ``num_layers`` layers (what depends on the layer count resolved, e.g. default
        layer roles), checked against it: a PolicyError naming the field for a layer the model does not have.
        ``params`` as they are by default."""
        return params

    def provides(self, params: Any, attn: "AttentionInfo") -> str | None:
        """The name of a value this method publishes at ``attn`` (``ctx.publish``) for later attentions of the
        same forward to read, e.g. a token selection at a selection layer; None by default."""
        return None

    def needs(self, params: Any, attn: "AttentionInfo") -> str | None:
        """The name of a value this method reads at ``attn`` (``ctx.published``) from an earlier attention of the
        same forward; None by default. Where no earlier attention runs a method that provides it (its producer fell
        back to dense, or none exists), this attention runs dense too, with that reason (``passes/plan_groups``)."""
        return None

    def plan(self, params: Any, attn: "AttentionInfo", ctx: "RewriteContext") -> Any:
        """What this method builds before it runs, handed to :meth:`run`: nodes (or tuples of them). What depends
        on lengths alone goes through ``ctx.length_plan`` (built once per length: at capture when the frame's
        lengths are static, so every call reuses it; else once per forward, shared by every layer that asks for
        the same key); a selection that reads this layer's tensors is emitted with ``ctx.call``. None by default."""
        return None

    def run(self, params: Any, attn: "AttentionInfo", ctx: "RewriteContext", plan: Any) -> "torch.fx.Node":
        """Insert the per-layer nodes computing this attention from its ``plan``; return the node whose value
        replaces its output, of the attention's output shape ``(B, Hq, q_len, Dv)`` and dtype."""
        raise NotImplementedError

    def emit(self, params: Any, attn: "AttentionInfo", ctx: "RewriteContext") -> "torch.fx.Node":
        """The attention's replacement: :meth:`run` over :meth:`plan` (what the rewrite calls, and a composite
        method calls on its base)."""
        return self.run(params, attn, ctx, self.plan(params, attn, ctx))


def cache_decode_reason(name: str, attn: "AttentionInfo", pattern: str) -> str | None:
    """Why a decode method that reads a layer's whole KV cache itself (its positions, its padding, the query's
    offset) cannot serve ``attn``, or None: it serves decode calls with a described mask (a transformers model under
    ``sparsify.compile``) and does not intersect its ``pattern`` with a model's own sliding window."""
    if attn.phase != "decode":
        return f"{name} serves phases decode, not {attn.phase}"
    if not attn.match.causal_by_position:
        return f"{name} reads the cache through a described mask (transformers models under sparsify.compile)"
    if not attn.causal:
        return f"{name} serves causal self-attention over the cache; this call is not causal (e.g. cross-attention)"
    if attn.match.model_window:
        return (f"the model's own sliding window ({attn.match.model_window} tokens) is not intersected with "
                f"{name}'s {pattern}")
    return None  # key padding is the kernels' own


METHODS: Registry[AttentionMethod] = Registry("method")


def register_method(cls: type[AttentionMethod]) -> type[AttentionMethod]:
    """Class decorator: validates the class's declaration and registers one instance under ``cls.name``."""
    if not (dataclasses.is_dataclass(cls.Params) and cls.Params.__dataclass_params__.frozen):
        raise TypeError(f"{cls.__name__}.Params must be a frozen dataclass")
    method = cls()
    method.params_validator = ParamsValidator(cls.Params)
    METHODS.register(cls.name, method)
    return cls


class ParamsValidator:
    """Validates a ``with:`` mapping into a parameter dataclass: unknown keys and wrong types are refused
    (strictly: "64" is not an int), constraints given as ``Annotated[..., pydantic.Field(...)]`` are checked."""

    def __init__(self, params_type: type):
        self.params_type = params_type
        hints = typing.get_type_hints(params_type, include_extras=True)
        fields = {
            f.name: (hints[f.name], f.default if f.default is not dataclasses.MISSING else ...)
            for f in dataclasses.fields(params_type)
        }
        config = pydantic.ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True)
        self.model = pydantic.create_model(params_type.__name__, __config__=config, **fields)

    def validate_python(self, raw: dict) -> Any:
        validated = self.model.model_validate(raw)
        return self.params_type(**{name: getattr(validated, name) for name in self.model.model_fields})

    def json_schema(self) -> dict:
        return self.model.model_json_schema()


def parse_method_spec(value: Any, where: str) -> MethodSpec:
    """Parse ``"name"`` or ``{"use": name, "with": {...}}`` into a validated :class:`MethodSpec`.

    ``where`` is the location used in error messages, e.g. ``rules[1]``.
    """
    if isinstance(value, MethodSpec):
        return value
    if isinstance(value, str):
        name, raw_params = value, {}
    elif isinstance(value, dict):
        unknown = set(value) - {"use", "with"}
        if unknown:
            raise PolicyError(unknown_name_message(f"{where}", sorted(unknown)[0], ["use", "with"], "key"))
        if "use" not in value:
            raise PolicyError(f"{where}.use: missing; name a method ({', '.join(METHODS.names())})")
        name, raw_params = value["use"], value.get("with") or {}
        if not isinstance(name, str):
            raise PolicyError(f"{where}.use: expected a method name (string), got {type(name).__name__}")
        if not isinstance(raw_params, dict):
            raise PolicyError(f"{where}.with: expected a mapping of parameters, got {type(raw_params).__name__}")
    else:
        raise PolicyError(f"{where}: expected a method name or {{use: ..., with: ...}}, got {type(value).__name__}")
    method = METHODS.get(name, field=f"{where}.use")
    try:
        params = method.params_validator.validate_python(raw_params)
    except pydantic.ValidationError as error:
        raise PolicyError(format_validation_error(error, f"{where}.with", method.Params)) from None
    return MethodSpec(name, params)


def format_validation_error(error: pydantic.ValidationError, prefix: str, params_type: type | None) -> str:
    """One line per problem, each naming the field; unknown keys get the allowed ones and a close match."""
    lines = []
    for problem in error.errors():
        location = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in problem["loc"])
        if problem["type"] == "extra_forbidden" and params_type is not None:
            allowed = [f.name for f in dataclasses.fields(params_type)]
            lines.append(unknown_name_message(location.rsplit(".", 1)[0], problem["loc"][-1], allowed, "key"))
        elif problem["type"] == "value_error":  # raised by a nested validator, which names its own field
            lines.append(f"{location}: {str(problem['ctx']['error'])}")
        else:
            lines.append(f"{location}: {problem['msg']} (got {problem.get('input')!r})")
    return "; ".join(lines)
