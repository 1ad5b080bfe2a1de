"""Fuzzing the policy loader: generated malformed policies fail with one PolicyError whose lines name every
offending field's path, and generated valid policies load. Seeded: a failing seed replays the same policy.

A malformed policy is a valid one with mutations, each at a known place; the mutation returns the path its
problem must be reported under (``rules[2].with.window``, ``default.use``, ``policy`` for the top level).
"""

import copy
import functools
import random
import re
import warnings

import pytest

from sparsify.errors import PolicyError, PolicyWarning
from sparsify.policy import Policy


def sink_window_params(rng):
    return {"sink": rng.randint(0, 128), "window": rng.randint(1, 4096)}


VALID_PARAMS = {
    "dense": lambda rng: {},
    "sink_window": sink_window_params,
    "block_topk": lambda rng: {"density": rng.choice([0.05, 0.1, 0.5, 1.0]), "sink_blocks": rng.randint(0, 4)},
    "delta": lambda rng: {"gamma": rng.randint(1, 128),
                          "base": {"use": "sink_window", "with": sink_window_params(rng)}},
}


def valid_rule(rng) -> dict:
    when = {}
    if rng.random() < 0.5:
        when["layers"] = rng.choice(["0-2", "3-", "1,4,6-", 2, [0, 3], " 5 "])
    if rng.random() < 0.4:
        when["phase"] = rng.choice(["prefill", "decode", ["prefill", "diffusion"]])
    if rng.random() < 0.3:
        when["min_seq_len"] = rng.randint(0, 4096)
        if rng.random() < 0.5:
            when["max_seq_len"] = when["min_seq_len"] + rng.randint(0, 4096)
    if rng.random() < 0.2:
        when["modules"] = "model.layers.1*"
    if rng.random() < 0.2:
        when["heads"] = rng.choice(["0-3", "4-", [0, 1]])
    use = rng.choice(sorted(VALID_PARAMS))
    rule = {"use": use}
    if when or rng.random() < 0.5:
        rule["when"] = when
    params = VALID_PARAMS[use](rng)
    if params:
        rule["with"] = params
    return rule


def valid_policy(rng) -> dict:
    default = rng.choice(["dense", {"use": "dense"}, {"use": "sink_window", "with": sink_window_params(rng)}])
    return {"rules": [valid_rule(rng) for _ in range(rng.randint(1, 5))], "default": default}


# -- mutations of one rule: (rng, rule) -> the path under ``rules[i]`` where the problem must be reported -------

def unknown_rule_key(rng, rule):
    rule[rng.choice(["whn", "uses", "width", "params"])] = {}
    return ""


def unknown_when_key(rng, rule):
    rule.setdefault("when", {})[rng.choice(["layer", "phases", "head", "min_len"])] = 1
    return ".when"


def when_not_a_mapping(rng, rule):
    rule["when"] = rng.choice(["0-2", 3, ["prefill"]])
    return ".when"


def bad_index_text(rng, rule):
    field = rng.choice(["layers", "heads"])
    rule.setdefault("when", {})[field] = rng.choice(["-1", "-5", "3-1", "a-b", "1,,2", "0-2,-4", "--1", "-"])
    return f".when.{field}"


def bad_index_type(rng, rule):
    field = rng.choice(["layers", "heads"])
    rule.setdefault("when", {})[field] = rng.choice([1.5, -2, [0, -1], {"from": 0}, True])
    return f".when.{field}"


def bad_phase(rng, rule):
    rule.setdefault("when", {})["phase"] = rng.choice(["training", ["prefill", "train"], 3, "Prefill"])
    return ".when.phase"


def bad_length(rng, rule):
    when = rule.setdefault("when", {})
    kind = rng.choice(["negative", "text", "crossed"])
    if kind == "negative":
        when["min_seq_len"] = -rng.randint(1, 100)
        return ".when.min_seq_len"
    if kind == "text":
        when["max_seq_len"] = "4096"
        return ".when.max_seq_len"
    when["min_seq_len"], when["max_seq_len"] = 4096, rng.randint(0, 4095)
    return ".when.min_seq_len"


def bad_modules(rng, rule):
    rule.setdefault("when", {})["modules"] = rng.choice([3, ["model.layers.*"]])
    return ".when.modules"


def unknown_method(rng, rule):
    rule["use"] = rng.choice(["sparse_magic", "sink_windw", "Dense", "topk"])
    return ".use"


def use_not_a_name(rng, rule):
    rule["use"] = rng.choice([3, ["dense"], None])
    return ".use"


def missing_use(rng, rule):
    del rule["use"]
    return ".use"


def with_not_a_mapping(rng, rule):
    rule["use"], rule["with"] = "sink_window", rng.choice([64, "window=64", [64]])
    return ".with"


def unknown_param(rng, rule):
    rule["use"], rule["with"] = "sink_window", {rng.choice(["windw", "windows", "sinks", "density"]): 64}
    return ".with"


