"""sparsify eval: deterministic task generators with checkable answers, fidelity, the results format, the CLI."""

import json
import random

import pytest
import torch
from conftest import tiny_model

import sparsify
from sparsify.cli import main
from sparsify.evaluation import TASKS, EvalConfig, evaluate
from sparsify.evaluation import fidelity
from sparsify.evaluation.runner import load_previous, merge_shards, prompt_ids, sample_rng, write
from sparsify.errors import PolicyError, SparsifyError


class ByteTokenizer:
    """Bytes as tokens (ids 0-255): enough tokenizer for the runner, with no files to load."""

    chat_template = None

    class Encoded:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = list(text.encode("utf-8"))
        return self.Encoded(torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("name", TASKS.names())
def test_generators_are_deterministic_and_checkable(name):
    task, tokenizer = TASKS.get(name), ByteTokenizer()
    first = task.generate(tokenizer, 3000, sample_rng(7, name, 3000, 0), 0.5)
    again = task.generate(tokenizer, 3000, sample_rng(7, name, 3000, 0), 0.5)
    other = task.generate(tokenizer, 3000, sample_rng(8, name, 3000, 0), 0.5)
    assert first == again and first.answers != other.answers
    assert 2500 <= len(tokenizer(first.context).input_ids) <= 3000
    for answer in first.answers:
        assert answer in first.context  # the needle really is in the haystack
    oracle = " ".join(first.answers)
    assert first.score(oracle) == 1.0
    assert first.score("I do not know.") == 0.0


def test_needles_sit_at_the_requested_depth():
    task, tokenizer = TASKS.get("niah_single"), ByteTokenizer()
    for depth in (0.0, 0.25, 0.75, 1.0):
        sample = task.generate(tokenizer, 4000, random.Random(0), depth)
        position = sample.context.index(sample.answers[0]) / len(sample.context)
        assert abs(position - depth) < 0.08


def test_question_first_keeps_the_key_out_of_the_prompts_tail():
    tokenizer = ByteTokenizer()
    sample = TASKS.get("niah_question_first").generate(tokenizer, 3000, sample_rng(0, "q", 3000, 0), 0.5)
    ids = prompt_ids(tokenizer, sample, "cpu")[0]
    key = sample.context.split("special magic number for ")[1].split("?")[0]
    assert key in tokenizer.decode(ids[:200].tolist()) and key not in tokenizer.decode(ids[-600:].tolist())


def test_dense_policy_has_exactly_zero_fidelity_error():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, "dense")
    ids = torch.randint(0, 256, (1, 40))
    result = fidelity.measure(model, compiled, ids, continuation=3)
    assert result["layer_rel_error"] == [0.0, 0.0, 0.0]
    assert result["prompt_kl"] == 0.0 and result["prompt_top1"] == 1.0
    assert result["continuation_kl"] == [0.0, 0.0, 0.0] and result["continuation_top1"] == 1.0


def test_a_sparse_policy_shows_error_only_in_its_layers():
    model = tiny_model("llama")
    policy = {"rules": [{"when": {"layers": "0"}, "use": "dense"},
                        {"when": {"phase": "prefill"}, "use": "sink_window", "with": {"sink": 1, "window": 4}}]}
    compiled = sparsify.compile(model, policy, cost_model_fallback=False)
    result = fidelity.measure(model, compiled, torch.randint(0, 256, (1, 40)), continuation=2)
    assert result["layer_rel_error"][0] == 0.0 and min(result["layer_rel_error"][1:]) > 1e-3
    assert result["prompt_kl"] > 0


