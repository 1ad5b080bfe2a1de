"""The ``sparsify`` command's commands: run, explain, export, bench, eval, schema.

The arguments are parsed (and checked) by the light entry point :mod:`sparsify_cli`, before this module and
torch are imported; ``main`` here is that entry point's. Exit codes: 0 success, 1 failure while running, 2 a user
mistake (bad model path, bad policy, bad arguments), reported without a traceback: one line, or for a policy
with several problems one line per problem.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import random
import sys
import time

import torch
from rich.console import Console
from sparsify_cli import main

from .errors import PolicyError, ShapeError, SparsifyError

__all__ = ["main", "run_command"]

console = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def _step(message: str):
    start = time.perf_counter()
    with console.status(message):
        yield
    console.print(f"[dim]{message} done in {time.perf_counter() - start:.1f} s[/dim]")


def _load(args, sharded: bool = False):
    """(sparsify, policy, model, tokenizer). ``sharded``: under ``torchrun --nproc-per-node N`` the model is split
    over the N ranks by tensor parallelism (sparsify.distributed), and only rank 0 prints."""
    import sparsify
    from .distributed import join_launched_ranks, tensor_parallel
    from .models import load_model

    policy = sparsify.Policy.load(args.policy)  # a bad policy fails before the slow model load
    mesh = join_launched_ranks(args.device) if sharded else None
    if mesh is not None and mesh.get_rank() != 0:
        console.quiet = True
    dtype = _model_dtype(args)
    with _step(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device,
                                      attn_implementation=args.attn_implementation)
    if mesh is not None:
        with _step(f"splitting its heads and MLP over {mesh.size()} ranks (tensor parallel)"):
            model = tensor_parallel(model, mesh)
    return sparsify, policy, model, tokenizer


def _model_dtype(args) -> torch.dtype:
    """``--dtype``, else bfloat16 on CUDA and float32 on the CPU."""
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.bfloat16 if args.device == "cuda" else torch.float32


def _prints() -> bool:
    """Whether this process prints results: the only one, or rank 0 of a launched group."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def cmd_run(args) -> int:
    if args.parallel == "context":
        return _run_context_parallel(args)
    sparsify, policy, model, tokenizer = _load(args, sharded=True)
    compiled = sparsify.compile(model, policy)
    ids, document = _prompt_ids(args, tokenizer)
    ids = ids.to(args.device)
    with _step(f"generating up to {args.max_new_tokens} tokens ({ids.shape[1]}-token prompt; the first call "
               "captures and rewrites the graph)"), torch.no_grad():
        output = compiled.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
    if not _prints():
        return 0
    _print_answer(answer, document)
    if args.explain:
        print(sparsify.explain(compiled))
    return 0


