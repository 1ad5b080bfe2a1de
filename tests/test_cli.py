"""The sparsify command: user mistakes give one-line errors and exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluation import ByteTokenizer

from sparsify.cli import _sample_prompt, main


@pytest.mark.parametrize("argv,message", [
    (["run", "--policy", "sink_windw"], "did you mean 'sink_window'?"),
    (["run", "--model", "/no/such/model.gguf"], "no such GGUF file"),
    (["explain", "--model", "/tmp"], "is not 'default', an existing .gguf file, or a local model directory"),
    (["export", "--policy", "/no/such/policy.yaml"], "policy: no such file"),
])
def test_user_mistakes_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_policy_file_content(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("rules:\n  - use: dense\n    when: {layer: 1}\n")
    assert main(["run", "--policy", str(path)]) == 2
    assert "rules[0].when: unknown key 'layer'" in capsys.readouterr().err


def test_unknown_command_and_benchmark_exit_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "no_such_benchmark"])
    assert exit_info.value.code == 2


def test_schema_prints_json(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "RuleModel" in schema["$defs"]


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["explain", "--seq-len", "0"],
                                  ["run", "--prompt", ""], ["export", "-o", "/no/such/folder/x.pt2"]])
def test_help_and_argument_mistakes_do_not_import_torch(argv, tmp_path):
    """The installed ``sparsify`` command answers --help and bad arguments before torch, transformers or the
    sparsify package are imported (that import takes 25-40 s on a busy machine)."""
    command = Path(sys.executable).with_name("sparsify")
    assert command.is_file(), f"no {command}: install the package (pip install -e .)"
    # Outside the checkout, so that a stale sparsify.egg-info there cannot stand in for the installed metadata.
    run = subprocess.run([sys.executable, "-X", "importtime", str(command), *argv], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == (0 if "--help" in argv else 2), run.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "sparsify_cli" in imported
    assert not {name for name in imported if name.split(".")[0] in ("torch", "transformers", "sparsify")}


@pytest.mark.parametrize("argv,message", [
    (["run", "--prompt", ""], "argument --prompt: the prompt is empty"),
    (["run", "--prompt", "  "], "argument --prompt: the prompt is empty"),
    (["run", "--document-tokens", "0"], "argument --document-tokens: must be at least 1"),
    (["explain", "--seq-len", "-5"], "argument --seq-len: must be at least 1, got -5"),
    (["explain", "--seq-len", "0"], "argument --seq-len: must be at least 1, got 0"),
    (["export", "--seq-len", "many"], "argument --seq-len: expected a whole number of at least 1, got 'many'"),
    (["export", "-o", "/no/such/folder/x.pt2"], "argument -o/--output: the folder '/no/such/folder' does not exist"),
])
def test_bad_arguments_are_refused_before_any_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage lines, then the error


def test_export_refuses_a_folder_as_output(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "-o", str(tmp_path)])
    assert f"argument -o/--output: {str(tmp_path)!r} is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("length", [1, 7, 300, 4096])
def test_explain_traces_exactly_the_asked_number_of_tokens(length):
    """A text generated for about N tokens tokenises to fewer (3968 for 4096 bytes-as-tokens): ids are counted."""
    ids = _sample_prompt(ByteTokenizer(), length)
    assert tuple(ids.shape) == (1, length)
    if length >= 300:  # real text with the needle, not padding
        assert "One of the special magic numbers for" in ByteTokenizer().decode(ids[0].tolist())


def test_run_builds_a_document_with_a_pass_key_and_asks_for_it():
    from sparsify.cli import _builtin_document

    ids, sample = _builtin_document(ByteTokenizer(), 3000)
    text = ByteTokenizer().decode(ids[0].tolist())
    assert 2500 <= ids.shape[1] <= 3000  # bytes as tokens: about the asked length
    assert f"The pass key is {sample.answers[0]}." in text and text.rstrip().endswith(sample.question)
    assert sample.score(f"It is {sample.answers[0]}.") == 1 and sample.score("It is 12.") == 0


def test_bench_e2e_refuses_zero_repeats(capsys):
    from sparsify.benchmarks import e2e

    with pytest.raises(SystemExit) as exit_info:
        e2e.main(["--repeats", "0"])
    assert exit_info.value.code == 2 and "--repeats: must be at least 1, got 0" in capsys.readouterr().err


def test_bench_e2e_merge_keeps_ratios_within_one_run(tmp_path, monkeypatch):
    """Two runs of hf_eager differ (its decode moved from 21 to 38 ms a token between two here): a merged
    result names each row's part and divides only times measured in the same run."""
    import json

    from sparsify.benchmarks import e2e

    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)

    def part(name, rows):
        meta = {"date": "2026-12-01T00:00:00Z", "device": "GPU", "versions": {"torch": "x"}, "command": name}
        (tmp_path / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps({"rows": rows, **meta}))

    part("a", [{"seq_len": 8, "impl": "hf_eager", "case": "prefill", "ms": 100.0},
               {"seq_len": 8, "impl": "sparsify_dense", "case": "prefill", "ms": 50.0, "first_call_s": 10.0}])
    part("b", [{"seq_len": 8, "impl": "sparsify_dense", "case": "prefill", "ms": 1.0, "first_call_s": 20.0},
               {"seq_len": 8, "impl": "torch_compile", "case": "prefill", "ms": 70.0, "first_call_s": 30.0}])
    e2e.main(["--merge", "a", "b"])
    merged = json.loads((tmp_path / "benchmarks" / "results" / "e2e.json").read_text())
    assert merged["ratios"] == {"a: prefill@8 hf_eager/sparsify_dense": 2.0,
                                "b: first_call@8 torch_compile/sparsify_dense": 1.5}
    assert [row["part"] for row in merged["rows"]] == ["a", "a", "b", "b"]
    assert "- `b`: 2026-12-01T00:00:00Z · GPU" in (tmp_path / "benchmarks" / "results" / "e2e.md").read_text()


def test_bench_offers_every_benchmark_module_and_nothing_else():
    """Each benchmarks/*.py with a main() is a name `sparsify bench` takes (a missing one is refused as unknown)."""
    from pathlib import Path

    from sparsify_cli import BENCHMARKS

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    modules = {path.stem for path in folder.glob("*.py") if "\ndef main(" in path.read_text()}
    assert modules == set(BENCHMARKS)