def bad_param_value(rng, rule):
    use, param, value = rng.choice([
        ("sink_window", "window", 0), ("sink_window", "window", "2048"), ("sink_window", "sink", -1),
        ("sink_window", "sink", 2.5), ("block_topk", "density", 0), ("block_topk", "density", 1.5),
        ("block_topk", "density", "0.1"), ("delta", "gamma", 0), ("delta", "correct", "yes"),
    ])
    rule["use"], rule["with"] = use, {param: value}
    return f".with.{param}"


RULE_MUTATIONS = [unknown_rule_key, unknown_when_key, when_not_a_mapping, bad_index_text, bad_index_type, bad_phase,
                  bad_length, bad_modules, unknown_method, use_not_a_name, missing_use, with_not_a_mapping,
                  unknown_param, bad_param_value]


# -- mutations of the document: (rng, policy) -> the path ------------------------------------------------------

def unknown_top_level_key(rng, policy):
    policy[rng.choice(["rulez", "defaults", "rule", "version"])] = 1
    return "policy"


def bad_default(rng, policy):
    policy["default"], path = rng.choice([
        ("sparse_magic", "default.use"), ({"use": "sink_windw"}, "default.use"), (3, "default"),
        (["dense"], "default"), ({"use": "dense", "wiht": {}}, "default"),
        ({"use": "sink_window", "with": {"window": 0}}, "default.with.window"),
    ])
    return path


DOCUMENT_MUTATIONS = [unknown_top_level_key, bad_default]


def mutate_a_rule(mutation, rng, policy) -> str:
    """Apply a rule mutation to a random rule of ``policy``; the path, from the top."""
    index = rng.randrange(len(policy["rules"]))
    return f"rules[{index}]" + mutation(rng, policy["rules"][index])


# Each: (rng, policy) -> the path.
SINGLE_MUTATIONS = [functools.partial(mutate_a_rule, m) for m in RULE_MUTATIONS] + DOCUMENT_MUTATIONS


def reported_fields(document: dict) -> list[str]:
    """The field path of each line of the PolicyError the document raises (its lines: one per problem)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PolicyWarning)  # random valid rules may repeat one another
        with pytest.raises(PolicyError) as error:
            Policy.from_dict(copy.deepcopy(document))
    lines = str(error.value).splitlines()
    if len(lines) > 1:
        header = re.fullmatch(r"(\d+) problems in the policy from <dict>:", lines[0])
        assert header and int(header[1]) == len(lines) - 1, lines[0]
        lines = [line.removeprefix("  ") for line in lines[1:]]
    return [line.split(":", 1)[0] for line in lines]


def assert_reported(document: dict, paths: set[str]) -> None:
    fields = reported_fields(document)
    replay = f"policy {document!r} reported {fields}"
    # Each path is named, itself or one of its list items (phase[1]: the item that is wrong).
    assert all(any(field == path or field.startswith(path + "[") for field in fields) for path in paths), replay
    # Nothing else is blamed.
    assert all(any(field == path or field.startswith((path + ".", path + "[")) for path in paths)
               for field in fields), replay


@pytest.mark.parametrize("seed", range(64))
def test_a_malformed_policy_names_the_offending_field(seed):
    """Every kind of mutation runs several times (seed modulo the kinds), with seeded details and places."""
    rng = random.Random(seed)
    policy = valid_policy(rng)
    path = SINGLE_MUTATIONS[seed % len(SINGLE_MUTATIONS)](rng, policy)
    assert_reported(policy, {path})


@pytest.mark.parametrize("seed", range(24))
def test_every_problem_of_a_policy_with_several_is_named(seed):
    """Mutations in 2-4 different rules, and maybe the top level or the default: all are reported at once."""
    rng = random.Random(1000 + seed)
    policy = valid_policy(rng)
    while len(policy["rules"]) < 4:
        policy["rules"].append(valid_rule(rng))
    indices = rng.sample(range(len(policy["rules"])), rng.randint(2, 4))
    paths = {f"rules[{i}]" + rng.choice(RULE_MUTATIONS)(rng, policy["rules"][i]) for i in indices}
    if rng.random() < 0.5:
        paths.add(rng.choice(DOCUMENT_MUTATIONS)(rng, policy))
    assert_reported(policy, paths)


def test_rules_that_are_not_a_list_are_named():
    assert_reported({"rules": {"use": "dense"}, "default": "dense"}, {"rules"})


@pytest.mark.parametrize("seed", range(32))
def test_a_valid_policy_loads(seed):
    document = valid_policy(random.Random(2000 + seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PolicyWarning)
        policy = Policy.from_dict(copy.deepcopy(document))
    assert [rule.spec.name for rule in policy.rules] == [rule["use"] for rule in document["rules"]]
    assert policy.describe().count("rules[") == len(document["rules"])
