"""Training and inference step times: jaxlora vs Flax NNX LoRA vs Qwix vs PyTorch + PEFT vs full FT.

Run from the repository root::

    python -m experiments.benchmark                          # markdown tables, full-size workload
    python -m experiments.benchmark --json --reps 5          # one JSON object per row
    python -m experiments.benchmark --impls jax-full,nnx-full --settings full --steps 3 --reps 1
    python -m experiments.benchmark --child nnx-lora qv      # one child: one JSON line
    python -m experiments.benchmark --impls jaxlora,jaxlora-qlora,qwix-lora,qwix-qlora \
        --settings qv,all                                     # QLoRA; Qwix as a peer
    python -m experiments.benchmark --impls jaxlora,jaxlora-dora,torch-peft,torch-peft-dora \
        --settings all --reps 3                               # DoRA against LoRA, both libraries
    python -m experiments.benchmark --impls fwd-lora,jaxlora-mixed,jaxlora,jaxlora-mixed-train \
        --settings all --adapters 1,4,16                      # many adapters, mixed batches
    python -m experiments.benchmark --impls fwd-lora,jaxlora-mixed,torch-peft-fwd,torch-peft-mixed \
        --settings all --adapters 1,4,16                      # mixed batches against PEFT's
    python -m experiments.benchmark --model gpt2,gpt2-einsum,gpt2-moe \
        --impls jax-full,jax-floor,jaxlora --settings all,full,frozen   # custom layers, MoE

Every (implementation, setting) pair runs in its own subprocess, and repetitions are interleaved,
every other one in reverse order (A, B, C, C, B, A, A, B, C, ...), so that drifts in machine
load, also within a repetition, hit every implementation alike. A child builds the model,
compiles, runs ``--warmup`` untimed then ``--steps`` timed steps (each blocked until ready)
and prints one JSON line. Settings: ``qv`` (LoRA on query/value), ``all`` (LoRA on
query/key/value/out/up/down), ``full`` (every weight trains; for ``fwd-base``: no adapters) and
``frozen`` (the floor: no adapters and only the position table trains, so the backward pass runs
through every layer but forms no weight gradient of a linear layer; the least work any LoRA
step on this model can do, measured per framework by ``jax-floor`` and ``torch-floor``).

``--model`` picks the linen model of the JAX rows (``jax-full``, ``jax-floor``, ``jaxlora``,
``fwd-*``): ``gpt2`` (``nn.Dense`` layers, the default), ``gpt2-einsum`` (the same model written
with its own einsum modules, as Tunix and MaxText write theirs) or ``gpt2-moe`` (its
mixture-of-experts variant, experts applied with ``jax.lax.ragged_dot``; there LoRA's ``all``
also adapts the router). A comma-separated list runs every job on each model, interleaved;
each model gets its own tables and ratios, and the report checks two targets: the
``jaxlora`` step of ``gpt2-einsum`` within 5% of ``gpt2``'s, and on ``gpt2-moe`` at most 0.75x
of ``jax-full``. The NNX and torch rows mirror ``gpt2`` only.

Row fields (``--json``):
    impl, setting, kind: What ran (``kind`` is ``train`` or ``infer``).
    model: The model it ran on (see ``--model``).
    step_time_median_s, step_time_min_s: Over the timed steps of all repetitions pooled.
    rep_medians_s: Median of each repetition, to judge run-to-run noise.
    peak_rss_mb: Peak resident set size of the child (max over repetitions).
    trainable_params, total_params: Parameter counts (adapters included in the total).
    opt_state_floats: Array elements in the optimizer state, step counters included.
    opt_state_scalars: How many of those are 0-d step counters, so for AdamW
        ``opt_state_floats == 2 * trainable_params + opt_state_scalars``; the counters are one
        for optax (``jax-full``, ``jax-floor``, ``jaxlora``), two for NNX (``nnx-lora``,
        ``jaxlora-nnx``: optax's plus ``nnx.Optimizer.step``) and one per trainable tensor for
        ``torch.optim.AdamW``.
    gflops: XLA's FLOP count of the compiled step (JAX rows only).
    base_param_bytes: Bytes of the model's own parameters as stored, adapters left out (a
        quantized base counts its codes and scales; JAX training rows only).
    ratio_to_full: Median over the median of ``jax-full`` (train) or ``fwd-base`` (infer).
    ratio_to_fastest_peer: Median over the fastest median among the *other* implementations of
        the same kind and setting that store the base alike (float32, or NF4 for
        ``jaxlora-qlora`` and ``qwix-qlora``); < 1 means this row is the fastest.
    ratio_to_floor: Training rows: median over the median of the same framework's floor
        (``jax-floor`` or ``torch-floor``); what the implementation adds to the unavoidable.
    adapters, ratio_to_single: Mixed-adapter rows (``jaxlora-mixed``: forward,
        ``jaxlora-mixed-train``: training step, each example of the batch using one of K
        adapters drawn uniformly, K from ``--adapters``): K, and the median over the median
        of the single-adapter row of the same kind and setting (``fwd-lora``, ``jaxlora``);
        ``None`` elsewhere. Mixed rows are no one's peer. ``torch-peft-mixed`` is PEFT's
        mixed-batch forward (``adapter_names=``), its single row ``torch-peft-fwd``.
    ratio_to_mixed_peer: ``jaxlora-mixed``: median over the median of ``torch-peft-mixed``
        at the same K (same ids per example); ``None`` elsewhere.
        All ratios compare rows of the same model.
    switch_ms: Median time of a switch to another adapter: selecting it plus the first
        forward pass after it, ``SWITCHES`` switches round robin per child (pooled).
        ``fwd-lora``: ``bank.select(name)`` of a bank of two adapters into the jitted
        forward; ``jaxlora-mixed``: one int id (``bank.index``) into the jitted bank
        forward, among its K adapters; ``torch-peft-mixed``: ``set_adapter`` + forward.
    compilations: JAX rows with ``switch_ms``: XLA compilations from the switching
        function's first call through all switches (max over repetitions); one
        compilation per structure gives 1.
    threads: CPUs available to XLA, and the value given to ``torch.set_num_threads``.
    reps_ok, error: Successful repetitions; the first failure's message, if any.
"""

