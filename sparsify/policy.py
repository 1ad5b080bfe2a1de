"""Policies: ordered rules that say which attention method serves which attention call.

A policy is a YAML or TOML file, a dict, or a preset name::

    rules:
      - when: {layers: "0-2"}
        use: dense
      - when: {phase: prefill, min_seq_len: 1024}
        use: sink_window
        with: {sink: 64, window: 2048}
    default: dense

``when`` keys (all optional, all must hold): ``layers`` ("0-2", "2-", "-5", "0,3,8-", an int or a list),
``modules`` (a glob on the attention module's path, e.g. ``"model.layers.1*"``), ``phase`` (prefill, decode,
diffusion, or a list), ``min_seq_len`` / ``max_seq_len`` (the key/context length, inclusive), ``heads`` (query
heads, same syntax as layers: a rule with heads serves only those heads, the rest of the call goes on to later
rules). The first rule whose ``when`` holds wins; ``default`` serves the rest.
"""

from __future__ import annotations

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
    layers: IndexSet | None = Field(None, description='Layer indices: "0-2", "2-", "-5", "0,3,8-", an int or a list')
    modules: str | None = Field(None, description="Glob on the attention module path, e.g. model.layers.1*")
    phase: Phase | list[Phase] | None = None
    min_seq_len: pydantic.NonNegativeInt | None = Field(None, description="Key (context) length at least this")
    max_seq_len: pydantic.NonNegativeInt | None = Field(None, description="Key (context) length at most this")
    heads: IndexSet | None = Field(None, description="Query heads this rule serves (same syntax as layers)")


class RuleModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    when: WhenModel = Field(default_factory=WhenModel)
    use: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")


class PolicyModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    rules: list[RuleModel] = Field(default_factory=list)
    default: str | dict[str, Any] = "dense"


_MODEL_AT = {"": PolicyModel, "rules": RuleModel, "when": WhenModel}


@dataclass(frozen=True)
class IndexRanges:
    """A set of non-negative indices written as inclusive ranges; ``stop=None`` means "to the end"."""

    ranges: tuple[tuple[int, int | None], ...]
    text: str

    @classmethod
    def parse(cls, value: int | list[int] | str, field: str) -> "IndexRanges":
        if isinstance(value, int):
            return cls(((value, value),), str(value))
        if isinstance(value, list):
            return cls(tuple((i, i) for i in value), ",".join(map(str, value)))
        ranges = []
        for part in value.replace(" ", "").split(","):
            match = re.fullmatch(r"(\d*)(-?)(\d*)", part)
            if not part or not match or (not match[2] and not match[1]) or (not match[1] and not match[3]):
                raise PolicyError(
                    f'{field}: cannot read {value!r}; write indices and inclusive ranges like "0-2", "2-", "-5", "0,3,8-"'
                )
            start = int(match[1]) if match[1] else 0
            stop = (int(match[3]) if match[3] else None) if match[2] else start
            if stop is not None and stop < start:
                raise PolicyError(f"{field}: range {part!r} runs backwards")
            ranges.append((start, stop))
        return cls(tuple(ranges), value)

    def __contains__(self, index: int) -> bool:
        return any(start <= index and (stop is None or index <= stop) for start, stop in self.ranges)

    def largest_bound(self) -> int:
        return max(stop if stop is not None else start for start, stop in self.ranges)


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
    def uses_sparse_methods(self) -> bool:
        return any(spec.name != "dense" for spec in [self.default, *(rule.spec for rule in self.rules)])

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
        if not isinstance(data, dict):
            raise PolicyError(f"policy: the top level must be a mapping with 'rules' and 'default', got {type(data).__name__}")
        try:
            document = PolicyModel.model_validate(data)
        except pydantic.ValidationError as error:
            raise PolicyError(_format_document_error(error)) from None
        rules = []
        for index, rule in enumerate(document.rules):
            where = f"rules[{index}]"
            when = _build_when(rule.when, f"{where}.when")
            spec = parse_method_spec({"use": rule.use, "with": rule.with_}, where)
            rules.append(Rule(index, when, spec))
        policy = cls(tuple(rules), parse_method_spec(document.default, "default"), source)
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

    def check_against_model(self, num_layers: int, num_heads: int) -> None:
        """Raise for layer or head indices the model does not have."""
        for rule in self.rules:
            for field, ranges, count, noun in (
                ("layers", rule.when.layers, num_layers, "layers"),
                ("heads", rule.when.heads, num_heads, "query heads"),
            ):
                if ranges is not None and ranges.largest_bound() >= count:
                    raise PolicyError(
                        f"{rule.describe()}.when.{field}: {ranges.text!r} is out of range for a model with "
                        f"{count} {noun} (0-{count - 1})"
                    )

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


def _build_when(model: WhenModel, where: str) -> When:
    phases = None
    if model.phase is not None:
        phases = (model.phase,) if isinstance(model.phase, str) else tuple(model.phase)
    if model.min_seq_len is not None and model.max_seq_len is not None and model.min_seq_len > model.max_seq_len:
        raise PolicyError(f"{where}.min_seq_len: {model.min_seq_len} is larger than max_seq_len {model.max_seq_len}")
    return When(
        layers=IndexRanges.parse(model.layers, f"{where}.layers") if model.layers is not None else None,
        modules=model.modules,
        phases=phases,
        min_seq_len=model.min_seq_len,
        max_seq_len=model.max_seq_len,
        heads=IndexRanges.parse(model.heads, f"{where}.heads") if model.heads is not None else None,
    )


def _format_document_error(error: pydantic.ValidationError) -> str:
    """One message per location (a union field fails once per member type: the first says it best)."""
    lines: dict[str, str] = {}
    for problem in error.errors():
        unknown_key = problem["type"] == "extra_forbidden"
        path = problem["loc"][:-1] if unknown_key else problem["loc"]
        # Union members add their type name to the location (e.g. "str", "list[int]"): keep real fields only.
        path = tuple(p for p in path if isinstance(p, int) or p in _all_field_names())
        location = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "policy"
        if unknown_key:
            parent = next((str(p) for p in reversed(path) if not isinstance(p, int)), "")
            model = _MODEL_AT.get(parent, PolicyModel)
            allowed = [f.alias or name for name, f in model.model_fields.items()]
            lines.setdefault(f"{location}.{problem['loc'][-1]}",
                             unknown_name_message(location, problem["loc"][-1], allowed, "key"))
        elif problem["type"] == "literal_error":
            lines.setdefault(location, f"{location}: {problem['input']!r} is not allowed; allowed: {', '.join(PHASES)}")
        else:
            lines.setdefault(location, f"{location}: {problem['msg']} (got {problem.get('input')!r})")
    return "; ".join(lines.values())


def _all_field_names() -> set[str]:
    names = set()
    for model in _MODEL_AT.values():
        names.update(f.alias or n for n, f in model.model_fields.items())
    return names


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
