"""Plots of evaluation results (PNG, matplotlib without a display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def scores_vs_length(rows: list[dict], path: Path, title: str) -> Path:
    tasks = sorted({r["task"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    columns = min(3, len(tasks))
    lines = -(-len(tasks) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), squeeze=False)
    for axis, task in zip(axes.flat, tasks):
        for method in methods:
            points = sorted((r["seq_len"], r["score"]) for r in rows if r["task"] == task and r["method"] == method)
            if points:
                axis.plot(*zip(*points), marker="o", label=method)
        axis.set_title(task)
        axis.set_xlabel("prompt tokens")
        axis.set_ylabel("score")
        axis.set_ylim(-0.05, 1.05)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(tasks):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    return _save(figure, path, title)


def layer_errors(fidelity: list[dict], path: Path, title: str) -> Path:
    """Per layer attention error; KL over the prompt by position (16 buckets); KL per teacher-forced decode step."""
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 3.8))
    for entry in fidelity:
        label = f"{entry['method']} @{entry['seq_len']}"
        left.plot(range(len(entry["layer_rel_error"])), entry["layer_rel_error"], marker=".", label=label)
        buckets = entry["prompt_kl_by_position"]
        middle.plot([(i + 0.5) / len(buckets) for i in range(len(buckets))], buckets, marker=".", label=label)
        if entry.get("continuation_kl"):
            right.plot(range(1, len(entry["continuation_kl"]) + 1), entry["continuation_kl"], label=label)
    left.set_xlabel("layer")
    left.set_ylabel("relative error of attention output")
    left.set_yscale("symlog", linthresh=1e-4)
    left.legend(fontsize=7)
    middle.set_xlabel("position in the prompt (share of its length)")
    middle.set_ylabel("KL(dense || policy), next token")
    middle.set_yscale("symlog", linthresh=1e-4)
    right.set_xlabel("decode step (teacher-forced)")
    right.set_ylabel("KL(dense || policy)")
    for axis in (left, middle, right):
        axis.grid(alpha=0.3)
    return _save(figure, path, title)


def diffusion_steps(runs: list[dict], switch: int, path: Path, title: str) -> Path:
    """Per denoising step, for each run (a prompt at a length): KL(dense || sparse) over the still-masked positions
    and the share of them whose argmax is dense's, both on the dense run's own inputs; a line at the switch step
    (the first sparse step follows it)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for index, run in enumerate(runs):
        sample = sum(earlier["seq_len"] == run["seq_len"] for earlier in runs[:index])
        label = f"N={run['seq_len']} prompt {sample} (agreement {run['agreement']:.2f})"
        left.plot(range(len(run["kl_by_step"])), run["kl_by_step"], label=label)
        right.plot(range(len(run["argmax_agreement_by_step"])), run["argmax_agreement_by_step"], label=label)
    left.set_ylabel("KL(dense || sparse), masked positions")
    left.set_yscale("symlog", linthresh=1e-4)
    right.set_ylabel("argmax equal to dense's (share)")
    right.set_ylim(-0.05, 1.05)
    for axis in (left, right):
        axis.axvline(switch, color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel("denoising step")
        axis.grid(alpha=0.3)
    right.legend(fontsize=7)
    return _save(figure, path, title)


def block_pattern(full, partial, path: Path, title: str) -> Path:
    """Heatmap of one head's layout: 1 full block, 0.5 partial (masked inside), 0 skipped."""
    grid = full.float() + 0.5 * partial.float()
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.imshow(grid.cpu().numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    axis.set_xlabel("key block")
    axis.set_ylabel("query block")
    visited = (full | partial).float().mean().item()
    axis.set_title(f"{title}\n{visited:.1%} of blocks visited (dark: full, light: partial)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _save(figure, path: Path, title: str) -> Path:
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
