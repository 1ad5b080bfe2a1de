"""What every benchmark shares: CUDA-event timing and the results format of shared/docs/benchmarks.md."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

def results_dir() -> Path:
    """``benchmarks/results`` of the checkout we run from (the repository root), else beside this file."""
    here = Path.cwd() / "benchmarks" / "results"
    return here if here.parent.is_dir() else Path(__file__).resolve().parent / "results"


def time_ms(fn, *, warmup: int = 3, runs: int = 20) -> float:
    """Median wall time of ``fn()`` on the GPU in ms (CUDA events), after ``warmup`` calls.

    Calls that take over a second are measured 3 times, as the results format allows."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
        if len(samples) == 3 and min(samples) > 1000:
            break
    return statistics.median(samples)


def decode_inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, device):
    """A decode step's q (B, Hq, 1, D) and a full cache k, v (B, Hkv, seq, D), bf16, fresh from a generator seeded
    by the shape (so every implementation of a case, in any run, gets the same tensors)."""
    generator = torch.Generator(device=device).manual_seed(seq + batch)
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=torch.bfloat16, generator=generator)
    k, v = (torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=torch.bfloat16, generator=generator)
            for _ in range(2))
    return q, k, v


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||``, computed in float32."""
    expected = expected.float()
    return ((actual.float() - expected).norm() / expected.norm()).item()


def versions() -> dict[str, str]:
    import triton

    import sparsify

    return {"torch": torch.__version__, "triton": triton.__version__, "sparsify": sparsify.__version__}


def invocation() -> str:
    """The command line that ran this process, as a user would type it again: ``python -m <module> ...`` for a
    module run with ``-m`` (the device runs from a copied tree, so a file path would name that copy), else the
    program's name (``sparsify bench ...``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    script = Path(sys.argv[0])
    program = (f"python -m {spec.name}" if spec is not None
               else f"python {script}" if script.suffix == ".py" else script.name)
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def write_result(name: str, rows: list[dict], ratios: dict[str, float], extra: dict | None = None,
                 folder: Path | None = None) -> Path:
    result = {
        "name": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": versions(),
        "command": invocation(),
        "rows": rows,
        "ratios": ratios,
        **(extra or {}),
    }
    folder = folder or results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    _write_atomically(path, json.dumps(result, indent=2) + "\n")
    _write_atomically(folder / f"{name}.md", markdown_table(result))
    return path


def _write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a process killed mid-write (evaluations checkpoint after
    every item) leaves the previous file whole, never a truncated one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def markdown_table(result: dict) -> str:
    rows = result["rows"]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [f"# {result['name']}", "", f"{result['date']} · {result['device']} · "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "", f"`{result['command']}`", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    if result.get("interrupted"):
        lines[6:6] = ["**Interrupted**: the rows cover the samples that finished.", ""]
    if result.get("parts"):  # a merge: the machine and command of each part, not of the merge
        lines[6:6] = [f"- `{name}`: {part['date']} · {part['device']} · "
                      + ", ".join(f"{k} {v}" for k, v in part["versions"].items()) + f" · `{part['command']}`"
                      + (f" ({part['note']})" if part.get("note") else "") for name, part in result["parts"].items()] + [""]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    meaning = result.get("ratio_meaning", "other's time / ours; > 1: ours faster")
    lines += ["", f"| ratio ({meaning}) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
