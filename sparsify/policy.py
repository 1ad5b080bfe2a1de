"""Policies: ordered rules that say which attention method serves which attention call.

A policy is a YAML or TOML file, a dict, or a preset name::

    rules:
      - when: {layers: "0-2"}
        use: dense
      - when: {phase: prefill, min_seq_len: 1024}
        use: sink_window
        with: {sink: 64, window: 2048}
    default: dense

``when`` keys (all optional, all must hold): ``layers`` ("0-2", "2-", "0,3,8-", an int or a list),
``modules`` (a glob on the attention module's path, e.g. ``"model.layers.1*"``), ``phase`` (prefill, decode,
diffusion, or a list), ``min_seq_len`` / ``max_seq_len`` (the key/context length, inclusive), ``heads`` (query
heads, same syntax as layers: a rule with heads serves only those heads, the rest of the call goes on to later
rules). The first rule whose ``when`` holds wins; ``default`` serves the rest.

Indices never count from the end: a range with a leading dash ("-1", "-5") is refused, since a Python reader
takes "-1" for the last layer while the range reading would be "0-1"; write "0-1", or name the layer.

Loading checks the whole document and reports every problem in one :class:`PolicyError`, one line per problem,
each starting with the field's path (``rules[1].with``, ``rules[0].when.layers``, ``default.use``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import tomllib
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from .errors import PolicyError, PolicyWarning
from .methods.base import METHODS, PHASES, MethodSpec, parse_method_spec
from .registry import unknown_name_message

Phase = Literal["prefill", "decode", "diffusion"]
IndexSet = Union[pydantic.NonNegativeInt, list[pydantic.NonNegativeInt], str]


class WhenModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    layers: IndexSet | None = Field(None, description='Layer indices: "0-2", "2-", "0,3,8-", an int or a list')
    modules: str | None = Field(None, description="Glob on the attention module path, e.g. model.layers.1*")
    phase: Phase | list[Phase] | None = None
    min_seq_len: pydantic.NonNegativeInt | None = Field(None, description="Key (context) length at least this")
    max_seq_len: pydantic.NonNegativeInt | None = Field(None, description="Key (context) length at most this")
    heads: IndexSet | None = Field(None, description="Query heads this rule serves (same syntax as layers)")


# RuleModel and PolicyModel describe the document for the JSON schema and name its allowed keys; the document is
# validated piece by piece (WhenModel per rule, parse_method_spec per method) so that one bad rule does not hide
# the problems of the others.
class RuleModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    when: WhenModel = Field(default_factory=WhenModel)
    use: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")


class PolicyModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    rules: list[RuleModel] = Field(default_factory=list)
    default: str | dict[str, Any] = "dense"


def _keys(model: type[BaseModel]) -> list[str]:
    """The keys a document may use for ``model`` (aliases such as ``with`` included)."""
    return [field.alias or name for name, field in model.model_fields.items()]


@dataclass(frozen=True)
class IndexRanges:
    """A set of non-negative indices written as inclusive ranges; ``stop=None`` means "to the end"."""

    ranges: tuple[tuple[int, int | None], ...]
    text: str

    @classmethod
    def parse(cls, value: int | list[int] | str, field: str) -> "IndexRanges":
        """``field`` is the path used in errors and ends in ``layers`` or ``heads``."""
        if isinstance(value, int):
            return cls(((value, value),), str(value))
        if isinstance(value, list):
            return cls(tuple((i, i) for i in value), ",".join(map(str, value)))
        ranges = []
        for part in value.replace(" ", "").split(","):
            match = re.fullmatch(r"(\d*)(-?)(\d*)", part)
            if match and not match[1] and match[2] and match[3]:
                raise PolicyError(_leading_dash_message(field, part))
            if not part or not match or not match[1]:
                raise PolicyError(
                    f'{field}: cannot read {value!r}; write indices and inclusive ranges like "0-2", "2-", "0,3,8-"'
                )
            start = int(match[1])
            stop = (int(match[3]) if match[3] else None) if match[2] else start
            if stop is not None and stop < start:
                raise PolicyError(f"{field}: range {part!r} runs backwards")
            ranges.append((start, stop))
        return cls(tuple(ranges), value)

    def __contains__(self, index: int) -> bool:
        return any(start <= index and (stop is None or index <= stop) for start, stop in self.ranges)

    def largest_bound(self) -> int:
        return max(stop if stop is not None else start for start, stop in self.ranges)


def _leading_dash_message(field: str, part: str) -> str:
    """Why "-N" is refused: it has two readings, and either choice would surprise the readers of the other."""
    noun = "head" if field.endswith("heads") else "layer"
    bound = part[1:]
    return (
        f"{field}: {part!r} is ambiguous: read as Python it is {noun} {part} counted from the end (-1: the last "
        f"{noun}), read as a range it is {noun}s 0 to {bound}; indices here never count from the end, so write "
        f"\"0-{bound}\" for {noun}s 0 to {bound}, or name the {noun} by its index (e.g. 29 for the last of 30)"
    )


@dataclass(frozen=True)
class When:
    layers: IndexRanges | None = None
    modules: str | None = None
    phases: tuple[str, ...] | None = None
    min_seq_len: int | None = None
    max_seq_len: int | None = None
    heads: IndexRanges | None = None

    @property
    def is_catch_all(self) -> bool:
        return self == When()

    @property
    def depends_on_length(self) -> bool:
        return self.min_seq_len is not None or self.max_seq_len is not None

    def matches(self, *, layer: int | None, module_path: str, phase: str, seq_len: int | None) -> bool:
        """Whether the rule holds for one attention call (heads are handled by the caller).

        ``seq_len`` None means the length is unknown (symbolic); a length condition then does not hold.
        """
        if self.layers is not None and (layer is None or layer not in self.layers):
            return False
        if self.modules is not None and not fnmatch.fnmatchcase(module_path, self.modules):
            return False
        if self.phases is not None and phase not in self.phases:
            return False
        if self.depends_on_length:
            if seq_len is None:
                return False
            if self.min_seq_len is not None and seq_len < self.min_seq_len:
                return False
            if self.max_seq_len is not None and seq_len > self.max_seq_len:
                return False
        return True


@dataclass(frozen=True)
class Rule:
    index: int
    when: When
    spec: MethodSpec

    def describe(self) -> str:
        return f"rules[{self.index}]"


@dataclass(frozen=True)
class Policy:
    """A validated policy: rules in order (first match wins) and the default method."""

    rules: tuple[Rule, ...]
    default: MethodSpec
    source: str = "<dict>"

    @classmethod
    def load(cls, policy: "Policy | str | Path | dict") -> "Policy":
        """Accepts a Policy, a preset name, a .yaml/.yml/.toml path, or a dict of the file's shape."""
        if isinstance(policy, Policy):
            return policy
        if isinstance(policy, dict):
            return cls.from_dict(policy)
        if isinstance(policy, (str, Path)):
            text = str(policy)
            if isinstance(policy, str) and text in preset_names():
                return cls.from_dict(read_policy_file(_preset_path(text)), source=f"preset {text}")
            path = Path(text)
            if path.suffix.lower() in (".yaml", ".yml", ".toml"):
                if not path.is_file():
                    raise PolicyError(f"policy: no such file {text!r}")
                return cls.from_dict(read_policy_file(path), source=str(path))
            raise PolicyError(
                f"policy: {text!r} is neither a preset ({', '.join(preset_names())}) nor a .yaml/.yml/.toml file"
                + _did_you_mean(text, preset_names())
            )
        raise PolicyError(f"policy: expected a preset name, a file path, a dict or a Policy, got {type(policy).__name__}")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Policy":
        """Validate a document of the file's shape; every problem in it is reported, in one PolicyError."""
        if not isinstance(data, dict):
            raise PolicyError(f"policy: the top level must be a mapping with 'rules' and 'default', got {type(data).__name__}")
        allowed = _keys(PolicyModel)
        problems = [unknown_name_message("policy", key, allowed, "key") for key in data if key not in allowed]
        raw_rules = data.get("rules", [])
        if not isinstance(raw_rules, list):
            problems.append(f"rules: expected a list of rules, got {type(raw_rules).__name__} {raw_rules!r}")
            raw_rules = []
        rules = [_parse_rule(raw, index, problems) for index, raw in enumerate(raw_rules)]
        default = _parse_method(data.get("default", "dense"), "default", problems)
        if problems:
            raise PolicyError(_problems_message(problems, source))
        policy = cls(tuple(rules), default, source)
        policy._warn_unreachable()
        return policy

    def _warn_unreachable(self) -> None:
        seen: dict[When, Rule] = {}
        for rule in self.rules:
            if rule.when in seen:
                warnings.warn(
                    f"{rule.describe()}: same 'when' as {seen[rule.when].describe()}, so it never applies",
                    PolicyWarning, stacklevel=3,
                )
            else:
                earlier_catch_all = next((r for r in seen.values() if r.when.is_catch_all), None)
                if earlier_catch_all is not None:
                    warnings.warn(
                        f"{rule.describe()}: unreachable, {earlier_catch_all.describe()} matches everything before it",
                        PolicyWarning, stacklevel=3,
                    )
            seen.setdefault(rule.when, rule)

    def for_model(self, num_layers: int, num_heads: int, kv_heads: int | None = None) -> "Policy":
        """This policy for a model of ``num_layers`` layers: each method's parameters bound to it
        (:meth:`~sparsify.AttentionMethod.for_model`, e.g. default layer roles resolved). Raises, before any
        forward, for what the model cannot honour, every problem in one PolicyError.

        Layer or head indices the model does not have (in a rule's ``when`` or a method's parameters); and, given
        ``kv_heads`` (the model's key/value head count), a ``heads`` rule that splits a GQA group: the
        ``num_heads // kv_heads`` query heads sharing one KV head read the same keys and values, so one method must
        serve all of them.
        """
        problems = []
        bound = {}
        for where, spec in [(rule.describe(), rule.spec) for rule in self.rules] + [("default", self.default)]:
            try:
                bound[where] = MethodSpec(spec.name, spec.method.for_model(spec.params, num_layers))
            except PolicyError as error:  # one problem a line, each under the rule's path
                problems += [f"{where}.with.{line}" for line in str(error).splitlines()]
        group = num_heads // kv_heads if kv_heads else 1
        for rule in self.rules:
            for field, ranges, count, noun in (
                ("layers", rule.when.layers, num_layers, "layers"),
                ("heads", rule.when.heads, num_heads, "query heads"),
            ):
                if ranges is not None and ranges.largest_bound() >= count:
                    problems.append(
                        f"{rule.describe()}.when.{field}: {ranges.text!r} is out of range for a model with "
                        f"{count} {noun} (0-{count - 1})"
                    )
            split = _first_split_group(rule.when.heads, num_heads, group) if rule.when.heads is not None else None
            if split is not None:
                problems.append(
                    f"{rule.describe()}.when.heads: {rule.when.heads.text!r} splits a GQA group: query heads "
                    f"{split}-{split + group - 1} share one KV head (the model has {num_heads} query heads, {group} "
                    f"per KV head); give whole groups (multiples of {group}, e.g. \"0-{group - 1}\")"
                )
        if problems:
            raise PolicyError(_problems_message(problems, self.source))
        rules = tuple(dataclasses.replace(rule, spec=bound[rule.describe()]) for rule in self.rules)
        return dataclasses.replace(self, rules=rules, default=bound["default"])

    @property
    def uses_sparse_methods(self) -> bool:
        return any(spec.name != "dense" for spec in [self.default, *(rule.spec for rule in self.rules)])

    @property
    def depends_on_length(self) -> bool:
        return any(rule.when.depends_on_length for rule in self.rules)

    def describe(self) -> str:
        lines = [f"policy from {self.source}:"]
        for rule in self.rules:
            lines.append(f"  {rule.describe()}: when {_when_text(rule.when)} use {rule.spec.describe()}")
        lines.append(f"  default: {self.default.describe()}")
        return "\n".join(lines)


