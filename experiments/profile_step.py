"""Where a training step's time goes, from a profiler trace of the benchmark workload.

Run from the repository root::

    python -m experiments.profile_step jaxlora all          # per layer type, forward/backward
    python -m experiments.profile_step jax-floor frozen     # the same model, no adapters
    python -m experiments.profile_step torch-peft all       # PyTorch: top aten ops
    python -m experiments.profile_step jaxlora all --attention none --steps 5
    python -m experiments.profile_step jaxlora all --model gpt2-moe   # or gpt2-einsum

JAX rows (``jax-full``, ``jax-floor``, ``jaxlora``) trace ``--steps`` compiled steps with
``jax.profiler`` and attribute each XLA op's time to the module its HLO metadata names:
``query``...``down`` (that layer's base matmul and its adapter; on ``--model gpt2-moe`` the
``up``/``down`` expert weights' ``ragged_dot`` and ``router``), ``attention`` (the softmax
attention between them), ``gelu`` (on ``gpt2-moe`` also the routing: top-k, sort, gathers),
``layernorm``, ``lm_head``, ``embed``, ``loss+update`` (the loss and the optimizer). A fused
op counts for the module its metadata names (the LM head's forward matmul is fused into the
loss's softmax, so it shows under ``loss+update``), and ops run two at a time on two cores,
so read the columns as approximate: their sum exceeds the wall time.
Comparing ``jaxlora all`` with ``jax-floor frozen`` shows what the adapters cost per layer
type. Torch rows (``torch-floor``, ``torch-peft``, ``torch-full``) print
``torch.profiler``'s top operators by self CPU time. Every :class:`Workload` field is a flag.
"""

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.bench_common import FROZEN, Workload, add_workload_flags, workload_of

JAX_IMPLS = ("jax-full", "jax-floor", "jaxlora")
TORCH_IMPLS = ("torch-full", "torch-floor", "torch-peft")
LAYERS = ("query", "key", "value", "out", "up", "down", "router")
PHASES = ("forward", "backward", "other")
_OP = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", re.M)


def category(op_name: str) -> tuple[str, str]:
    """``(module, phase)`` of an XLA op from its metadata ``op_name``.

    Example:
      >>> category("jit(step)/transpose(jvp(GPT2))/block_0/attn/query/dot_general")
      ('query', 'backward')
    """
    phase = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "other"
    parts = op_name.split("/")
    for name in LAYERS:
        if name in parts:
            return name, phase
    if "attn" in parts:
        return "attention", phase
    if "mlp" in parts:
        return "gelu", phase
    if any(p.startswith("ln") for p in parts):
        return "layernorm", phase
    for name, module in (("lm_head", "lm_head"), ("wte", "embed"), ("wpe", "embed")):
        if name in parts:
            return module, phase
    return "loss+update", phase


def jax_run(impl: str, setting: str, w: Workload) -> Any:
    """The benchmark's `bench_jax.FunctionalRun` of a JAX row."""
    from experiments import bench_jax, bench_jaxlora

    setups = {
        "jax-full": bench_jax.linen_full,
        "jax-floor": bench_jax.linen_floor,
        "jaxlora": bench_jaxlora.linen_lora,
    }
    return setups[impl](setting, w)


def op_times(trace_file: Path, op_names: dict[str, str]) -> collections.Counter:
    """Microseconds per ``(module, phase)`` over the trace's XLA op events."""
    with gzip.open(trace_file) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in op_names:
            totals[category(op_names[e["name"]])] += e["dur"]
    return totals


def profile_jax(impl: str, setting: str, w: Workload) -> str:
    """Markdown table: milliseconds per step by module and phase, and the wall time."""
    import jax

    from experiments.bench_jax import device_batch

    step, params, opt_state, *_ = jax_run(impl, setting, w)
    batch = device_batch(w)
    op_names = dict(_OP.findall(step.lower(params, opt_state, batch).compile().as_text()))

    def run(steps: int) -> None:
        nonlocal params, opt_state
        for _ in range(steps):  # steps donate their inputs: carry the state along
            params, opt_state, loss = step(params, opt_state, batch)
            loss.block_until_ready()

    run(max(w.warmup, 1))
    with tempfile.TemporaryDirectory() as logdir:
        start = time.perf_counter()
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            run(w.steps)
        wall_ms = (time.perf_counter() - start) * 1e3 / w.steps
        (trace_file,) = Path(logdir).rglob("*.trace.json.gz")
        totals = op_times(trace_file, op_names)
    modules = sorted({m for m, _ in totals}, key=lambda m: -sum(totals[m, p] for p in PHASES))
    lines = [
        f"{impl} {setting}: {wall_ms:.1f} ms per step (wall, profiled)",
        "",
        "| module | forward ms | backward ms | other ms | total ms |",
        "|---|--:|--:|--:|--:|",
    ]
    for m in [*modules, None]:
        cells = [sum(totals[k] for k in totals if k[1] == p and m in (None, k[0])) for p in PHASES]
        row = [f"{c / 1e3 / w.steps:.1f}" for c in [*cells, sum(cells)]]
        lines.append(f"| {m or '**all ops**'} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def profile_torch(impl: str, setting: str, w: Workload, rows: int = 15) -> str:
    """``torch.profiler``'s top operators by self CPU time over ``w.steps`` steps."""
    import torch

    from experiments import bench_torch

    call, _, _ = bench_torch.training(setting, w)
    for _ in range(max(w.warmup, 1)):
        call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(w.steps):
            call()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """``IMPL SETTING`` and the :class:`Workload` flags (``--steps`` defaults to 3 here)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("impl", choices=(*JAX_IMPLS, *TORCH_IMPLS))
    p.add_argument("setting", choices=("qv", "all", "full", FROZEN))
    add_workload_flags(p, steps=3)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the profile of one (implementation, setting)."""
    args = parse_args(argv)
    w = workload_of(args)
    profile: Any = profile_jax if args.impl in JAX_IMPLS else profile_torch
    print(profile(args.impl, args.setting, w))


if __name__ == "__main__":
    main()
