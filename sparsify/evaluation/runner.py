"""Run an evaluation: every policy (dense always first, as the baseline) on the same generated samples."""

from __future__ import annotations

import random
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    tasks: tuple[str, ...] = ("passkey", "niah_single", "niah_multikey", "variable_tracking", "aggregation")
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

    def __post_init__(self):
        for name in self.tasks:
            TASKS.get(name, field="tasks")
        for name in ("samples", "continuation", "generation_tokens"):
            if getattr(self, name) < 0 or (name == "samples" and self.samples == 0):
                raise SparsifyError(f"{name}: must be {'> 0' if name == 'samples' else '>= 0'}, got {getattr(self, name)}")
        if any(length < 256 for length in (*self.lengths, *self.fidelity_lengths)):
            raise SparsifyError("lengths: each must be at least 256 tokens")


@dataclass
class EvalResult:
    rows: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    fidelity: list[dict] = field(default_factory=list)
    generation: list[dict] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

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
    user = sample.context + "\n\n" + sample.question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = user + "\n"
    return tokenizer(text + sample.answer_prefix, return_tensors="pt", add_special_tokens=False).input_ids.to(device)


def evaluate(config: EvalConfig, *, model=None, tokenizer=None, console=None) -> EvalResult:
    """Run ``config``; ``model``/``tokenizer`` may be passed in (already loaded), else ``config.model`` is loaded."""
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
    result = EvalResult()
    start = time.perf_counter()
    work = (len(config.tasks) * len(config.lengths) * config.samples + len(config.fidelity_lengths)
            + (1 if config.generation_tokens else 0)) * len(policies)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            bar = progress.add_task("eval", total=work)
            _run_tasks(config, model, tokenizer, compiled, result, progress, bar)
            _run_fidelity(config, model, tokenizer, compiled, result, progress, bar)
    except KeyboardInterrupt:
        result.interrupted = True  # keep what finished; the caller writes it
    result.seconds = time.perf_counter() - start
    result.rows = _aggregate(result.samples)
    return result


@contextmanager
def through_sparsify(runner, method: str):
    """Fail if a compiled policy's model ran without sparsify's graphs (Dynamo falling back to eager would
    silently measure dense)."""
    handle = getattr(runner, "sparsify", None)
    before = handle.calls if handle else 0
    yield
    if handle is not None and handle.calls == before:
        raise SparsifyError(f"policy {method}: the model ran without sparsify's rewritten graphs "
                            "(torch.compile fell back to eager, e.g. at its recompile limit); results would be dense")


def _run_tasks(config, model, tokenizer, compiled, result, progress, bar):
    for task_name in config.tasks:
        task = TASKS.get(task_name)
        for length in config.lengths:
            for index in range(config.samples):
                depth = (index + 0.5) / config.samples  # needles spread evenly over 0-100% depth
                sample = task.generate(tokenizer, length, sample_rng(config.seed, task_name, length, index), depth)
                ids = prompt_ids(tokenizer, sample, model.device)
                for method, runner in compiled.items():
                    progress.update(bar, description=f"{task_name} @{length} #{index} {method}")
                    with torch.no_grad(), through_sparsify(runner, method):
                        out = runner.generate(ids, max_new_tokens=task.max_new_tokens, do_sample=False)
                    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                    result.samples.append({"task": task_name, "seq_len": length, "index": index, "depth": depth,
                                           "method": method, "prompt_tokens": ids.shape[1],
                                           "score": sample.score(text), "answers": list(sample.answers),
                                           "generated": text})
                    progress.advance(bar)


def _run_fidelity(config, model, tokenizer, compiled, result, progress, bar):
    for length in config.fidelity_lengths:
        sample = TASKS.get("niah_single").generate(tokenizer, length, sample_rng(config.seed, "fidelity", length), 0.5)
        ids = prompt_ids(tokenizer, sample, model.device)
        for method, runner in compiled.items():
            progress.update(bar, description=f"fidelity @{length} {method}")
            with through_sparsify(runner, method):
                entry = fidelity_metrics.measure(model, runner, ids, config.continuation)
            result.fidelity.append({"method": method, **entry})
            progress.advance(bar)
    if config.generation_tokens:
        length = max(config.fidelity_lengths)
        sample = TASKS.get("passkey").generate(tokenizer, length, sample_rng(config.seed, "generation"), 0.5)
        ids = prompt_ids(tokenizer, sample, model.device)
        for method, runner in compiled.items():
            progress.update(bar, description=f"generation {config.generation_tokens} tokens {method}")
            with through_sparsify(runner, method):
                entry = fidelity_metrics.generation_agreement(model, runner, ids, config.generation_tokens)
            result.generation.append({"method": method, "seq_len": ids.shape[1], **entry})
            progress.advance(bar)


def _aggregate(samples: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for s in samples:
        groups.setdefault((s["task"], s["seq_len"], s["method"]), []).append(s["score"])
    return [{"task": task, "seq_len": length, "method": method, "score": sum(scores) / len(scores), "n": len(scores)}
            for (task, length, method), scores in groups.items()]


def write(config: EvalConfig, result: EvalResult, model_name: str, folder: Path | None = None) -> Path:
    """``benchmarks/results/eval-<suite>.json`` (+ .md and PNG plots), in the shared results format."""
    from ..benchmarks.common import results_dir, write_result

    name = f"eval-{config.suite}"
    extra = {"model": model_name, "ratio_meaning": "policy score / dense score", "config": asdict(config),
             "fidelity": result.fidelity,
             "generation": result.generation, "samples": result.samples, "interrupted": result.interrupted,
             "duration_s": round(result.seconds, 1)}
    path = write_result(name, result.rows, result.ratios(), extra, folder=folder)
    if config.plots:
        folder = path.parent
        if result.rows:
            plots.scores_vs_length(result.rows, folder / f"{name}-scores.png", f"{model_name}: score vs length")
        if result.fidelity:
            plots.layer_errors(result.fidelity, folder / f"{name}-fidelity.png", f"{model_name}: fidelity vs dense")
    return path
