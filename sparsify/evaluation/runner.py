"""Run an evaluation: every policy (dense always first, as the baseline) on the same generated samples."""

from __future__ import annotations

import json
import random
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import SparsifyError
from ..policy import Policy
from . import fidelity as fidelity_metrics
from . import plots
from .tasks import TASKS, Sample

DENSE = "dense"


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. ``policies`` are preset names or policy files (dense is always added first).

    ``cost_model_fallback`` is off by default: an evaluation studies the method at every length, including
    lengths where the cost model would keep it dense.
    """

    model: str = "default"
    policies: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("passkey", "niah_single", "niah_multikey", "niah_question_first", "variable_tracking",
                              "aggregation")
    lengths: tuple[int, ...] = (2000, 4000, 7500)
    samples: int = 4
    seed: int = 0
    fidelity_lengths: tuple[int, ...] = (4000,)
    continuation: int = 32
    generation_tokens: int = 0
    suite: str = "default"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str | None = None
    cost_model_fallback: bool = False
    plots: bool = True
    shard: tuple[int, int] = (0, 1)

    def __post_init__(self):
        index, count = self.shard
        if not 0 <= index < count:
            raise SparsifyError(f"shard: must be K/N with 0 <= K < N, got {index}/{count}")
        for name in self.tasks:
            TASKS.get(name, field="tasks")
        for name in ("samples", "continuation", "generation_tokens"):
            if getattr(self, name) < 0 or (name == "samples" and self.samples == 0):
                bound = "> 0" if name == "samples" else ">= 0"
                raise SparsifyError(f"{name}: must be {bound}, got {getattr(self, name)}")
        if any(length < 256 for length in (*self.lengths, *self.fidelity_lengths)):
            raise SparsifyError("lengths: each must be at least 256 tokens")


@dataclass
class EvalResult:
    """What a run measured. ``interrupted`` is true until every item of the run has finished (so a checkpoint
    written mid-run, or a run stopped by Ctrl-C, says its rows cover only the samples that finished)."""

    rows: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    fidelity: list[dict] = field(default_factory=list)
    generation: list[dict] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    @classmethod
    def from_json(cls, data: dict) -> "EvalResult":
        return cls(samples=data["samples"], fidelity=data["fidelity"], generation=data["generation"],
                   interrupted=data["interrupted"], seconds=data["duration_s"], rows=_aggregate(data["samples"]))

    def ratios(self) -> dict[str, float]:
        dense = {(r["task"], r["seq_len"]): r["score"] for r in self.rows if r["method"] == DENSE}
        return {f"{r['task']}@{r['seq_len']} {r['method']}/dense": r["score"] / dense[(r["task"], r["seq_len"])]
                for r in self.rows
                if r["method"] != DENSE and dense.get((r["task"], r["seq_len"]))}


def policy_label(policy: str) -> str:
    return Path(policy).stem if policy.endswith((".yaml", ".yml", ".toml")) else policy


def sample_rng(seed: int, *parts) -> random.Random:
    """A generator that depends only on the seed and the sample's coordinates (stable across runs)."""
    return random.Random(zlib.crc32(repr((seed, *parts)).encode()))


def prompt_ids(tokenizer, sample: Sample, device) -> torch.Tensor:
    """The chat-formatted prompt, ending where the assistant's answer begins. No answer prefix is put in the
    model's mouth: SmolLM2 then repeats the prefix instead of answering (passkey at 4K: 1/6 with a prefix, 6/6
    without, float32)."""
    user = sample.context + "\n\n" + sample.question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = user + "\n"
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)


def evaluate(config: EvalConfig, *, model=None, tokenizer=None, console=None, previous: EvalResult | None = None,
             checkpoint: Callable[[EvalResult], None] | None = None) -> EvalResult:
    """Run ``config``; ``model``/``tokenizer`` may be passed in (already loaded), else ``config.model`` is loaded.

    ``previous``: an unfinished run of the same configuration (see :func:`load_previous`); the items it holds are
    kept and not run again. ``checkpoint`` is called with the result so far after every finished item, so a run
    that is killed (a time limit, a lost machine) loses at most the item in flight.
    """
    import sparsify

    from ..models import load_model

    policies = {DENSE: None}
    for policy in config.policies:
        if policy_label(policy) != DENSE:
            policies[policy_label(policy)] = Policy.load(policy)  # bad policies fail before the model loads
    if model is None:
        dtype = getattr(torch, config.dtype) if config.dtype else (
            torch.bfloat16 if config.device == "cuda" else torch.float32)
        model, tokenizer = load_model(config.model, dtype=dtype, device=config.device)
    compiled = {name: model if policy is None else
                sparsify.compile(model, policy, cost_model_fallback=config.cost_model_fallback)
                for name, policy in policies.items()}
    result = EvalResult(samples=list(previous.samples), fidelity=list(previous.fidelity),
                        generation=list(previous.generation)) if previous else EvalResult()
    earlier = previous.seconds if previous else 0.0
    result.interrupted = True
    done = _finished(result)
    start = time.perf_counter()
    items = [(*item, method) for item in _mine(config, _task_items(config)) + _mine(config, _fidelity_items(config))
             for method in policies]
    work = sum(item not in done for item in items)

    def settle():
        result.seconds = earlier + time.perf_counter() - start
        result.rows = _aggregate(result.samples)

    def finished_item():
        if checkpoint:
            settle()
            checkpoint(result)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            bar = progress.add_task("eval", total=work)
            _run_tasks(config, model, tokenizer, compiled, result, done, progress, bar, finished_item)
            _run_fidelity(config, model, tokenizer, compiled, result, done, progress, bar, finished_item)
        result.interrupted = False
    except KeyboardInterrupt:
        pass  # keep what finished (interrupted stays true); the caller writes it
    settle()
    return result