def test_runner_writes_the_shared_results_format(tmp_path):
    model = tiny_model("llama", layers=2)
    policy = tmp_path / "narrow.yaml"
    policy.write_text("rules:\n  - when: {phase: prefill}\n    use: sink_window\n    with: {sink: 4, window: 32}\n")
    config = EvalConfig(policies=(str(policy),), tasks=("passkey", "niah_single"), lengths=(300,), samples=2,
                        fidelity_lengths=(300,), continuation=2, generation_tokens=4, suite="test", device="cpu")
    result = evaluate(config, model=model, tokenizer=ByteTokenizer())
    assert not result.interrupted
    assert {(r["task"], r["method"], r["n"]) for r in result.rows} == {
        (t, m, 2) for t in ("passkey", "niah_single") for m in ("dense", "narrow")}
    path = write(config, result, "tiny-llama", folder=tmp_path)
    data = json.loads(path.read_text())
    assert {"name", "date", "device", "versions", "command", "rows", "ratios", "model"} <= set(data)
    assert data["name"] == "eval-test" and data["model"] == "tiny-llama"
    assert all({"task", "seq_len", "method", "score", "n"} <= set(row) for row in data["rows"])
    assert [f["method"] for f in data["fidelity"]] == ["dense", "narrow"]
    assert data["fidelity"][0]["layer_rel_error"] == [0.0, 0.0]
    assert [g["method"] for g in data["generation"]] == ["dense", "narrow"]
    for suffix in (".md", "-scores.png", "-fidelity.png"):
        assert (tmp_path / f"eval-test{suffix}").stat().st_size > 0


def test_shards_merge_into_the_unsharded_result(tmp_path):
    model = tiny_model("llama", layers=2)
    common = dict(tasks=("passkey", "niah_single"), lengths=(300,), samples=3, fidelity_lengths=(300, 400),
                  continuation=1, suite="sharded", device="cpu")
    whole = evaluate(EvalConfig(**common), model=model, tokenizer=ByteTokenizer())
    for index in range(2):
        config = EvalConfig(**common, shard=(index, 2))
        shard = evaluate(config, model=model, tokenizer=ByteTokenizer())
        assert 0 < len(shard.samples) < len(whole.samples)
        assert write(config, shard, "tiny", folder=tmp_path).name == f"eval-sharded.shard-{index}of2.json"
    merged = json.loads(merge_shards("sharded", folder=tmp_path).read_text())
    key = lambda s: (s["task"], s["index"], s["method"])  # noqa: E731
    assert sorted(map(key, merged["samples"])) == sorted(map(key, whole.samples))
    assert sorted(r["score"] for r in merged["rows"]) == sorted(r["score"] for r in whole.rows)
    assert len(merged["fidelity"]) == 2 and len(merged["merged_from"]) == 2
    assert (tmp_path / "eval-sharded-scores.png").stat().st_size > 0
    (tmp_path / "eval-sharded.shard-1of2.json").unlink()
    with pytest.raises(SparsifyError, match=r"has 2 shards; found shards \[0\]"):
        merge_shards("sharded", folder=tmp_path)


def test_runner_refuses_a_policy_whose_methods_never_apply(tmp_path):
    """A policy whose sparse rules match no attention would measure dense under a sparse name: refused."""
    policy = tmp_path / "never.yaml"
    policy.write_text("rules:\n  - when: {phase: diffusion}\n    use: block_topk\n")
    config = EvalConfig(policies=(str(policy),), tasks=("passkey",), lengths=(300,), samples=1,
                        fidelity_lengths=(), device="cpu")
    with pytest.raises(SparsifyError, match="policy never: no attention got a sparse method"):
        evaluate(config, model=tiny_model("llama", layers=2), tokenizer=ByteTokenizer())


def test_runner_keeps_finished_samples_on_ctrl_c(monkeypatch):
    model = tiny_model("llama", layers=2)
    calls = {"n": 0}
    original = model.generate

    def interrupting_generate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", interrupting_generate)
    config = EvalConfig(tasks=("passkey",), lengths=(300,), samples=4, fidelity_lengths=(), device="cpu")
    result = evaluate(config, model=model, tokenizer=ByteTokenizer())
    assert result.interrupted and len(result.samples) == 2 and result.rows[0]["n"] == 2