import argparse
import dataclasses
import importlib
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from experiments.bench_common import (
    FROZEN,
    MODELS,
    TARGETS,
    Workload,
    add_workload_flags,
    cpu_count,
    csv_of,
    workload_of,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SETTINGS = (*TARGETS, "full", FROZEN)


@dataclasses.dataclass(frozen=True)
class Impl:
    """How to run one implementation.

    Attributes:
        kind: ``"train"`` or ``"infer"``.
        settings: The settings it runs in.
        module: Module whose ``RUNNERS[impl](setting, workload)`` measures it.
        framework: ``"jax"`` or ``"torch"``: whose floor its ``ratio_to_floor`` divides by.
        requires: Optional packages; without them the implementation is skipped with a note.
        models: The models (``--model``) it runs on.
        base: How it stores the frozen base (``"float32"``, ``"nf4"``); rows are peers
            (``ratio_to_fastest_peer``) only of rows storing the base alike.
        single: For a mixed-adapter implementation, the single-adapter one of the same
            kind (``ratio_to_single`` divides by it); it runs once per ``--adapters`` K.
        mixed_peer: For a mixed-adapter implementation, the other framework's one it is
            compared with at the same K (``ratio_to_mixed_peer``).
        switch: How its child switches adapters for ``switch_ms`` (empty: it does not).
    """

    kind: str
    settings: tuple[str, ...]
    module: str
    framework: str = "jax"
    requires: tuple[str, ...] = ()
    models: tuple[str, ...] = ("gpt2",)
    base: str = "float32"
    single: str | None = None
    mixed_peer: str | None = None
    switch: str = ""


class Job(NamedTuple):
    """One child to run per repetition (``adapters``: K, for mixed-adapter rows only)."""

    impl: str
    setting: str
    model: str
    adapters: int | None


_LORA, _FULL, _FLOOR = tuple(TARGETS), ("full",), (FROZEN,)
_JAX, _JAXLORA = "experiments.bench_jax", "experiments.bench_jaxlora"


def _torch(kind: str, settings: tuple[str, ...], **fields: Any) -> Impl:
    return Impl(kind, settings, "experiments.bench_torch", "torch", ("torch", "peft"), **fields)


def _linen(kind: str, settings: tuple[str, ...], module: str) -> Impl:
    return Impl(kind, settings, module, models=MODELS)


IMPLS = {
    "jax-full": _linen("train", _FULL, _JAX),
    "jax-floor": _linen("train", _FLOOR, _JAX),
    "jaxlora": _linen("train", _LORA, _JAXLORA),
    "jaxlora-nnx": Impl("train", _LORA, _JAXLORA),
    "nnx-lora": Impl("train", _LORA, _JAX),
    "nnx-full": Impl("train", _FULL, _JAX),
    "jaxlora-qlora": Impl("train", _LORA, _JAXLORA, base="nf4"),
    "jaxlora-dora": Impl("train", _LORA, _JAXLORA),
    "qwix-lora": Impl("train", _LORA, "experiments.bench_qwix", requires=("qwix",)),
    "qwix-qlora": Impl("train", _LORA, "experiments.bench_qwix", requires=("qwix",), base="nf4"),
    "torch-peft": _torch("train", _LORA),
    "torch-peft-dora": _torch("train", _LORA),
    "torch-full": _torch("train", _FULL),
    "torch-floor": _torch("train", _FLOOR),
    "fwd-base": _linen("infer", _FULL, _JAX),
    "fwd-lora": Impl("infer", _LORA, _JAXLORA, models=MODELS, switch="bank.select"),
    "fwd-merged": _linen("infer", _LORA, _JAXLORA),
    "jaxlora-mixed": Impl(
        "infer",
        _LORA,
        _JAXLORA,
        single="fwd-lora",
        mixed_peer="torch-peft-mixed",
        switch="one int id",
    ),
    "jaxlora-mixed-train": Impl("train", _LORA, _JAXLORA, single="jaxlora"),
    "torch-peft-fwd": _torch("infer", _LORA),
    "torch-peft-mixed": _torch("infer", _LORA, single="torch-peft-fwd", switch="set_adapter"),
}
BASELINES = {"train": "jax-full", "infer": "fwd-base"}
FLOORS = {"jax": "jax-floor", "torch": "torch-floor"}
MEASURED_ONCE = (
    "trainable_params",
    "total_params",
    "opt_state_floats",
    "opt_state_scalars",
    "gflops",
    "base_param_bytes",
    "threads",
)  # the same in every repetition: taken from the first successful one
MERGED_TOLERANCE = 0.02  # fwd-merged should be within 2% of fwd-base
EINSUM_TOLERANCE = 0.05  # jaxlora on gpt2-einsum should be within 5% of jaxlora on gpt2
MOE_TARGET = 0.75  # jaxlora on gpt2-moe should take at most 0.75x of jax-full on gpt2-moe
MIXED_TARGETS = {("infer", 16): 1.3, ("train", 4): 1.3}  # at most x the single-adapter row
MIXED_PEER_TARGETS = {("infer", 16): 1.0}  # at most x the mixed peer (PEFT) at the same K
ERROR_CHARS = 300  # error messages in rows are cut to this length


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line; every :class:`Workload` field is a ``--flag``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_workload_flags(p, several=("model", "adapters"))
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default: 3)")
    p.add_argument(
        "--impls", type=csv_of(list(IMPLS)), default=tuple(IMPLS), help=f"{','.join(IMPLS)}"
    )
    p.add_argument(
        "--settings", type=csv_of(SETTINGS), default=SETTINGS, help=f"{','.join(SETTINGS)}"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per child (1800)")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "SETTING"), help="run one measurement")
    return p.parse_args(argv)


def workload_flags(w: Workload) -> list[str]:
    """The command-line flags that reproduce ``w`` (inverse of :func:`parse_args`)."""
    pairs = ((f"--{k.replace('_', '-')}", str(v)) for k, v in dataclasses.asdict(w).items())
    return [token for pair in pairs for token in pair]


def plan_jobs(
    impls: Sequence[str],
    settings: Sequence[str],
    models: Sequence[str],
    adapters: Sequence[int] = (),
) -> list[Job]:
    """The jobs: each impl in the settings and models it supports, and a mixed-adapter impl
    once per K of ``adapters``."""
    return [
        Job(i, s, m, k)
        for i in impls
        for s in settings
        for m in models
        if s in IMPLS[i].settings and m in IMPLS[i].models
        for k in (adapters if IMPLS[i].single else (None,))
    ]


def missing_packages(impl: str) -> list[str]:
    """The optional packages ``impl`` needs that are not installed."""
    return [m for m in IMPLS[impl].requires if importlib.util.find_spec(m) is None]


def run_child(impl: str, setting: str, w: Workload) -> dict[str, Any]:
    """Measures one (impl, setting) in this process; the child side of :func:`spawn_child`."""
    if w.model not in IMPLS[impl].models:
        raise ValueError(f"{impl} runs on --model {','.join(IMPLS[impl].models)}, not {w.model}")
    runner = importlib.import_module(IMPLS[impl].module).RUNNERS[impl]
    result = dataclasses.asdict(runner(setting, w))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["threads"] = cpu_count()
    return result


def error_message(exc: BaseException) -> str:
    """``"Type: message"`` on one line, at most ``ERROR_CHARS`` characters."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:ERROR_CHARS]


def last_json(text: str) -> dict[str, Any] | None:
    """The JSON object on the last line of ``text``, or ``None``."""
    lines = text.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def spawn_child(impl: str, setting: str, w: Workload, timeout: float) -> dict[str, Any]:
    """Runs :func:`run_child` in a fresh interpreter (``--child``).

    Returns:
        The child's JSON line: its result, or ``{"error": "Type: message"}`` if it raised. If
        it crashed or timed out, ``{"error": ...}`` with the exit code and last stderr line.
    """
    cmd = [sys.executable, "-m", "experiments.benchmark", "--child", impl, setting]
    try:
        proc = subprocess.run(
            cmd + workload_flags(w), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    result = last_json(proc.stdout)
    if result is not None:
        return result
    stderr = proc.stderr.strip().splitlines() or ["(no output)"]
    return {"error": f"exit code {proc.returncode}: {stderr[-1][:ERROR_CHARS]}"}


def run_interleaved(
    jobs: Sequence[Job], w: Workload, reps: int, timeout: float
) -> dict[Job, list[dict[str, Any]]]:
    """Runs every job once per repetition, repetition after repetition; every other
    repetition runs the jobs in reverse order (a load rising through a repetition would
    otherwise always hit the last jobs)."""
    results: dict[Job, list[dict[str, Any]]] = {job: [] for job in jobs}
    for rep in range(reps):
        for job in jobs if rep % 2 == 0 else jobs[::-1]:
            child_w = dataclasses.replace(w, model=job.model, adapters=str(job.adapters or 1))
            result = spawn_child(job.impl, job.setting, child_w, timeout)
            results[job].append(result)
            status = result.get("error") or f"median {statistics.median(result['times_s']):.4f} s"
            k = f" K={job.adapters}" if job.adapters else ""
            print(
                f"[rep {rep + 1}/{reps}] {job.impl} {job.setting} {job.model}{k}: {status}",
                file=sys.stderr,
            )
    return results


def aggregate(job: Job, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row from the repetitions of one job; measured fields are ``None`` if all failed.

    Ratios are added by :func:`add_ratios`.
    """
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    times = [t for r in ok for t in r["times_s"]]
    switches = [t for r in ok for t in r.get("switch_times_s") or ()]
    compilations = [r["compilations"] for r in ok if r.get("compilations") is not None]
    first = ok[0] if ok else {}
    return {
        "impl": job.impl,
        "setting": job.setting,
        "kind": IMPLS[job.impl].kind,
        "model": job.model,
        "adapters": job.adapters,
        "step_time_median_s": statistics.median(times) if times else None,
        "step_time_min_s": min(times, default=None),
        "rep_medians_s": [statistics.median(r["times_s"]) for r in ok],
        "peak_rss_mb": max((r["peak_rss_mb"] for r in ok), default=None),
        **{key: first.get(key) for key in MEASURED_ONCE},
        "switch_ms": statistics.median(switches) * 1e3 if switches else None,
        "compilations": max(compilations, default=None),
        "reps_ok": len(ok),
        "error": errors[0] if errors else None,
    }


RATIOS = (
    "ratio_to_full",
    "ratio_to_fastest_peer",
    "ratio_to_floor",
    "ratio_to_single",
    "ratio_to_mixed_peer",
)


def ratio(median: float, others: Sequence[float]) -> float | None:
    """``median / min(others)``, or ``None`` without others."""
    return median / min(others) if others else None


def row_ratios(row: dict[str, Any], ok: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """The `RATIOS` of ``row`` among the measured rows ``ok``."""
    median = row["step_time_median_s"]
    if median is None:
        return dict.fromkeys(RATIOS)
    same_kind = [r for r in ok if r["kind"] == row["kind"] and r["model"] == row["model"]]

    def medians_of(impl: str | None) -> list[float]:
        return [r["step_time_median_s"] for r in same_kind if r["impl"] == impl]

    peers = [
        r["step_time_median_s"]
        for r in same_kind
        if r["setting"] == row["setting"]
        and r["impl"] != row["impl"]
        and IMPLS[r["impl"]].base == IMPLS[row["impl"]].base
        and not IMPLS[r["impl"]].single
        and not IMPLS[row["impl"]].single
    ]
    single = [
        r["step_time_median_s"]
        for r in same_kind
        if r["impl"] == IMPLS[row["impl"]].single and r["setting"] == row["setting"]
    ]
    mixed_peer = [
        r["step_time_median_s"]
        for r in same_kind
        if r["impl"] == IMPLS[row["impl"]].mixed_peer
        and r["setting"] == row["setting"]
        and r["adapters"] == row["adapters"]
    ]
    floor = FLOORS[IMPLS[row["impl"]].framework] if row["kind"] == "train" else None
    return {
        "ratio_to_full": ratio(median, medians_of(BASELINES[row["kind"]])),
        "ratio_to_fastest_peer": ratio(median, peers),
        "ratio_to_floor": ratio(median, medians_of(floor)),
        "ratio_to_single": ratio(median, single),
        "ratio_to_mixed_peer": ratio(median, mixed_peer),
    }


def add_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds :func:`row_ratios` to every row (see the module docstring for their meaning)."""
    ok = [r for r in rows if r["step_time_median_s"] is not None]
    return [row | row_ratios(row, ok) for row in rows]


def fmt(value: Any, spec: str) -> str:
    """``format(value, spec)``, or ``-`` for ``None``."""
    return "-" if value is None else format(value, spec)


def markdown_table(rows: Sequence[dict[str, Any]], baseline: str, floors: bool) -> list[str]:
    """Markdown lines of a result table; times in milliseconds; an "x floor" column if asked,
    "switch ms" and "compilations" columns if a row switched adapters."""
    ratios = ["ratio_to_full", "ratio_to_fastest_peer"] + (["ratio_to_floor"] if floors else [])
    ratio_titles = [f"x {baseline}", "x fastest peer"] + (["x floor"] if floors else [])
    switched = any(r.get("switch_ms") is not None for r in rows)
    titles = ["impl", "setting", "median ms", "min ms", *ratio_titles, "GFLOP", "peak RSS MB"]
    titles += ["base MB"]
    titles += ["trainable", "total", "opt-state floats"]
    titles += ["switch ms", "compilations"] if switched else []
    lines = ["| " + " | ".join(titles) + " |", "|---|---|" + "--:|" * (len(titles) - 2)]
    for r in rows:
        if r["step_time_median_s"] is None:
            lines.append(f"| {r['impl']} | {r['setting']} | ERROR: {r['error']} |")
            continue
        cells = [
            r["impl"] + (f" K={r['adapters']}" if r.get("adapters") else ""),
            r["setting"],
            fmt(r["step_time_median_s"] * 1e3, ".1f"),
            fmt(r["step_time_min_s"] * 1e3, ".1f"),
            *(fmt(r[key], ".2f") for key in ratios),
            fmt(r["gflops"], ".3g"),
            fmt(r["peak_rss_mb"], ".0f"),
            fmt(None if r["base_param_bytes"] is None else r["base_param_bytes"] / 2**20, ".1f"),
            fmt(r["trainable_params"], ","),
            fmt(r["total_params"], ","),
            fmt(r["opt_state_floats"], ","),
        ]
        if switched:
            cells += [fmt(r.get("switch_ms"), ".1f"), fmt(r.get("compilations"), "d")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def merged_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per setting: merged forward time over base forward time, against the target."""
    lines = []
    for r in rows:
        if r["impl"] == "fwd-merged" and r["ratio_to_full"] is not None:
            verdict = "ok" if abs(r["ratio_to_full"] - 1) <= MERGED_TOLERANCE else "MISSED"
            model = "" if r["model"] == "gpt2" else f", {r['model']}"
            lines.append(
                f"fwd-merged / fwd-base ({r['setting']}{model}): {r['ratio_to_full']:.3f} "
                f"(target: within {MERGED_TOLERANCE:.0%}: {verdict})"
            )
    return lines


def _verdict(value: float, target: float | None) -> str:
    if target is None:
        return ""
    return f" (target: at most {target}: {'ok' if value <= target else 'MISSED'})"


def mixed_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per mixed-adapter row: its time over the single-adapter row's, and over
    the mixed peer's at the same K, against the targets the issue sets jaxlora (forward at
    K=16: ≤ 1.3x single, ≤ 1.0x PEFT's; training step at K=4: ≤ 1.3x single)."""
    lines = []
    for r in rows:
        if not r.get("adapters"):
            continue
        impl, k = IMPLS[r["impl"]], r["adapters"]
        if r["ratio_to_single"] is not None:
            target = MIXED_TARGETS.get((r["kind"], k)) if impl.framework == "jax" else None
            verdict = _verdict(r["ratio_to_single"], target)
            lines.append(
                f"{r['impl']} {r['setting']} K={k} / {impl.single}: "
                f"{r['ratio_to_single']:.3f}{verdict}"
            )
        if r["ratio_to_mixed_peer"] is not None:
            verdict = _verdict(r["ratio_to_mixed_peer"], MIXED_PEER_TARGETS.get((r["kind"], k)))
            lines.append(
                f"{r['impl']} {r['setting']} K={k} / {impl.mixed_peer} K={k}: "
                f"{r['ratio_to_mixed_peer']:.3f}{verdict}"
            )
    return lines


def switch_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per row that switched adapters: how, the median switch, the compilations."""
    lines = []
    for r in rows:
        if r.get("switch_ms") is None:
            continue
        k = f" K={r['adapters']}" if r.get("adapters") else ""
        compiled = ""
        if r["compilations"] is not None:
            compiled = f", {r['compilations']} compilation(s) from the first call on"
        lines.append(
            f"switch {r['impl']} {r['setting']}{k} ({IMPLS[r['impl']].switch} + first "
            f"forward): {r['switch_ms']:.1f} ms{compiled}"
        )
    return lines


def find_row(
    rows: Sequence[dict[str, Any]], impl: str, setting: str, model: str
) -> dict[str, Any] | None:
    """The measured row of (impl, setting, model), or ``None``."""
    for r in rows:
        if (r["impl"], r["setting"], r["model"]) == (impl, setting, model):
            return r if r["step_time_median_s"] is not None else None
    return None


def model_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per LoRA setting: jaxlora on ``gpt2-einsum`` over ``gpt2``, and on ``gpt2-moe`` over
    ``jax-full``, against their targets (when the run has the rows)."""
    lines = []
    for setting in TARGETS:
        dense = find_row(rows, "jaxlora", setting, "gpt2")
        einsum = find_row(rows, "jaxlora", setting, "gpt2-einsum")
        if dense and einsum:
            r = einsum["step_time_median_s"] / dense["step_time_median_s"]
            verdict = "ok" if abs(r - 1) <= EINSUM_TOLERANCE else "MISSED"
            gflops = f"{fmt(einsum['gflops'], '.4g')} vs {fmt(dense['gflops'], '.4g')}"
            lines.append(
                f"jaxlora {setting}: gpt2-einsum / gpt2: {r:.3f}, GFLOP {gflops} "
                f"(target: within {EINSUM_TOLERANCE:.0%}: {verdict})"
            )
        moe = find_row(rows, "jaxlora", setting, "gpt2-moe")
        if moe and moe["ratio_to_full"] is not None:
            verdict = "ok" if moe["ratio_to_full"] <= MOE_TARGET else "MISSED"
            lines.append(
                f"gpt2-moe: jaxlora {setting} / jax-full: {moe['ratio_to_full']:.3f} "
                f"(target: at most {MOE_TARGET:.2f}: {verdict})"
            )
    return lines


def report(rows: Sequence[dict[str, Any]], w: Workload, notes: Sequence[str]) -> str:
    """The markdown report: workload, notes, training and inference tables (per model)."""
    dims = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(w).items())
    lines = [f"Workload: {dims}", *notes, ""]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        for kind, title in (("train", "Training step"), ("infer", "Inference (jitted forward)")):
            table = [r for r in rows if r["kind"] == kind and r["model"] == model]
            if table:
                table_lines = markdown_table(table, BASELINES[kind], floors=kind == "train")
                title += f", {model}" if len(models) > 1 else ""
                lines += [f"## {title}", "", *table_lines, ""]
    targets = merged_lines(rows) + model_lines(rows) + mixed_lines(rows) + switch_lines(rows)
    return "\n".join(lines + targets)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: a child measurement with ``--child``, otherwise the whole benchmark."""
    args = parse_args(argv)
    w = workload_of(args)
    if args.child:
        try:
            result = run_child(*args.child, w)
        except Exception as exc:  # any failure becomes an error row; traceback on stderr
            traceback.print_exc()
            result = {"error": error_message(exc)}
        print(json.dumps(result))
        return
    runnable = [i for i in args.impls if not missing_packages(i)]
    notes = [
        f"Skipped {i}: {', '.join(missing_packages(i))} not importable."
        for i in args.impls
        if i not in runnable
    ]
    notes.append(
        f"Threads: XLA uses the {cpu_count()} CPUs of this process; "
        f"torch.set_num_threads({cpu_count()})."
    )
    models = w.model.split(",")
    notes += [
        f"Skipped {i} on {', '.join(m for m in models if m not in IMPLS[i].models)}: "
        f"it runs on {', '.join(IMPLS[i].models)} only."
        for i in runnable
        if not set(models) <= set(IMPLS[i].models)
    ]
    jobs = plan_jobs(runnable, args.settings, models, [int(k) for k in w.adapters.split(",")])
    results = run_interleaved(jobs, w, args.reps, args.timeout)
    rows = add_ratios([aggregate(job, results[job]) for job in jobs])
    if args.json:
        print("\n".join(notes), file=sys.stderr)
        print("\n".join(json.dumps(r) for r in rows))
    else:
        print(report(rows, w, notes))


if __name__ == "__main__":
    main()
