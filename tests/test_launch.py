"""``torchrun --nproc-per-node 2 -m sparsify run``: the command on every rank, the model split over them by tensor
parallelism (gloo on the CPU), rank 0 printing what one process prints."""

import subprocess
import sys

import pytest
from conftest import tiny_model

VOCAB = [f"w{i}" for i in range(255)] + ["[UNK]"]
PROMPT = " ".join(VOCAB[i % 200] for i in range(96))  # 96 tokens: sink 16 + window 32 leave most keys out
POLICY = "rules:\n  - when: {phase: prefill}\n    use: sink_window\n    with: {sink: 16, window: 32}\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer random Llama (4 query / 2 KV heads) and a word-level tokenizer of its 256 ids, saved as a local
    model directory (what ``--model`` takes), and a sink_window policy file beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", layers=2).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(folder)
    (folder / "policy.yaml").write_text(POLICY)
    return folder


def sparsify_run(model_dir, *launcher: str) -> subprocess.CompletedProcess:
    command = [*launcher, "-m", "sparsify", "run", "--model", str(model_dir), "--policy",
               str(model_dir / "policy.yaml"), "--prompt", PROMPT, "--raw", "--max-new-tokens", "4", "--explain",
               "--device", "cpu"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=model_dir)


def test_torchrun_splits_the_model_over_the_ranks_and_answers_as_one_process(model_dir):
    alone = sparsify_run(model_dir, sys.executable)
    assert alone.returncode == 0, alone.stderr
    launched = sparsify_run(model_dir, sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2")
    assert launched.returncode == 0, launched.stderr
    answer = alone.stdout.splitlines()[0]
    assert launched.stdout.splitlines()[0] == answer  # rank 0's answer: greedy, the same tokens
    assert launched.stdout.count(answer) == 1  # printed by rank 0 only
    assert "tensor parallel over 2 ranks" in launched.stdout and "this is rank 0" in launched.stdout
    assert "tensor parallel" not in alone.stdout
    assert "sink_window" in launched.stdout  # the policy's method ran on the sharded model


def test_from_the_checkout_root_the_kernels_folder_does_not_shadow_an_installed_kernels():
    """``python -m ...`` in the checkout puts its root first on sys.path, where ``kernels/`` (sparsify.kernels'
    source) would hide the ``kernels`` distribution that transformers imports: ``import sparsify`` moves the root
    after site-packages."""
    from importlib.metadata import PackageNotFoundError, distribution
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    probe = ("import importlib.util, sparsify, transformers.integrations.hub_kernels; "
             "print(importlib.util.find_spec('kernels').origin)")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=root)
    assert found.returncode == 0, found.stderr
    try:
        distribution("kernels")
    except PackageNotFoundError:
        return  # nothing to shadow: the checkout's folder is the only kernels
    assert Path(found.stdout.split()[-1]) != root / "kernels" / "__init__.py"