def _finished(result: EvalResult) -> set[tuple]:
    """The items ``result`` holds, as ``(task, length, index, method)`` / ``(kind, length, method)``."""
    return ({(s["task"], s["seq_len"], s["index"], s["method"]) for s in result.samples}
            | {("fidelity", f["length"], f["method"]) for f in result.fidelity}
            | {("generation", g["length"], g["method"]) for g in result.generation})


@contextmanager
def through_sparsify(runner, method: str):
    """Fail if a compiled policy's model ran without sparsify's graphs (Dynamo falling back to eager would
    silently measure dense), or if its sparse methods applied to no attention at all (every one fell back)."""
    handle = getattr(runner, "sparsify", None)
    before = handle.calls if handle else 0
    yield
    if handle is None:
        return
    if handle.calls == before:
        raise SparsifyError(f"policy {method}: the model ran without sparsify's rewritten graphs "
                            "(torch.compile fell back to eager, e.g. at its recompile limit); results would be dense")
    applied, reasons = handle.applied()
    if handle.policy.uses_sparse_methods and not applied:
        raise SparsifyError(f"policy {method}: no attention got a sparse method, every one fell back to dense "
                            f"({'; '.join(sorted(reasons)) or 'no reason recorded'}); results would be dense")


def _advance(progress: Progress, bar, done: str) -> None:
    """Advance the bar; where output is not a terminal (a log file, a remote job) the bar only shows at the end,
    so each finished step is also written as a line."""
    progress.advance(bar)
    if not progress.console.is_terminal:
        task = progress.tasks[bar]
        progress.console.print(f"[{int(task.completed)}/{int(task.total)} {task.elapsed:.0f}s] {done}",
                               highlight=False)


def _task_items(config) -> list[tuple[str, int, int]]:
    return [(task, length, index) for task in config.tasks for length in config.lengths
            for index in range(config.samples)]


def _fidelity_items(config) -> list[tuple[str, int]]:
    items = [("fidelity", length) for length in config.fidelity_lengths]
    return items + ([("generation", max(config.fidelity_lengths))] if config.generation_tokens else [])


def _mine(config, items: list) -> list:
    """This shard's share of ``items``: every N-th, from the K-th (shards run in parallel processes)."""
    index, count = config.shard
    return items[index::count]


def _run_tasks(config, model, tokenizer, compiled, result, done, progress, bar, finished_item):
    for task_name, length, index in _mine(config, _task_items(config)):
        if all((task_name, length, index, method) in done for method in compiled):
            continue
        task = TASKS.get(task_name)
        depth = (index + 0.5) / config.samples  # needles spread evenly over 0-100% depth
        sample = task.generate(tokenizer, length, sample_rng(config.seed, task_name, length, index), depth)
        ids = prompt_ids(tokenizer, sample, model.device)
        for method, runner in compiled.items():
            if (task_name, length, index, method) in done:
                continue
            progress.update(bar, description=f"{task_name} @{length} #{index} {method}")
            with torch.no_grad(), through_sparsify(runner, method):
                out = runner.generate(ids, max_new_tokens=task.max_new_tokens, do_sample=False)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            result.samples.append({"task": task_name, "seq_len": length, "index": index, "depth": depth,
                                   "method": method, "prompt_tokens": ids.shape[1],
                                   "score": sample.score(text), "answers": list(sample.answers),
                                   "generated": text})
            _advance(progress, bar, f"{task_name} @{length} #{index} {method}: score {sample.score(text):.2f}")
            finished_item()


def _run_fidelity(config, model, tokenizer, compiled, result, done, progress, bar, finished_item):
    for kind, length in _mine(config, _fidelity_items(config)):
        if all((kind, length, method) in done for method in compiled):
            continue
        if kind == "fidelity":
            sample = TASKS.get("niah_single").generate(tokenizer, length, sample_rng(config.seed, "fidelity", length),
                                                       0.5)
        else:
            sample = TASKS.get("passkey").generate(tokenizer, length, sample_rng(config.seed, "generation"), 0.5)
        ids = prompt_ids(tokenizer, sample, model.device)
        for method, runner in compiled.items():
            if (kind, length, method) in done:
                continue
            progress.update(bar, description=f"{kind} @{length} {method}")
            with through_sparsify(runner, method):
                if kind == "fidelity":
                    result.fidelity.append({"method": method, "length": length, **fidelity_metrics.measure(
                        model, runner, ids, config.continuation)})
                else:
                    entry = fidelity_metrics.generation_agreement(model, runner, ids, config.generation_tokens)
                    result.generation.append({"method": method, "length": length, "seq_len": ids.shape[1],
                                              **entry})
            _advance(progress, bar, f"{kind} @{length} {method}")
            finished_item()


