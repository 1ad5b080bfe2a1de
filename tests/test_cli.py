"""The sparsify command: user mistakes give one-line errors and exit code 2."""

import json

import pytest

from sparsify.cli import main


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
