"""What ``experiments/finetune.py`` leaves behind: ``results.json``, ``curves.png``, a table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (or of the file itself).

    Args:
        path: A file or directory.

    Returns:
        Size in bytes.
    """
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    """Writes ``value`` as indented JSON.

    Args:
        path: Output file.
        value: JSON-serialisable mapping.
    """
    path.write_text(json.dumps(value, indent=2) + "\n")


def plot_curves(path: Path, history: Mapping[str, Any], metric: str, title: str) -> None:
    """Plots training loss (raw and smoothed), evaluation loss, and the headline metric.

    Args:
        path: Output PNG.
        history: ``{"train_loss": [[step, loss], ...], "eval": [{"step", "loss", metric}]}``.
        metric: The headline metric in each eval entry.
        title: Figure title.
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, metric_ax = fig.subplots(1, 2)
    train = np.asarray(history["train_loss"], dtype=float).reshape(-1, 2)
    evals = history["eval"]
    eval_steps = [e["step"] for e in evals]
    window = max(1, len(train) // 20)
    loss_ax.plot(train[:, 0], train[:, 1], color="tab:blue", alpha=0.3, label="train (per step)")
    if window > 1:
        smooth = np.convolve(train[:, 1], np.ones(window) / window, mode="valid")
        loss_ax.plot(
            train[window - 1 :, 0], smooth, color="tab:blue", label=f"train ({window}-step mean)"
        )
    loss_ax.plot(eval_steps, [e["loss"] for e in evals], "o-", color="tab:orange", label="eval")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    metric_ax.plot(eval_steps, [e[metric] for e in evals], "o-", color="tab:green")
    metric_ax.set(xlabel="step", ylabel=metric, title=f"eval {metric}")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def format_table(results: Mapping[str, Any]) -> str:
    """The closing table of a run.

    Args:
        results: What `finetune` writes to ``results.json``.

    Returns:
        Aligned text: each metric before and after, then parameters, step time, steps
        skipped for non-finite gradients, peak memory and the size of what was saved;
        then where each output is (``results["outputs"]``).
    """
    before, after = results["before"], results["after"]
    step_time = results["step_time_median_s"]
    rows = [("", "before", "after")]
    rows += [(f"eval {k}", f"{before[k]:.4f}", f"{after[k]:.4f}") for k in after]
    rows += [
        (
            "trainable params",
            f"{results['trainable_params']:,} of {results['total_params']:,}",
            f"({results['trainable_percent']:.3f}%)",
        ),
        (
            "step time",
            "n/a" if step_time is None else f"{step_time:.3f} s/step",
            "(median after compilation)",
        ),
        (
            "skipped steps",
            "off" if results["skipped_steps"] is None else f"{results['skipped_steps']:,}",
            "(non-finite gradients; --skip-nonfinite)",
        ),
        ("peak memory", f"{results['peak_rss_mb']:,.0f} MB", "(peak RSS)"),
        ("saved on disk", _size(results["saved_bytes"]), results["saved_path"]),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [
        f"{label.ljust(widths[0])}  {first.rjust(widths[1])}  {second}"
        for label, first, second in rows
    ]
    outputs = results["outputs"]
    width = max(len(name) for name in outputs)
    lines.append("written:")
    lines += [f"  {name.ljust(width)}  {path}" for name, path in outputs.items()]
    return "\n".join([results["title"], *lines])