def _when_text(when: When) -> str:
    parts = []
    for key in ("layers", "heads"):
        value = getattr(when, key)
        if value is not None:
            parts.append(f"{key}={value.text}")
    for key in ("modules", "phases", "min_seq_len", "max_seq_len"):
        value = getattr(when, key)
        if value is not None:
            parts.append(f"{key}={value if not isinstance(value, tuple) else '|'.join(value)}")
    return " ".join(parts) or "always"


def _first_split_group(heads: IndexRanges, num_heads: int, group: int) -> int | None:
    """The first query head of the first GQA group (``group`` consecutive heads) that ``heads`` covers only
    partly, or None when it takes every group whole or not at all."""
    for first in range(0, num_heads, group):
        served = [head in heads for head in range(first, first + group)]
        if any(served) and not all(served):
            return first
    return None


def _problems_message(problems: list[str], source: str) -> str:
    """A single problem reads as its line alone; several get a count, then one indented line each."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the policy from {source}:\n" + "\n".join(f"  {line}" for line in problems)


def _parse_rule(raw: Any, index: int, problems: list[str]) -> Rule | None:
    """The rule ``rules[index]``, or None once its problems (all of them) are added to ``problems``."""
    where, allowed = f"rules[{index}]", _keys(RuleModel)
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping with keys {', '.join(allowed)}, got {type(raw).__name__} {raw!r}")
        return None
    before = len(problems)
    problems += [unknown_name_message(where, key, allowed, "key") for key in raw if key not in allowed]
    when = _parse_when(raw.get("when", {}), f"{where}.when", problems)
    spec = _parse_method({key: raw[key] for key in ("use", "with") if key in raw}, where, problems)
    return Rule(index, when, spec) if len(problems) == before else None


def _parse_method(value: Any, where: str, problems: list[str]) -> MethodSpec | None:
    """The method spec at ``where`` (``rules[i]`` or ``default``), or None once its problems are added."""
    try:
        return parse_method_spec(value, where)
    except PolicyError as error:
        # parse_method_spec joins the problems of one ``with`` block by "; ", each starting with ``where``:
        # split them back into lines ("; allowed: ..." inside a line does not start with ``where``).
        problems += re.split(rf"; (?={re.escape(where)}[.\[:])", str(error))
        return None


def _parse_when(raw: Any, where: str, problems: list[str]) -> When | None:
    """The ``when`` block at ``where``, or None once its problems are added to ``problems``."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of conditions ({', '.join(_keys(WhenModel))}), "
                        f"got {type(raw).__name__} {raw!r}")
        return None
    before = len(problems)
    try:
        model = WhenModel.model_validate(raw)
    except pydantic.ValidationError as error:
        problems += _when_error_lines(error, where)
        # The fields that passed are checked further too, so that their problems join the same report (fields
        # are independent: validating those alone cannot fail).
        failed = {problem["loc"][0] for problem in error.errors()}
        model = WhenModel.model_validate({key: value for key, value in raw.items() if key not in failed})
    ranges = {}
    for field in ("layers", "heads"):
        value = getattr(model, field)
        if value is not None:
            try:
                ranges[field] = IndexRanges.parse(value, f"{where}.{field}")
            except PolicyError as error:
                problems.append(str(error))
    if model.min_seq_len is not None and model.max_seq_len is not None and model.min_seq_len > model.max_seq_len:
        problems.append(f"{where}.min_seq_len: {model.min_seq_len} is larger than max_seq_len {model.max_seq_len}")
    if len(problems) > before:
        return None
    phases = None
    if model.phase is not None:
        phases = (model.phase,) if isinstance(model.phase, str) else tuple(model.phase)
    return When(layers=ranges.get("layers"), modules=model.modules, phases=phases, min_seq_len=model.min_seq_len,
                max_seq_len=model.max_seq_len, heads=ranges.get("heads"))