def test_a_killed_run_resumes_from_its_checkpoint_without_rerunning_what_finished(tmp_path, monkeypatch):
    """The file written after each item lets a run stopped mid-way (a time limit, a lost machine) continue."""
    model = tiny_model("llama", layers=2)
    config = EvalConfig(tasks=("passkey",), lengths=(300,), samples=3, fidelity_lengths=(300,), continuation=1,
                        suite="resumed", device="cpu", plots=False)
    whole = evaluate(config, model=model, tokenizer=ByteTokenizer())
    calls = []
    original = model.generate

    def generate_then_die(*args, **kwargs):
        calls.append(args[0].shape[1])
        if len(calls) == 3:
            raise RuntimeError("machine lost")  # not Ctrl-C: nothing gets written at the end
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate_then_die)
    checkpoint = lambda partial: write(config, partial, "tiny", folder=tmp_path, plots_too=False)  # noqa: E731
    with pytest.raises(RuntimeError, match="machine lost"):
        evaluate(config, model=model, tokenizer=ByteTokenizer(), checkpoint=checkpoint)
    previous = load_previous(config, folder=tmp_path)
    assert previous.interrupted and len(previous.samples) == 2 and previous.fidelity == []
    assert json.loads((tmp_path / "eval-resumed.json").read_text())["rows"][0]["n"] == 2

    calls.clear()
    resumed = evaluate(config, model=model, tokenizer=ByteTokenizer(), previous=previous, checkpoint=checkpoint)
    assert len(calls) == 1  # only the third sample ran again
    assert not resumed.interrupted and resumed.seconds >= previous.seconds
    key = lambda s: (s["index"], s["method"], s["score"], s["generated"])  # noqa: E731
    assert sorted(map(key, resumed.samples)) == sorted(map(key, whole.samples))
    assert [f["method"] for f in resumed.fidelity] == ["dense"]
    assert load_previous(config, folder=tmp_path).interrupted  # the last checkpoint precedes the final write
    write(config, resumed, "tiny", folder=tmp_path)
    assert load_previous(config, folder=tmp_path).interrupted is False

    other = EvalConfig(tasks=("passkey",), lengths=(300,), samples=4, fidelity_lengths=(300,), continuation=1,
                       suite="resumed", device="cpu", plots=False)
    with pytest.raises(SparsifyError, match=r"resume: eval-resumed.json was run with other settings \(samples\)"):
        load_previous(other, folder=tmp_path)
    assert load_previous(EvalConfig(suite="never-run", device="cpu"), folder=tmp_path) is None


def test_config_errors_name_the_field():
    with pytest.raises(PolicyError, match="tasks: unknown task 'pasky'.*did you mean 'passkey'"):
        EvalConfig(tasks=("pasky",))
    with pytest.raises(SparsifyError, match="samples: must be > 0"):
        EvalConfig(samples=0)
    with pytest.raises(SparsifyError, match="lengths: each must be at least 256"):
        EvalConfig(lengths=(100,))


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "/no/model.gguf"], "no such GGUF file"),
    (["eval", "--policy", "nope"], "is neither a preset"),
    (["eval", "--tasks", "passkey", "magic"], "unknown task 'magic'"),
    (["eval", "--shard", "2/2"], "shard: must be K/N with 0 <= K < N"),
    (["eval", "--merge", "--suite", "none-such"], "no shard files eval-none-such.shard-KofN.json"),
])
def test_eval_cli_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_explain_plot_draws_the_method_pattern(tmp_path):
    from sparsify.evaluation.patterns import plot_pattern

    model = tiny_model("llama")
    policy = {"rules": [{"when": {"layers": "1"}, "use": "block_topk", "with": {"density": 0.3}}]}
    compiled = sparsify.compile(model, policy, cost_model_fallback=False)
    ids = torch.randint(0, 256, (1, 300))
    with torch.no_grad():
        compiled(ids)
    path = plot_pattern(model, compiled, ids, layer=1, head=3, path=tmp_path / "pattern.png")
    assert path.stat().st_size > 0
    with pytest.raises(SparsifyError, match="--layer: 7 is not a layer"):
        plot_pattern(model, compiled, ids, layer=7, head=0, path=tmp_path / "x.png")
    with pytest.raises(SparsifyError, match="--head: 9 is not a query head"):
        plot_pattern(model, compiled, ids, layer=1, head=9, path=tmp_path / "x.png")
