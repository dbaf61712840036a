"""Smoke tests: `experiments/benchmark.py` end to end on a tiny workload, in a subprocess."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import benchmark

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ["--vocab", "64", "--d-model", "32", "--layers", "1", "--heads", "2", "--mlp", "64"]
TINY += ["--seq", "8", "--batch", "2", "--steps", "2", "--warmup", "1", "--reps", "1"]
MODELS = ("gpt2", "gpt2-einsum", "gpt2-moe")
ROW_KEYS = {
    "impl",
    "setting",
    "model",
    "step_time_median_s",
    "step_time_min_s",
    "peak_rss_mb",
    "trainable_params",
    "total_params",
    "opt_state_floats",
    "ratio_to_full",
    "ratio_to_fastest_peer",
    "ratio_to_floor",
    "gflops",
    "base_param_bytes",
    "adapters",
    "ratio_to_single",
    "ratio_to_mixed_peer",
    "switch_ms",
    "compilations",
}


def benchmark_rows(*flags: str, timeout: float = 120) -> list[dict]:
    """Runs the benchmark with ``--json`` and returns its rows."""
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--json", *TINY, *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all(row.keys() >= ROW_KEYS for row in rows)
    return rows


def run_benchmark(*flags: str) -> dict[tuple[str, str], dict]:
    """:func:`benchmark_rows` of one model, keyed by (impl, setting)."""
    return {(r["impl"], r["setting"]): r for r in benchmark_rows(*flags)}


def check_timed(row: dict) -> None:
    """A successful row: positive times and memory."""
    assert row["error"] is None, row["error"]
    assert 0 < row["step_time_min_s"] <= row["step_time_median_s"]
    assert row["peak_rss_mb"] > 0


def check_adamw(row: dict, counters: int) -> None:
    """AdamW keeps two moments per trainable parameter plus ``counters`` 0-d step counts."""
    assert row["opt_state_scalars"] == counters
    assert row["opt_state_floats"] == 2 * row["trainable_params"] + counters


def test_training_rows():
    impls = "jax-full,jax-floor,nnx-lora,torch-peft,torch-floor"
    rows = run_benchmark("--impls", impls, "--settings", "qv,full,frozen")
    assert set(rows) == {
        ("jax-full", "full"),
        ("jax-floor", "frozen"),
        ("nnx-lora", "qv"),
        ("torch-peft", "qv"),
        ("torch-floor", "frozen"),
    }
    for row in rows.values():
        check_timed(row)
    full, floor, nnx_lora = (
        rows["jax-full", "full"],
        rows["jax-floor", "frozen"],
        rows["nnx-lora", "qv"],
    )
    assert full["trainable_params"] == full["total_params"]
    assert full["gflops"] > nnx_lora["gflops"] > 0  # LoRA skips the frozen weight gradients
    assert full["gflops"] > floor["gflops"] > 0
    check_adamw(full, counters=1)  # optax's count
    check_adamw(floor, counters=1)
    check_adamw(nnx_lora, counters=2)  # optax's count + nnx.Optimizer.step
    assert floor["trainable_params"] == 8 * 32  # the position table: seq x d_model
    assert floor["total_params"] == full["total_params"]
    assert nnx_lora["trainable_params"] == 2 * (32 * 8 + 8 * 32)  # A and B of query and value
    assert nnx_lora["trainable_params"] < nnx_lora["total_params"]
    assert nnx_lora["ratio_to_floor"] > 0  # which rows ratios divide by: test_ratios_...
    peft_row, torch_floor = rows["torch-peft", "qv"], rows["torch-floor", "frozen"]
    check_adamw(peft_row, counters=4)  # one step per tensor: A and B of query and value
    check_adamw(torch_floor, counters=1)
    assert torch_floor["trainable_params"] == floor["trainable_params"]
    assert peft_row["trainable_params"] == nnx_lora["trainable_params"]
    assert peft_row["total_params"] == nnx_lora["total_params"]
    assert peft_row["gflops"] is None
    assert nnx_lora["ratio_to_fastest_peer"] > 0 and peft_row["ratio_to_floor"] > 0


def test_jaxlora_rows_without_attention():
    """jaxlora's rows, on the diagnostic model whose blocks skip the softmax attention."""
    impls = "jaxlora,jaxlora-nnx,fwd-base,fwd-merged,torch-peft"
    rows = run_benchmark("--impls", impls, "--settings", "qv,full", "--attention", "none")
    for row in rows.values():
        check_timed(row)
    lora, lora_nnx = rows["jaxlora", "qv"], rows["jaxlora-nnx", "qv"]
    check_adamw(lora, counters=1)  # frozen leaves hold no state: optax.set_to_zero
    check_adamw(lora_nnx, counters=2)  # optax's count + nnx.Optimizer.step
    assert lora["trainable_params"] == 2 * (32 * 8 + 8 * 32)
    assert lora["trainable_params"] < lora["total_params"]
    assert (lora_nnx["trainable_params"], lora_nnx["total_params"]) == (
        lora["trainable_params"],
        lora["total_params"],
    )
    assert lora_nnx["gflops"] == pytest.approx(lora["gflops"], rel=0.05)
    # query goes unused, so AdamW holds moments for value's A and B only
    peft_row = rows["torch-peft", "qv"]
    assert peft_row["trainable_params"] == lora["trainable_params"]
    assert peft_row["opt_state_floats"] == lora["trainable_params"] + 2
    merged, base = rows["fwd-merged", "qv"], rows["fwd-base", "full"]
    assert merged["total_params"] == base["total_params"]  # merge leaves plain params
    assert merged["gflops"] == pytest.approx(base["gflops"])