def _aggregate(samples: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for s in samples:
        groups.setdefault((s["task"], s["seq_len"], s["method"]), []).append(s["score"])
    return [{"task": task, "seq_len": length, "method": method, "score": sum(scores) / len(scores), "n": len(scores)}
            for (task, length, method), scores in groups.items()]


def result_name(config: EvalConfig) -> str:
    """``eval-<suite>``, or ``eval-<suite>.shard-KofN`` for shard K of N."""
    index, count = config.shard
    return f"eval-{config.suite}" + (f".shard-{index}of{count}" if count > 1 else "")


def load_previous(config: EvalConfig, folder: Path | None = None) -> EvalResult | None:
    """The unfinished run of ``config`` written in ``folder`` (None when there is none), to continue with
    ``evaluate(previous=...)``. Fails naming the settings that differ, when the file holds another configuration."""
    from ..benchmarks.common import results_dir

    path = (folder or results_dir()) / f"{result_name(config)}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    differ = sorted(k for k, v in _comparable(asdict(config)).items() if _comparable(data["config"]).get(k) != v)
    if differ:
        raise SparsifyError(f"resume: {path.name} was run with other settings ({', '.join(differ)}); "
                            "use another --suite or delete the file")
    return EvalResult.from_json(data)


def _comparable(settings: dict) -> dict:
    """A configuration as JSON gives it back (tuples as lists), less what does not change the measurements."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items() if k != "plots"}


def write(config: EvalConfig, result: EvalResult, model_name: str, folder: Path | None = None,
          merged_from: list[str] | None = None, plots_too: bool = True) -> Path:
    """``benchmarks/results/eval-<suite>.json`` (+ .md and PNG plots), in the shared results format; a shard K of
    N writes ``eval-<suite>.shard-KofN.json`` alone, for :func:`merge_shards`. ``plots_too=False`` for
    checkpoints."""
    from ..benchmarks.common import results_dir, write_result

    count = config.shard[1]
    name = result_name(config)
    extra = {"model": model_name, "ratio_meaning": "policy score / dense score", "config": asdict(config),
             "fidelity": result.fidelity,
             "generation": result.generation, "samples": result.samples, "interrupted": result.interrupted,
             "duration_s": round(result.seconds, 1)}
    if merged_from:
        extra["merged_from"] = merged_from
    path = write_result(name, result.rows, result.ratios(), extra, folder=folder or results_dir())
    if config.plots and plots_too and count == 1:
        folder = path.parent
        shown = Path(model_name).name  # a GGUF path's file name, or the built-in model's name
        if result.rows:
            plots.scores_vs_length(result.rows, folder / f"{name}-scores.png", f"{shown}: score vs length")
        if result.fidelity:
            plots.layer_errors(result.fidelity, folder / f"{name}-fidelity.png", f"{shown}: fidelity vs dense")
    return path


def merge_shards(suite: str, folder: Path | None = None) -> Path:
    """Join the shards of one sharded run (``eval --shard K/N``, same configuration) into ``eval-<suite>.json``
    with its table and plots. Fails naming what is missing or inconsistent."""
    from ..benchmarks.common import results_dir

    folder = folder or results_dir()
    paths = sorted(folder.glob(f"eval-{suite}.shard-*of*.json"))
    if not paths:
        raise SparsifyError(f"merge: no shard files eval-{suite}.shard-KofN.json in {folder}")
    shards = [json.loads(path.read_text()) for path in paths]
    count = shards[0]["config"]["shard"][1]
    found = sorted(shard["config"]["shard"][0] for shard in shards)
    if found != list(range(count)):
        raise SparsifyError(f"merge: suite {suite!r} has {count} shards; found shards {found} in {folder}")
    settings = [{k: v for k, v in shard["config"].items() if k != "shard"} for shard in shards]
    if any(setting != settings[0] for setting in settings):
        raise SparsifyError(f"merge: the shards of suite {suite!r} were run with different configurations")
    merged = EvalResult.from_json({
        "samples": [s for shard in shards for s in shard["samples"]],
        "fidelity": [f for shard in shards for f in shard["fidelity"]],
        "generation": [g for shard in shards for g in shard["generation"]],
        "interrupted": any(shard["interrupted"] for shard in shards),
        "duration_s": max(shard["duration_s"] for shard in shards),
    })
    known = {f.name for f in fields(EvalConfig)}
    config = EvalConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings[0].items() if k in known})
    return write(config, merged, shards[0]["model"], folder,
                 merged_from=[f"{path.name}: {shard['command']}" for path, shard in zip(paths, shards)])
