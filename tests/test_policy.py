"""The policy language: loading from YAML, TOML, dicts and presets; validation errors that name the field."""

import json
import warnings

import pytest

import sparsify
from sparsify.errors import PolicyError, PolicyWarning
from sparsify.policy import Policy, policy_json_schema, preset_names

EXAMPLE_YAML = """
rules:
  - when: {layers: "0-2"}
    use: dense
  - when: {phase: prefill, min_seq_len: 1024}
    use: sink_window
    with: {sink: 64, window: 2048}
default: dense
"""

EXAMPLE_TOML = """
default = "dense"
[[rules]]
when = {layers = "0-2"}
use = "dense"
[[rules]]
when = {phase = "prefill", min_seq_len = 1024}
use = "sink_window"
with = {sink = 64, window = 2048}
"""


def test_yaml_toml_and_dict_give_the_same_policy(tmp_path):
    (tmp_path / "p.yaml").write_text(EXAMPLE_YAML)
    (tmp_path / "p.toml").write_text(EXAMPLE_TOML)
    from_yaml = Policy.load(tmp_path / "p.yaml")
    from_toml = Policy.load(str(tmp_path / "p.toml"))
    from_dict = Policy.load({"rules": [{"when": {"layers": "0-2"}, "use": "dense"},
                                       {"when": {"phase": "prefill", "min_seq_len": 1024}, "use": "sink_window",
                                        "with": {"sink": 64, "window": 2048}}]})
    assert from_yaml.rules == from_toml.rules == from_dict.rules
    rule = from_yaml.rules[1]
    assert rule.spec.name == "sink_window" and rule.spec.params.window == 2048 and rule.spec.params.sink == 64
    assert rule.when.phases == ("prefill",) and rule.when.min_seq_len == 1024
    assert from_yaml.depends_on_length and from_yaml.uses_sparse_methods


def test_presets_load():
    assert {"dense", "sink_window", "block_topk"} <= set(preset_names())
    for name in preset_names():
        assert Policy.load(name).source == f"preset {name}"


def test_first_matching_rule_wins():
    policy = Policy.load({"rules": [{"when": {"layers": "2-"}, "use": "sink_window"},
                                    {"when": {"layers": [1, 3]}, "use": "block_topk"}], "default": "dense"})
    when_a, when_b = policy.rules[0].when, policy.rules[1].when
    kwargs = dict(module_path="model.layers.x", phase="prefill", seq_len=10)
    assert when_a.matches(layer=3, **kwargs) and when_b.matches(layer=3, **kwargs)
    assert not when_a.matches(layer=1, **kwargs) and when_b.matches(layer=1, **kwargs)


@pytest.mark.parametrize("text,contains", [
    ("0-2", [0, 1, 2]), ("2-", [2, 9, 100]), ("0-1", [0, 1]), ("0,3,8-", [0, 3, 8, 20]), (" 4 ", [4]),
])
def test_layer_ranges(text, contains):
    when = Policy.load({"rules": [{"when": {"layers": text}, "use": "dense"}]}).rules[0].when
    for layer in contains:
        assert layer in when.layers
    assert 5 not in when.layers or text in ("2-", "0,3,8-")


@pytest.mark.parametrize("field,text", [("layers", "-1"), ("layers", "0,-5"), ("heads", "-3")])
def test_a_leading_dash_is_refused_with_both_readings(field, text):
    """Python readers take "-1" for the last layer, the range syntax would read "0-1": refuse, do not guess."""
    with pytest.raises(PolicyError) as error:
        Policy.from_dict({"rules": [{"when": {field: text}, "use": "dense"}]})
    message, noun, bound = str(error.value), field[:-1], text.rsplit("-", 1)[1]
    assert message.startswith(f"rules[0].when.{field}: '-{bound}' is ambiguous")
    assert "counted from the end" in message and f"{noun}s 0 to {bound}" in message
    assert f'write "0-{bound}"' in message and f"name the {noun} by its index" in message