def test_qlora_and_qwix_rows():
    """jaxlora's QLoRA, and Qwix's LoRA and NF4 QLoRA on the NNX GPT-2 (inputs of 64: one
    NF4 block)."""
    flags = ["--d-model", "64", "--mlp", "128", "--settings", "qv,all"]
    rows = run_benchmark("--impls", "jaxlora,jaxlora-qlora,qwix-lora,qwix-qlora", *flags)
    assert len(rows) == 8
    for row in rows.values():
        check_timed(row)
        assert row["error"] is None
    for setting, layers in (("qv", ["q", "v"]), ("all", ["q", "k", "v", "o", "up", "down"])):
        lora, qwix, qlora = (rows[i, setting] for i in ("jaxlora", "qwix-lora", "qwix-qlora"))
        fan = {"up": (64, 128), "down": (128, 64)}
        expected = sum(8 * sum(fan.get(name, (64, 64))) for name in layers)
        assert lora["trainable_params"] == qwix["trainable_params"] == expected
        check_adamw(qwix, counters=2)  # optax's count + nnx.Optimizer.step
        check_adamw(qlora, counters=2)
        # the same model stored in float32; NF4 stores the targeted kernels as 4-bit codes
        # plus one float32 scale per 64 inputs: 4.5 bits per weight instead of 32
        assert qwix["base_param_bytes"] == lora["base_param_bytes"]
        kernels = sum(math.prod(fan.get(name, (64, 64))) for name in layers)
        saved = kernels * 4 - kernels * 4.5 / 8
        assert qlora["base_param_bytes"] == qwix["base_param_bytes"] - saved
        # jaxlora's NF4 on the same kernels: 4-bit codes and 8-bit block scales (double
        # quantization), more than the codes alone and less than Qwix's float32 scales
        ours = rows["jaxlora-qlora", setting]
        check_adamw(ours, counters=1)
        assert ours["trainable_params"] == expected
        codes_only = qwix["base_param_bytes"] - kernels * 4 + kernels // 2
        assert codes_only < ours["base_param_bytes"] < qlora["base_param_bytes"]
        assert ours["ratio_to_fastest_peer"] > 0  # qwix-qlora, the other NF4 row