def _when_error_lines(error: pydantic.ValidationError, where: str) -> list[str]:
    """One line per problem of a ``when`` block.

    A union field (``layers``: int, list or str) fails once per member type. Errors at a list item
    (``phase[1]``) come from the member the value was meant as, so they alone are kept; otherwise the first
    member's line says it best.
    """
    lines: dict[str, str] = {}
    itemised = {problem["loc"][0] for problem in error.errors() if any(isinstance(p, int) for p in problem["loc"])}
    for problem in error.errors():
        field = problem["loc"][0]
        if problem["type"] == "extra_forbidden":
            lines.setdefault(f"{where}.{field}", unknown_name_message(where, field, _keys(WhenModel), "key"))
            continue
        # Union members add their type name to the location (e.g. "str", "list[int]"): keep fields and indices.
        path = [p for p in problem["loc"] if isinstance(p, int) or p in WhenModel.model_fields]
        if field in itemised and not any(isinstance(p, int) for p in path):
            continue
        location = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
        if problem["type"] == "literal_error":
            lines.setdefault(location, f"{location}: {problem['input']!r} is not allowed; allowed: {', '.join(PHASES)}")
        elif problem["type"] == "int_type" and location.endswith((".layers", ".heads")):  # none of the forms
            lines.setdefault(location, f'{location}: expected an index, a list of indices, or a text like "0-2", '
                                       f'"2-", "0,3,8-" (got {problem["input"]!r})')
        else:
            lines.setdefault(location, f"{location}: {problem['msg']} (got {problem.get('input')!r})")
    return list(lines.values())


def _did_you_mean(text: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(text, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_policy_file(path: Path) -> Any:
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(text)
        return yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        raise PolicyError(f"policy: {path} is not valid {path.suffix.lstrip('.').upper()}: {error}") from None


def _preset_path(name: str) -> Path:
    return Path(str(resources.files("sparsify") / "presets" / f"{name}.yaml"))


def preset_names() -> list[str]:
    folder = resources.files("sparsify") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def policy_json_schema() -> dict:
    """JSON schema of the policy file for editors: the rule shape, plus each method's ``with`` parameters."""
    schema = PolicyModel.model_json_schema(by_alias=True)
    rule = schema["$defs"]["RuleModel"]
    rule["properties"]["use"]["enum"] = METHODS.names()
    rule["allOf"] = [
        {
            "if": {"properties": {"use": {"const": name}}},
            "then": {"properties": {"with": METHODS.get(name).params_validator.json_schema()}},
        }
        for name in METHODS.names()
    ]
    return schema
