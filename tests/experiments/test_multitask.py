"""`experiments/multitask.py` end to end on tiny budgets: two adapters, one mixed stream."""

import json
import subprocess

import jax
import numpy as np

import jaxlora
from experiments import multitask, tasks
from experiments.models.bert import init_classification_params
from experiments.models.loading import load_hf_model, minilm_path
from tests.support.scripts import REPO_ROOT, run_experiment

SCRIPT = REPO_ROOT / "experiments" / "multitask.py"


def run_script(*flags: str) -> subprocess.CompletedProcess:
    """Runs the script as the README does (``python experiments/multitask.py ...``)."""
    return run_experiment(SCRIPT, *flags, timeout=600)


def check_per_task(results: dict, metric: str, names: list[str]) -> None:
    """The fields the issue's acceptance reads, and mixed / alone / merged agreeing."""
    assert list(results["settings"]["tasks"]) == names
    assert set(results["adapter_param_bytes"]) == set(names)
    for name in names:
        got = results[name]
        assert got["max_abs_logit_diff"] <= multitask.MAX_LOGIT_DIFF
        assert got[f"{metric}_mixed"] == got[f"{metric}_alone"]
        np.testing.assert_allclose(got[f"{metric}_merged"], got[f"{metric}_alone"], rtol=1e-4)
        assert 0 < results["adapter_param_bytes"][name] < results["base_param_bytes"]
    assert set(results["throughput"]) == {
        "mixed_ex_per_s",
        "switch_by_id_ex_per_s",
        "reload_merge_ex_per_s",
    }
    assert all(v > 0 for v in results["throughput"].values())


def test_minilm_two_classification_adapters_from_one_mixed_stream(tmp_path):
    budget = ["--steps", "2", "--batch-size", "4", "--seq-len", "16", "--eval-every", "2"]
    proc = run_script(*budget, "--max-eval-examples", "8", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    check_per_task(results, "accuracy", ["sentiment", "subjectivity"])
    for name in ("sentiment", "subjectivity"):
        assert set(results[name]) >= {
            "accuracy_mixed",
            "accuracy_alone",
            "accuracy_merged",
            "max_abs_logit_diff",
        }
        assert results[name]["examples"] == 8
    assert [e["step"] for e in results["history"]["eval"]] == [0, 2]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy mixed" in proc.stdout and "reload + merge" in proc.stdout
    nbytes = results["adapter_param_bytes"]  # MiniLM: each adapter is 0.3% of the base
    assert max(nbytes.values()) < results["base_param_bytes"] / 200
    _, config, body, _ = load_hf_model(minilm_path())
    base = init_classification_params(config, body, num_labels=2, key=jax.random.key(0))
    bank = jaxlora.load_bank(tmp_path / "adapters", base)
    heads = [bank.select(n)["classifier"]["kernel"].value for n in ("sentiment", "subjectivity")]
    assert not np.allclose(heads[0], heads[1])  # each task trained its own head
    config, _ = jaxlora.load_adapter(tmp_path / "adapters" / "sentiment", base)  # alone too
    assert config.modules_to_save == ("classifier",)


def test_language_models_two_adapters_and_a_generation_batch(tiny_llama_dir, tmp_path):
    budget = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--max-eval-examples", "4"]
    proc = run_script("--model", str(tiny_llama_dir), *budget, "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    check_per_task(results, "perplexity", ["hamlet", "debates"])
    base = jaxlora.AdapterBank.BASE
    assert [(g["prompt_of"], g["adapter"]) for g in results["generations"]] == [
        ("hamlet", "hamlet"),
        ("debates", "debates"),
        ("hamlet", base),
        ("debates", base),
    ]
    assert "[debates prompt, adapter debates]" in proc.stdout
    assert results["settings"]["targets"] == list(tasks.LLAMA_LINEARS)