def test_mixed_adapter_rows():
    """K adapters on one base, each example using its own: forward and training rows, PEFT's
    mixed-batch forward beside them, and switching adapters."""
    impls = "fwd-lora,jaxlora-mixed,jaxlora,jaxlora-mixed-train,torch-peft-fwd,torch-peft-mixed"
    rows = benchmark_rows("--impls", impls, "--settings", "qv", "--adapters", "1,3", timeout=300)
    by_job = {(r["impl"], r["adapters"]): r for r in rows}
    mixed = ("jaxlora-mixed", "jaxlora-mixed-train", "torch-peft-mixed")
    assert set(by_job) == {
        ("fwd-lora", None),
        ("jaxlora", None),
        ("torch-peft-fwd", None),
        *((i, k) for i in mixed for k in (1, 3)),
    }
    # switching: the JAX rows compile their forward once, however many switches follow
    for impl, k in [("fwd-lora", None), ("jaxlora-mixed", 1), ("jaxlora-mixed", 3)]:
        assert by_job[impl, k]["switch_ms"] > 0 and by_job[impl, k]["compilations"] == 1
    peft_single = by_job["torch-peft-fwd", None]
    check_timed(peft_single)
    assert peft_single["ratio_to_fastest_peer"] > 0  # fwd-lora, and fwd-lora's is PEFT's
    assert by_job["fwd-lora", None]["ratio_to_fastest_peer"] > 0
    for k in (1, 3):
        ours, peft_mixed = by_job["jaxlora-mixed", k], by_job["torch-peft-mixed", k]
        check_timed(peft_mixed)
        assert peft_mixed["switch_ms"] > 0 and peft_mixed["compilations"] is None
        assert peft_mixed["ratio_to_single"] > 0 and peft_mixed["ratio_to_mixed_peer"] is None
        assert ours["ratio_to_mixed_peer"] > 0
        assert peft_mixed["total_params"] == ours["total_params"]  # the same K adapters
    single_infer, single_train = by_job["fwd-lora", None], by_job["jaxlora", None]
    per_adapter = single_train["trainable_params"]  # A and B of query and value
    for k in (1, 3):
        infer, train = by_job["jaxlora-mixed", k], by_job["jaxlora-mixed-train", k]
        for row in (infer, train):
            check_timed(row)
            assert row["ratio_to_fastest_peer"] is None  # mixed rows are no one's peer
        assert infer["kind"] == "infer" and train["kind"] == "train"
        assert infer["ratio_to_single"] > 0 and train["ratio_to_single"] > 0
        # the base once, each adapter's own factors on top; every adapter trains
        assert train["trainable_params"] == k * per_adapter
        assert train["total_params"] == single_train["total_params"] + (k - 1) * per_adapter
        assert train["base_param_bytes"] == single_train["base_param_bytes"]
        check_adamw(train, counters=1)
    assert single_infer["ratio_to_single"] is None and single_infer["adapters"] is None


def test_failed_child_is_an_error_row():
    rows = run_benchmark("--impls", "jax-full", "--settings", "full", "--timeout", "0.01")
    row = rows["jax-full", "full"]
    assert row["error"] == "timed out after 0.01 s"
    assert row["reps_ok"] == 0
    assert row["ratio_to_full"] is None


def test_custom_einsum_and_moe_models():
    """One interleaved run over the three models: a row per model, ratios within a model."""
    flags = ["--impls", "jaxlora,nnx-lora", "--settings", "all", "--model", ",".join(MODELS)]
    rows = {r["model"]: r for r in benchmark_rows(*flags, timeout=240) if r["impl"] == "jaxlora"}
    assert set(rows) == set(MODELS)  # nnx-lora runs on gpt2 only
    for row in rows.values():
        check_timed(row)
        check_adamw(row, counters=1)
    dense, einsum, moe = (rows[m] for m in MODELS)
    assert dense["ratio_to_fastest_peer"] is not None  # nnx-lora on gpt2
    # the same model written with einsum modules: same adapters, same FLOPs
    assert einsum["trainable_params"] == dense["trainable_params"]
    assert einsum["total_params"] == dense["total_params"]
    assert einsum["gflops"] == pytest.approx(dense["gflops"], rel=1e-3)
    # MoE (4 experts of width 64 // 2): attention as above, experts A (4, in, 8) B (4, 8, out),
    # router A (32, 4) B (4, 4) at rank min(8, experts)
    experts = 2 * (4 * 32 * 8 + 4 * 8 * 32)
    assert moe["trainable_params"] == 4 * (32 * 8 + 8 * 32) + experts + 32 * 4 + 4 * 4
    assert moe["ratio_to_fastest_peer"] is None  # no other LoRA implementation on gpt2-moe


