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


def sparsify_run(model_dir, *launcher: str, policy: str = "", prompt: str = PROMPT,
                 options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [*launcher, "-m", "sparsify", "run", "--model", str(model_dir), "--policy",
               policy or str(model_dir / "policy.yaml"), "--prompt", prompt, "--raw", "--max-new-tokens", "4",
               "--explain", "--device", "cpu", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=model_dir)


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
# 600 words: context parallelism splits it 300 + 300 for the ring, 256 + 344 for a sink_window plan (ranks'
# boundaries on the layout's 128-token blocks).
LONG_PROMPT = " ".join(VOCAB[(7 * i) % 200] for i in range(600))


def test_torchrun_splits_the_model_over_the_ranks_and_answers_as_one_process(model_dir):
    alone = sparsify_run(model_dir, sys.executable)
    assert alone.returncode == 0, alone.stderr
    launched = sparsify_run(model_dir, *TORCHRUN)
    assert launched.returncode == 0, launched.stderr
    answer = alone.stdout.splitlines()[0]
    assert launched.stdout.splitlines()[0] == answer  # rank 0's answer: greedy, the same tokens
    assert launched.stdout.count(answer) == 1  # printed by rank 0 only
    assert "tensor parallel over 2 ranks" in launched.stdout and "this is rank 0" in launched.stdout
    assert "tensor parallel" not in alone.stdout
    assert "sink_window" in launched.stdout  # the policy's method ran on the sharded model


def test_torchrun_context_parallel_splits_the_prompt_and_answers_as_one_process(model_dir):
    alone = sparsify_run(model_dir, sys.executable, policy="dense", prompt=LONG_PROMPT)
    assert alone.returncode == 0, alone.stderr
    ring = sparsify_run(model_dir, *TORCHRUN, policy="dense", prompt=LONG_PROMPT, options=("--parallel", "context"))
    assert ring.returncode == 0, ring.stderr
    answer = alone.stdout.splitlines()[0]
    assert answer.strip() and ring.stdout.splitlines()[0] == answer  # rank 0's answer: the same greedy tokens
    assert ("context parallel over 2 ranks, positions 0-299, 300-599; prefill: layers 0-1 dense ring attention;"
            in ring.stdout)
    # The ring: each rank receives the other's slice in each of the 2 layers: K and V, 2 KV heads x head_dim 16,
    # float32, 512 bytes a position.
    position_bytes = 2 * 2 * 16 * 4 * 2
    for rank in (0, 1):
        assert f"rank {rank} received {300 * position_bytes:,} bytes of K/V in the prefill" in ring.stdout
    window = sparsify_run(model_dir, *TORCHRUN, prompt=LONG_PROMPT, options=("--parallel", "context"))
    assert window.returncode == 0, window.stderr
    assert ("positions 0-255, 256-599; prefill: layers 0-1 sink_window, only the visited key blocks moved;"
            in window.stdout)
    # Sink 16 + window 32: rank 1 needs rank 0's first 64-key block (the sink) and its last (keys 192-255, the
    # window before position 256), half of what the ring moves; rank 0 nothing.
    assert "rank 0 received 0 bytes of K/V in the prefill" in window.stdout
    assert f"rank 1 received {128 * position_bytes:,} bytes of K/V in the prefill" in window.stdout


def test_context_parallel_outside_a_launcher_or_on_a_prompt_too_short_is_refused(model_dir):
    alone = sparsify_run(model_dir, sys.executable, options=("--parallel", "context"))
    assert alone.returncode == 2
    assert "--parallel context: splits the prompt over the ranks of a launcher; allowed: under torchrun" in alone.stderr
    short = sparsify_run(model_dir, *TORCHRUN, options=("--parallel", "context"))  # 96 tokens, sink_window
    assert short.returncode != 0
    assert ("--prompt: 96 tokens; allowed under --parallel context over 2 ranks with this policy's sink_window: "
            "more than 128") in short.stderr


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