MALFORMED = [
    ({"rules": [{"use": "sparse_magic"}]}, "rules[0].use: unknown method 'sparse_magic'; allowed: block_topk, delta, dense"),
    ({"rules": [{"use": "sink_windw"}]}, "did you mean 'sink_window'?"),
    ({"rules": [{"when": {"layer": "0-2"}, "use": "dense"}]}, "unknown key 'layer'"),
    ({"rules": [{"when": {"layer": "0-2"}, "use": "dense"}]}, "did you mean 'layers'?"),
    ({"rules": [{"use": "sink_window", "with": {"windows": 64}}]}, "rules[0].with: unknown key 'windows'"),
    ({"rules": [{"use": "sink_window", "with": {"window": "2048"}}]}, "rules[0].with.window: Input should be a valid integer"),
    ({"rules": [{"use": "sink_window", "with": {"window": 0}}]}, "rules[0].with.window: Input should be greater than 0"),
    ({"rules": [{"use": "block_topk", "with": {"density": 1.5}}]}, "rules[0].with.density"),
    ({"rules": [{"when": {"phase": "training"}, "use": "dense"}]}, "'training' is not allowed; allowed: prefill, decode, diffusion"),
    ({"rules": [{"when": {"layers": "3-1"}, "use": "dense"}]}, "rules[0].when.layers: range '3-1' runs backwards"),
    ({"rules": [{"when": {"layers": "a-b"}, "use": "dense"}]}, "rules[0].when.layers: cannot read 'a-b'"),
    ({"rules": [{"when": {"min_seq_len": 100, "max_seq_len": 10}, "use": "dense"}]}, "min_seq_len: 100 is larger than max_seq_len 10"),
    ({"rules": [{"when": {"min_seq_len": -1}, "use": "dense"}]}, "rules[0].when.min_seq_len"),
    ({"rulez": []}, "unknown key 'rulez'"),
    ({"rules": "dense"}, "rules: expected a list of rules, got str 'dense'"),
    ({"rules": ["dense"]}, "rules[0]: expected a mapping with keys when, use, with, got str 'dense'"),
    ({"rules": [{"when": "0-2", "use": "dense"}]}, "rules[0].when: expected a mapping of conditions"),
    ({"default": {"use": "dense", "wiht": {}}}, "unknown key 'wiht'"),
    ([1, 2], "the top level must be a mapping"),
]


@pytest.mark.parametrize("policy,message", MALFORMED)
def test_malformed_policies_get_specific_errors(policy, message):
    with pytest.raises(PolicyError) as error:
        Policy.from_dict(policy)
    assert message in str(error.value)


def test_every_problem_of_a_policy_is_reported_at_once(tmp_path):
    """Problems in several rules, and several in one ``with`` block, all come in one error, one line each."""
    (tmp_path / "p.yaml").write_text(
        "rules:\n"
        "  - when: {layer: 1, phase: training}\n"
        "    use: dense\n"
        "  - use: sink_window\n"
        "    with: {windw: 64, sink: '4'}\n"
        "  - when: {layers: '-1'}\n"
        "    use: block_topk\n"
        "    with: {density: 1.5}\n"
        "default: {use: dense, wiht: {}}\n"
    )
    with pytest.raises(PolicyError) as error:
        Policy.load(tmp_path / "p.yaml")
    header, *lines = str(error.value).splitlines()
    assert header == f"7 problems in the policy from {tmp_path / 'p.yaml'}:"
    fields = [line.strip().split(":", 1)[0] for line in lines]
    assert fields == ["rules[0].when.phase", "rules[0].when", "rules[1].with.sink", "rules[1].with",
                      "rules[2].when.layers", "rules[2].with.density", "default"]
    assert "  rules[1].with: unknown key 'windw'; allowed: sink, window (did you mean 'window'?)" in lines
    assert "  rules[0].when: unknown key 'layer'; allowed: layers, modules, phase, min_seq_len, max_seq_len, " \
           "heads (did you mean 'layers'?)" in lines


def test_a_single_problem_stays_one_line():
    with pytest.raises(PolicyError) as error:
        Policy.from_dict({"rules": [{"use": "sink_window", "with": {"windw": 64}}]})
    assert str(error.value) == "rules[0].with: unknown key 'windw'; allowed: sink, window (did you mean 'window'?)"