def row(impl, setting, model, median, gflops=1.0, adapters=None, switch_ms=None, compiled=None):
    """A measured row as the harness aggregates it, with the given median (seconds)."""
    return {
        "switch_ms": switch_ms,
        "compilations": compiled,
        **dict.fromkeys(benchmark.MEASURED_ONCE),
        "impl": impl,
        "setting": setting,
        "model": model,
        "adapters": adapters,
        "kind": benchmark.IMPLS[impl].kind,
        "step_time_median_s": median,
        "step_time_min_s": median,
        "peak_rss_mb": 1.0,
        "gflops": gflops,
        "error": None,
    }


def test_ratios_divide_by_the_right_rows():
    """Each ratio's denominator, on hand-made medians: the baseline of the row's kind, the
    fastest other implementation storing the base alike (mixed rows excluded), the floor of
    the row's framework, the single-adapter row; nothing across models."""
    rows = benchmark.add_ratios(
        [
            row("jax-full", "full", "gpt2", 2.0),
            row("jax-floor", "frozen", "gpt2", 1.0),
            row("jaxlora", "qv", "gpt2", 1.2),
            row("nnx-lora", "qv", "gpt2", 1.5),
            row("torch-floor", "frozen", "gpt2", 0.8),
            row("torch-peft", "qv", "gpt2", 1.0),
            row("jaxlora-qlora", "qv", "gpt2", 1.8),
            row("qwix-qlora", "qv", "gpt2", 2.4),
            row("fwd-base", "full", "gpt2", 0.5),
            row("fwd-lora", "qv", "gpt2", 0.6),
            row("jaxlora-mixed", "qv", "gpt2", 0.75, adapters=16),
            row("jaxlora-mixed-train", "qv", "gpt2", 1.56, adapters=4),
            row("jaxlora", "qv", "gpt2-einsum", 3.0),
        ]
    )
    keys = ("ratio_to_full", "ratio_to_fastest_peer", "ratio_to_floor", "ratio_to_single")
    ratios = {
        (r["impl"], r["model"]): tuple(None if r[k] is None else round(r[k], 4) for k in keys)
        for r in rows
    }
    assert ratios == {
        ("jax-full", "gpt2"): (1.0, None, 2.0, None),
        ("jax-floor", "gpt2"): (0.5, 1.25, 1.0, None),  # the floors are each other's peers
        ("jaxlora", "gpt2"): (0.6, 1.2, 1.2, None),  # peers: nnx-lora 1.5, torch-peft 1.0
        ("nnx-lora", "gpt2"): (0.75, 1.5, 1.5, None),
        ("torch-floor", "gpt2"): (0.4, 0.8, 1.0, None),
        ("torch-peft", "gpt2"): (0.5, 0.8333, 1.25, None),  # torch's own floor
        ("jaxlora-qlora", "gpt2"): (0.9, 0.75, 1.8, None),  # its peer: qwix-qlora only
        ("qwix-qlora", "gpt2"): (1.2, 1.3333, 2.4, None),
        ("fwd-base", "gpt2"): (1.0, None, None, None),
        ("fwd-lora", "gpt2"): (1.2, None, None, None),  # mixed rows are no one's peer
        ("jaxlora-mixed", "gpt2"): (1.5, None, None, 1.25),
        ("jaxlora-mixed-train", "gpt2"): (0.78, None, 1.56, 1.3),
        ("jaxlora", "gpt2-einsum"): (None, None, None, None),  # no row of its model
    }
    assert benchmark.mixed_lines(rows) == [
        "jaxlora-mixed qv K=16 / fwd-lora: 1.250 (target: at most 1.3: ok)",
        "jaxlora-mixed-train qv K=4 / jaxlora: 1.300 (target: at most 1.3: ok)",
    ]


def test_report_checks_the_model_targets():
    rows = benchmark.add_ratios(
        [
            row("jaxlora", "all", "gpt2", 1.0, 101.0),
            row("jaxlora", "all", "gpt2-einsum", 1.04, 101.0),
            row("jaxlora", "qv", "gpt2", 1.0),
            row("jaxlora", "qv", "gpt2-einsum", 0.9),
            row("jax-full", "full", "gpt2-moe", 2.0),
            row("jaxlora", "all", "gpt2-moe", 1.2),
        ]
    )
    lines = benchmark.model_lines(rows)
    assert (
        "jaxlora all: gpt2-einsum / gpt2: 1.040, GFLOP 101 vs 101 (target: within 5%: ok)" in lines
    )
    assert (
        "jaxlora qv: gpt2-einsum / gpt2: 0.900, GFLOP 1 vs 1 (target: within 5%: MISSED)" in lines
    )
    assert "gpt2-moe: jaxlora all / jax-full: 0.600 (target: at most 0.75: ok)" in lines
    text = benchmark.report(rows, benchmark.Workload(model="gpt2,gpt2-einsum,gpt2-moe"), [])
    assert "## Training step, gpt2-einsum" in text and "## Training step, gpt2-moe" in text
    assert "model=gpt2,gpt2-einsum,gpt2-moe" in text


