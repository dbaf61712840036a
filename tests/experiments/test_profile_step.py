"""`experiments/profile_step.py`: op attribution, and the CLI on a tiny workload."""

import subprocess
import sys
from pathlib import Path

import pytest

from experiments.profile_step import category

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ["--vocab", "64", "--d-model", "32", "--layers", "2", "--heads", "2", "--mlp", "64"]
TINY += ["--seq", "8", "--batch", "2", "--steps", "2", "--warmup", "1"]


@pytest.mark.parametrize(
    ("op_name", "expected"),
    [
        ("jit(step)/jvp(GPT2)/block_1/attn/value/dot_general", ("value", "forward")),
        ("jit(step)/transpose(jvp(GPT2))/block_0/mlp/down/dot_general", ("down", "backward")),
        ("jit(step)/transpose(jvp(GPT2))/block_0/attn/dot_general", ("attention", "backward")),
        ("jit(step)/jvp(GPT2)/block_0/mlp/tanh", ("gelu", "forward")),
        ("jit(step)/jvp(GPT2)/block_0/ln2/reduce_sum", ("layernorm", "forward")),
        ("jit(step)/transpose(jvp(GPT2))/lm_head/dot_general", ("lm_head", "backward")),
        ("jit(step)/jvp(GPT2)/wte/take", ("embed", "forward")),
        ("jit(step)/adam/sqrt", ("loss+update", "other")),
    ],
)
def test_category(op_name, expected):
    assert category(op_name) == expected


def profile(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.profile_step", *args, *TINY],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_jax_profile_attributes_time_to_layers():
    lines = profile("jaxlora", "all").splitlines()
    assert lines[0].startswith("jaxlora all: ") and "ms per step" in lines[0]
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert {"query", "down", "attention", "lm_head", "**all ops**"} <= set(rows)
    totals = [float(c) for c in rows["**all ops**"].split("|")[2:6]]
    assert totals[3] == pytest.approx(sum(totals[:3]), abs=0.15) and totals[3] > 0


def test_torch_profile_lists_operators():  # .ci/install always installs torch
    assert "aten::" in profile("torch-floor", "frozen")