def test_bad_files_and_names(tmp_path):
    with pytest.raises(PolicyError, match="neither a preset"):
        Policy.load("sink_windows")
    with pytest.raises(PolicyError, match="no such file"):
        Policy.load(str(tmp_path / "missing.yaml"))
    (tmp_path / "broken.yaml").write_text("rules: [\n")
    with pytest.raises(PolicyError, match="is not valid YAML"):
        Policy.load(tmp_path / "broken.yaml")
    (tmp_path / "broken.toml").write_text("rules = [\n")
    with pytest.raises(PolicyError, match="is not valid TOML"):
        Policy.load(tmp_path / "broken.toml")


def test_layer_and_head_ranges_checked_against_the_model():
    policy = Policy.load({"rules": [{"when": {"layers": "28-40"}, "use": "dense"}]})
    with pytest.raises(PolicyError, match=r"rules\[0\].when.layers: '28-40' is out of range for a model with 30 layers"):
        policy.for_model(num_layers=30, num_heads=9)
    policy = Policy.load({"rules": [{"when": {"heads": [9]}, "use": "dense"}]})
    with pytest.raises(PolicyError, match="out of range for a model with 9 query heads"):
        policy.for_model(num_layers=30, num_heads=9)


def test_head_rules_that_split_a_gqa_group_are_refused_against_the_model():
    """8 query heads over 4 KV heads: groups of 2. "0-2" takes half of the group 2-3, which one method must serve."""
    policy = Policy.load({"rules": [{"when": {"layers": "1"}, "use": "dense"},
                                    {"when": {"heads": "0-2"}, "use": "sink_window"}]})
    policy.for_model(num_layers=4, num_heads=8)  # without kv_heads the groups are unknown
    with pytest.raises(PolicyError) as error:
        policy.for_model(num_layers=4, num_heads=8, kv_heads=4)
    assert str(error.value) == (
        "rules[1].when.heads: '0-2' splits a GQA group: query heads 2-3 share one KV head (the model has 8 query "
        'heads, 2 per KV head); give whole groups (multiples of 2, e.g. "0-1")'
    )
    for whole_groups in ("0-3", "2-", [4, 5], "0,1,6-7"):
        Policy.load({"rules": [{"when": {"heads": whole_groups}, "use": "dense"}]}).for_model(
            num_layers=4, num_heads=8, kv_heads=4)
    Policy.load({"rules": [{"when": {"heads": "3"}, "use": "dense"}]}).for_model(4, 8, kv_heads=8)


def test_duplicate_and_unreachable_rules_warn():
    with pytest.warns(PolicyWarning, match=r"rules\[1\]: same 'when' as rules\[0\]"):
        Policy.load({"rules": [{"when": {"layers": "0"}, "use": "dense"}, {"when": {"layers": "0"}, "use": "block_topk"}]})
    with pytest.warns(PolicyWarning, match=r"rules\[1\]: unreachable, rules\[0\] matches everything"):
        Policy.load({"rules": [{"use": "dense"}, {"when": {"layers": "1"}, "use": "block_topk"}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Policy.load(EXAMPLE_YAML and {"rules": [{"when": {"layers": "0"}, "use": "dense"}]})


def test_json_schema_lists_methods_and_their_parameters():
    schema = policy_json_schema()
    json.dumps(schema)
    rule = schema["$defs"]["RuleModel"]
    assert set(rule["properties"]["use"]["enum"]) >= {"dense", "sink_window", "block_topk"}
    by_method = {c["if"]["properties"]["use"]["const"]: c["then"]["properties"]["with"] for c in rule["allOf"]}
    assert by_method["sink_window"]["properties"]["window"]["exclusiveMinimum"] == 0
    assert "with" in rule["properties"]


def test_describe_mentions_every_rule():
    text = Policy.load("sink_window").describe()
    assert "rules[0]" in text and "sink_window(sink=64, window=2048)" in text and "default: dense" in text
    assert sparsify.Policy is Policy