def test_mixed_rows_against_peft_and_switch_lines():
    """jaxlora's mixed forward over PEFT's at the same K only (target at K=16), PEFT's mixed
    forward over its single-adapter forward, and the switching lines and columns."""
    rows = benchmark.add_ratios(
        [
            row("fwd-lora", "all", "gpt2", 0.5, switch_ms=0.6, compiled=1),
            row("torch-peft-fwd", "all", "gpt2", 0.4),
            row("jaxlora-mixed", "all", "gpt2", 0.6, adapters=4, switch_ms=0.7, compiled=1),
            row("jaxlora-mixed", "all", "gpt2", 0.9, adapters=16, switch_ms=0.8, compiled=1),
            row("torch-peft-mixed", "all", "gpt2", 0.5, adapters=4, switch_ms=0.45),
            row("torch-peft-mixed", "all", "gpt2", 0.8, adapters=16, switch_ms=0.5),
        ]
    )
    by_job = {(r["impl"], r["adapters"]): r for r in rows}
    assert by_job["jaxlora-mixed", 4]["ratio_to_mixed_peer"] == pytest.approx(0.6 / 0.5)
    assert by_job["jaxlora-mixed", 16]["ratio_to_mixed_peer"] == pytest.approx(0.9 / 0.8)
    assert by_job["torch-peft-mixed", 16]["ratio_to_single"] == pytest.approx(0.8 / 0.4)
    assert by_job["torch-peft-mixed", 16]["ratio_to_mixed_peer"] is None
    assert by_job["fwd-lora", None]["ratio_to_fastest_peer"] == pytest.approx(0.5 / 0.4)
    assert benchmark.mixed_lines(rows) == [
        "jaxlora-mixed all K=4 / fwd-lora: 1.200",
        "jaxlora-mixed all K=4 / torch-peft-mixed K=4: 1.200",
        "jaxlora-mixed all K=16 / fwd-lora: 1.800 (target: at most 1.3: MISSED)",
        "jaxlora-mixed all K=16 / torch-peft-mixed K=16: 1.125 (target: at most 1.0: MISSED)",
        "torch-peft-mixed all K=4 / torch-peft-fwd: 1.250",
        "torch-peft-mixed all K=16 / torch-peft-fwd: 2.000",
    ]
    lines = benchmark.switch_lines(rows)
    assert len(lines) == 5
    assert lines[0] == (
        "switch fwd-lora all (bank.select + first forward): 0.6 ms, "
        "1 compilation(s) from the first call on"
    )
    assert lines[-1] == "switch torch-peft-mixed all K=16 (set_adapter + first forward): 0.5 ms"
    table = benchmark.markdown_table(rows, "fwd-base", floors=False)
    assert table[0].endswith("| switch ms | compilations |")
    assert table[2].endswith("| 0.6 | 1 |") and table[3].endswith("| - | - |")


def test_aggregate_pools_switch_times_and_keeps_the_most_compilations():
    job = benchmark.Job("jaxlora-mixed", "all", "gpt2", 4)
    results = [
        {"times_s": [1.0], "peak_rss_mb": 1.0, "switch_times_s": [0.1, 0.3], "compilations": 1},
        {"times_s": [1.0], "peak_rss_mb": 1.0, "switch_times_s": [0.2], "compilations": 2},
        {"error": "boom"},
    ]
    agg = benchmark.aggregate(job, results)
    assert agg["switch_ms"] == pytest.approx(200.0) and agg["compilations"] == 2
    agg = benchmark.aggregate(benchmark.Job("fwd-base", "full", "gpt2", None), results[:1] * 0)
    assert agg["switch_ms"] is None and agg["compilations"] is None