def _prompt_ids(args, tokenizer):
    """(ids (1, L) on the CPU, the built-in document's sample or None): ``--prompt`` (chat-wrapped unless
    ``--raw``), else the built-in pass-key document."""
    if args.prompt is None:
        ids, document = _builtin_document(tokenizer, args.document_tokens)
        console.print(f"built-in document: {ids.shape[1]} tokens of essays with a pass key hidden a third of the "
                      f"way in; asked: {document.question!r}")
        return ids, document
    messages = [{"role": "user", "content": args.prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
        if getattr(tokenizer, "chat_template", None) and not args.raw else args.prompt
    return tokenizer(text, return_tensors="pt").input_ids, None


def _print_answer(answer: str, document) -> None:
    print(answer)
    if document is not None:
        found = "found" if document.score(answer) else "not found"
        console.print(f"the pass key is {document.answers[0]}: {found} in the answer")


def _run_context_parallel(args) -> int:
    """``torchrun --nproc-per-node N -m sparsify run --parallel context``: the whole model on every rank, the
    prompt split by position over the ranks (sparsify.context_parallel), the KV cache left split, greedy decoding.
    The policy decides the prefill's attention (``dense``: the ring; ``sink_window``: only the visited key blocks
    move); rank 0 prints."""
    import torch.distributed as dist

    import sparsify

    from .context_parallel import (PLAN_ALIGNMENT, SequenceSplit, context_parallel_generate, plan_for_policy,
                                   policy_needs_plans)
    from .distributed import join_launched_ranks
    from .models import load_model

    policy = sparsify.Policy.load(args.policy)
    if join_launched_ranks(args.device) is None:
        raise SparsifyError("--parallel context: splits the prompt over the ranks of a launcher; allowed: under "
                            "torchrun --nproc-per-node N (N >= 2): torchrun --nproc-per-node 2 -m sparsify run "
                            "--parallel context ...")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    console.quiet = rank != 0
    dtype = _model_dtype(args)
    with _step(f"loading {args.model} on each of {ranks} ranks"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device,
                                      attn_implementation=args.attn_implementation)
    ids, document = _prompt_ids(args, tokenizer)
    alignment = PLAN_ALIGNMENT if policy_needs_plans(policy) else 1
    if ids.shape[1] <= alignment * (ranks - 1):
        raise SparsifyError(f"--prompt: {ids.shape[1]} tokens; allowed under --parallel context over {ranks} ranks"
                            + (f" with this policy's sink_window: more than {alignment * (ranks - 1)} (the ranks' "
                               f"boundaries fall on its {alignment}-token blocks)" if alignment > 1 else
                               f": at least {ranks}, one a rank"))
    split = SequenceSplit.even(ids.shape[1], ranks, multiple=alignment)
    plan = plan_for_policy(policy, model.config.num_hidden_layers, split, max_new_tokens=args.max_new_tokens,
                           device=args.device)
    with _step(f"generating up to {args.max_new_tokens} tokens ({ids.shape[1]}-token prompt split "
               f"{'+'.join(map(str, split.lengths))} over {ranks} ranks)"), torch.no_grad():
        result = context_parallel_generate(model, ids[:, split.start(rank):split.end(rank)].to(args.device), split,
                                           args.max_new_tokens, plan=plan,
                                           eos_token_id=model.generation_config.eos_token_id)
    received = [None] * ranks
    dist.all_gather_object(received, (result.kv_bytes_received, result.decode_bytes_received))
    if rank != 0:
        return 0
    _print_answer(tokenizer.decode(result.tokens[0], skip_special_tokens=True), document)
    if args.explain:
        print(f"context parallel over {ranks} ranks, positions "
              + ", ".join(f"{split.start(r)}-{split.end(r) - 1}" for r in range(ranks))
              + f"; prefill: {_describe_plans(plan)}; decode: dense, the KV cache left split; not compiled (no "
              "explain table)")
        for r, (prefill_bytes, decode_bytes) in enumerate(received):
            print(f"rank {r} received {prefill_bytes:,} bytes of K/V in the prefill, {decode_bytes:,} in decoding")
    return 0


def _describe_plans(plans) -> str:
    """Runs of layers with the same context-parallel prefill (:func:`sparsify.context_parallel.plan_for_policy`'s
    entries: None for the dense ring, a shared plan for one sink + window)."""
    runs = [list(run) for _, run in itertools.groupby(enumerate(plans), key=lambda item: id(item[1]))]
    kinds = {True: "dense ring attention", False: "sink_window, only the visited key blocks moved"}
    return "; ".join(f"layers {run[0][0]}-{run[-1][0]} {kinds[run[0][1] is None]}" for run in runs)


def _builtin_document(tokenizer, length: int):
    """(ids (1, ~length), sample): the passkey task's prompt, chat-formatted as ``sparsify eval`` builds it."""
    from .evaluation.runner import prompt_ids
    from .evaluation.tasks import TASKS

    sample = TASKS.get("passkey").generate(tokenizer, length, random.Random(0), 1 / 3)
    return prompt_ids(tokenizer, sample, "cpu"), sample


def cmd_explain(args) -> int:
    sparsify, policy, model, tokenizer = _load(args, sharded=True)
    compiled = sparsify.compile(model, policy, cost_model_fallback=not args.no_fallback)
    ids = _sample_prompt(tokenizer, args.seq_len).to(args.device)
    with _step(f"tracing a {ids.shape[1]}-token forward"), torch.no_grad():
        compiled(ids)
    if not _prints():
        return 0
    print(sparsify.explain(compiled))
    if args.plot:
        from .evaluation.patterns import plot_pattern

        print(f"wrote {plot_pattern(model, compiled, ids, args.layer, args.head, args.plot)}")
    return 0


def _sample_prompt(tokenizer, length: int) -> torch.Tensor:
    """(1, length) ids of real text holding a needle (patterns on random tokens would say little).

    Exactly ``length``: a text generated for about ``length`` tokens tokenises to fewer (a byte-level tokenizer
    gave 3968 ids for 4096), so filler sentences are tokenised and their ids appended until there are enough,
    and the ids are cut there. Nothing is decoded and tokenised again, which could change the count.
    """
    from .evaluation.haystack import sentences
    from .evaluation.tasks import TASKS

    rng = random.Random(0)
    sample = TASKS.get("niah_single").generate(tokenizer, length, rng, 0.5)
    ids = list(tokenizer(sample.context).input_ids)
    filler = sentences("essay", rng)
    while len(ids) < length:
        ids += tokenizer(" " + next(filler), add_special_tokens=False).input_ids
    return torch.tensor([ids[:length]])


def cmd_export(args) -> int:
    sparsify, policy, model, tokenizer = _load(args)
    ids = torch.zeros((1, args.seq_len), dtype=torch.long, device=args.device)
    with _step("exporting"):
        # Tuples, not transformers' output classes, which a .pt2 cannot restore in another process.
        program = sparsify.export(model, (ids,), policy, kwargs={"use_cache": False, "return_dict": False})
    torch.export.save(program, args.output)
    ops = sorted({str(n.target) for n in program.graph.nodes if str(n.target).startswith("sparsify.")})
    print(f"wrote {args.output} ({', '.join(ops)})")
    # torch.export.load cannot deserialise these ops until they are registered, and its error does not say so.
    print(f"load it with `import sparsify` first (it registers these ops), then torch.export.load({args.output!r})")
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


COMMANDS = {"run": cmd_run, "explain": cmd_explain, "export": cmd_export, "bench": cmd_bench, "eval": cmd_eval,
            "schema": cmd_schema}


def run_command(args: argparse.Namespace) -> int:
    """Run the command ``args.command`` with the arguments :func:`sparsify_cli.build_parser` parsed."""
    if getattr(args, "device", "") is None:  # the parser cannot ask torch for the default: it is not imported there
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    clean = False
    try:
        status = COMMANDS[args.command](args)
        clean = True
        return status
    except (PolicyError, ShapeError, SparsifyError, FileNotFoundError) as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # a launched rank (torchrun)
            from .distributed import leave_launched_group

            leave_launched_group(clean)


if __name__ == "__main__":
    sys.exit(main())
