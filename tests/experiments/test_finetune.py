"""`experiments/finetune.py` end to end on tiny budgets: outputs, resume, local models, errors."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxlora
from experiments import finetune, tasks
from experiments.models.bert import init_classification_params
from experiments.models.loading import load_hf_model, minilm_path
from tests.support.gguf_files import smollm2_first_layers
from tests.support.scripts import REPO_ROOT, run_experiment
from tests.support.tiny_llama import write_tiny_llama

SCRIPT = REPO_ROOT / "experiments" / "finetune.py"
TINY_BUDGET = ["--steps", "4", "--batch-size", "4", "--max-eval-examples", "8", "--eval-every", "2"]


def run_script(*flags: str) -> subprocess.CompletedProcess:
    """Runs the script as the README does (``python experiments/finetune.py ...``)."""
    return run_experiment(SCRIPT, *flags, timeout=300)


def peft_tensors(output_dir: Path) -> dict[str, np.ndarray]:
    """The exported PEFT adapter's tensors."""
    return load_file(output_dir / "peft" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    """The default task (MiniLM, Rotten Tomatoes, LoRA) for 4 steps in one go."""
    output_dir = tmp_path_factory.mktemp("minilm") / "run"
    proc = run_script(*TINY_BUDGET, "--output-dir", str(output_dir))
    assert proc.returncode == 0, proc.stderr
    return output_dir, proc


def test_default_task_writes_results_plot_adapter_and_table(minilm_run):
    output_dir, proc = minilm_run
    results = json.loads((output_dir / "results.json").read_text())
    assert results["settings"]["model"] == "minilm"
    assert results["settings"]["targets"] == ["query", "value"]
    assert set(results["before"]) == set(results["after"]) == {"loss", "accuracy"}
    assert [e["step"] for e in results["history"]["eval"]] == [0, 2, 4]
    assert [s for s, _ in results["history"]["train_loss"]] == [1, 2, 3, 4]
    assert results["trainable_params"] == 74_498  # q, v at r=8 (73,728) + classifier (770)
    assert results["total_params"] == 22_713_986 + 73_728
    assert results["step_time_median_s"] > 0 and results["peak_rss_mb"] > 0
    assert results["settings"]["skip_nonfinite"] is True and results["skipped_steps"] == 0
    assert results["saved_bytes"] == sum(
        f.stat().st_size for f in (output_dir / "adapter").rglob("*") if f.is_file()
    )
    _, config, body, _ = load_hf_model(minilm_path())
    base = init_classification_params(config, body, num_labels=2, key=jax.random.key(0))
    lora_config, adapted = jaxlora.load_adapter(output_dir / "adapter", base)
    assert lora_config.targets == ("query", "value") and lora_config.rank == 8
    assert jaxlora.summary(adapted).trainable_params == 74_498
    assert (output_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    peft_config = json.loads((output_dir / "peft" / "adapter_config.json").read_text())
    assert peft_config["task_type"] == "SEQ_CLS"
    assert peft_config["modules_to_save"] == ["classifier"]
    assert len(peft_tensors(output_dir)) == 2 * 12 + 2  # A, B of 12 layers; classifier W, b
    table = proc.stdout[proc.stdout.index("minilm on rotten_tomatoes") :]
    rows = ("eval accuracy", "trainable params", "step time", "skipped steps", "peak memory")
    for row in (*rows, "saved on disk"):
        assert row in table
    assert table.splitlines()[-5:] == [
        "written:",
        f"  results      {output_dir / 'results.json'}",
        f"  curves       {output_dir / 'curves.png'}",
        f"  adapter      {output_dir / 'adapter'}",
        f"  PEFT export  {output_dir / 'peft'}",
    ]
    assert results["outputs"]["PEFT export"] == str(output_dir / "peft")


def test_settings_record_evaluation_flags_and_defaults(minilm_run):
    output_dir, _ = minilm_run
    recorded = json.loads((output_dir / "settings.json").read_text())
    assert recorded == {
        "model": "minilm",
        "data": "rotten_tomatoes",
        "method": "lora",
        "quantize": "none",
        "variant": "lora",
        "loraplus_lr_ratio": 16.0,
        "rank": 8,
        "alpha": 16.0,
        "targets": ["query", "value"],
        "steps": 4,
        "lr": 1e-3,
        "batch_size": 4,
        "seq_len": 64,
        "seed": 0,
        "skip_nonfinite": True,
        "eval_every": 2,
        "max_eval_examples": 8,
    }


def test_resume_is_bit_identical(minilm_run, tmp_path):
    uninterrupted, _ = minilm_run
    output_dir = tmp_path / "run"
    first = run_script(*TINY_BUDGET, "--output-dir", str(output_dir), "--stop-at", "2")
    assert first.returncode == 0, first.stderr
    command = shlex.join([sys.executable, "experiments/finetune.py", "--resume"])
    command += f" --output-dir {shlex.quote(str(output_dir))}"
    assert f"stopped after step 2 of 4; continue with:\n  {command}\n" in first.stdout
    assert not (output_dir / "results.json").exists()
    second = subprocess.run(  # the printed command alone: every setting comes from the record
        shlex.split(command), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr
    assert "resumed after step 2" in second.stdout

    expected, resumed = peft_tensors(uninterrupted), peft_tensors(output_dir)
    assert expected.keys() == resumed.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(resumed[name], array, err_msg=name)
    history = [
        json.loads((d / "results.json").read_text())["history"] for d in (uninterrupted, output_dir)
    ]
    assert history[0] == history[1]


def test_local_llama_directory_trains_on_hamlet(tiny_llama_dir, tmp_path):
    budget = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--max-eval-examples", "4"]
    proc = run_script("--model", str(tiny_llama_dir), *budget, "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["data"] == "hamlet"
    assert results["settings"]["targets"] == list(tasks.LLAMA_LINEARS)
    assert set(results["after"]) == {"loss", "perplexity"}
    assert set(results["samples"]) == {"before", "after"}
    assert "sample after:" in proc.stdout and "eval perplexity" in proc.stdout
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize("variant", ["dora", "pissa", "olora", "loraplus"])
def test_variants_train_and_are_recorded(tiny_llama_dir, tmp_path, variant):
    budget = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--max-eval-examples", "4"]
    flags = ["--variant", variant, *(["--loraplus-ratio", "4"] if variant == "loraplus" else [])]
    proc = run_script(
        "--model", str(tiny_llama_dir), *budget, *flags, "--output-dir", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["variant"] == variant
    assert results["title"].split(", ")[1].startswith(finetune.VARIANT_NAMES[variant])
    assert np.isfinite(results["after"]["loss"]) and results["after"] != results["before"]
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    from_weights = variant in ("pissa", "olora")
    assert peft_config["init_lora_weights"] == (variant if from_weights else True)
    assert peft_config["use_dora"] == (variant == "dora")


def one_error_line(capsys, *argv: str) -> str:
    """Runs ``main`` in-process; asserts exit status 2 and a single ``error:`` line."""
    assert finetune.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_unknown_model_family(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("")
    assert "model_type 'gpt2'" in one_error_line(capsys, "--model", str(tmp_path))


def test_unknown_model_name(capsys, tmp_path):
    err = one_error_line(capsys, "--model", str(tmp_path / "absent"))
    assert "unknown model" in err and "'minilm'" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--targets", "no_such_layer"],
            "matches no layer or weight (a misspelling?).",
        ),
        (["--batch-size", "100000"], "--batch-size 100000 is larger than the"),
        (["--resume"], "no run to continue in"),
        (["--data", "rotten_tomatoes"], "use --data hamlet"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--loraplus-ratio", "0"], "--loraplus-ratio must be positive"),
        (["--full-finetune", "--variant", "pissa"], "leave them out with --full-finetune"),
    ],
    ids=["target", "batch", "resume", "data", "steps", "loraplus_ratio", "variant_full"],
)
def test_bad_flags(capsys, tiny_llama_dir, tmp_path, flags, message):
    output = ["--output-dir", str(tmp_path / "run"), "--seq-len", "16"]
    assert message in one_error_line(capsys, "--model", str(tiny_llama_dir), *output, *flags)


def test_resume_with_other_settings_is_refused(capsys, tiny_llama_dir, tmp_path):
    run = ["--model", str(tiny_llama_dir), "--output-dir", str(tmp_path), "--seq-len", "16"]
    run += ["--steps", "2"]
    assert finetune.main([*run, "--batch-size", "2", "--stop-at", "1"]) == 0
    capsys.readouterr()
    err = one_error_line(capsys, *run, "--batch-size", "4", "--resume")
    assert "was started with batch_size=2 (now 4); resume it with the settings" in err
    err = one_error_line(
        capsys, "--output-dir", str(tmp_path), "--max-eval-examples", "3", "--resume"
    )
    assert "was started with max_eval_examples=None (now 3);" in err
    one_error_line(capsys, *run, "--batch-size", "2", "--targets", "typo")  # a fresh start...
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["1"]  # ...left them


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_checkpoints_the_step_reached_and_prints_the_resume_command(
    tiny_llama_dir, tmp_path, signum
):
    output_dir = tmp_path / "run"
    flags = ["--model", str(tiny_llama_dir), "--steps", "100000", "--batch-size", "2"]
    flags += ["--seq-len", "16", "--max-eval-examples", "4", "--eval-every", "3"]
    flags += ["--save-every", "100000", "--output-dir", str(output_dir)]
    with (tmp_path / "stderr").open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *flags],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            lines = iter(proc.stdout.readline, "")
            assert any(line.startswith("step 3: eval") for line in lines)  # training is under way
            proc.send_signal(signum)
            proc.communicate(timeout=120)
        finally:
            proc.kill()
    err = (tmp_path / "stderr").read_text()
    assert proc.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"{name}: finishing the step in flight, then saving a checkpoint" in err
    found = re.search(
        rf"interrupted by {name}: saved a checkpoint after step (\d+) of 100000 in "
        rf"{re.escape(str(output_dir / 'checkpoints'))}; resume with:\n  (.*)\n",
        err,
    )
    assert found, err
    step, command = int(found[1]), found[2]
    assert step >= 3
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == [str(step)]
    assert command == shlex.join(
        [sys.executable, "experiments/finetune.py", "--resume", "--output-dir", str(output_dir)]
    )
    resumed = subprocess.run(
        [*shlex.split(command), "--stop-at", str(step + 1)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed after step {step} from" in resumed.stdout
    assert f"stopped after step {step + 1} of 100000" in resumed.stdout


def test_missing_package_names_the_install_command():
    block = "import sys; sys.modules['matplotlib'] = None; import runpy; "
    block += f"sys.argv = [{str(SCRIPT)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    proc = subprocess.run(
        [sys.executable, "-c", block], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: the package 'matplotlib' is not installed; install jaxlora with the experiment "
        "dependencies: `pip install -e '.[experiments]'`.\n"
    )


def test_readme_two_process_example_writes_to_its_own_output_dir():
    readme = (REPO_ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "--distributed" in b]
    flags = shlex.split(block.split("finetune.py", 1)[1].split("&", 1)[0])
    assert flags[flags.index("--output-dir") + 1] == "runs/two-process", block


def test_quantized_base_is_loaded_quantized_and_reported(tiny_llama_dir, tmp_path):
    _, _, params, _ = load_hf_model(tiny_llama_dir, quantize="int8")
    kernel = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(kernel, jaxlora.QuantizedArray) and kernel.format == "int8"
    budget = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--max-eval-examples", "4"]
    flags = ["--model", str(tiny_llama_dir), *budget, "--quantize", "int8"]
    assert finetune.main([*flags, "--output-dir", str(tmp_path / "int8")]) == 0
    assert finetune.main([*flags[:-2], "--output-dir", str(tmp_path / "none")]) == 0
    int8, none = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("int8", "none"))
    assert int8["quantize"] == "int8" and none["quantize"] == "none"
    assert 8 < int8["quantized_bits_per_weight"] < 9 and none["quantized_bits_per_weight"] is None
    # the embedding (tied head) and norms stay float32; every Dense kernel is int8
    assert int8["base_param_bytes"] < 0.6 * none["base_param_bytes"]
    assert int8["after"]["loss"] < int8["before"]["loss"]
    # the adapters export as plain LoRA, as from a float base
    assert set(peft_tensors(tmp_path / "int8")) == set(peft_tensors(tmp_path / "none"))


def test_nf4_base_sharded_over_a_data_model_mesh_trains_like_one_device(tmp_path):
    # every input axis a multiple of nf4's block of 64; 8 fake devices (conftest)
    model = write_tiny_llama(tmp_path / "llama64", hidden_size=64, intermediate_size=128)
    budget = ["--steps", "2", "--batch-size", "4", "--seq-len", "16", "--max-eval-examples", "8"]
    flags = ["--model", str(model), *budget, "--quantize", "nf4"]
    mesh = tmp_path / "mesh"
    assert finetune.main([*flags, "--mesh", "data=2,model=4", "--output-dir", str(mesh)]) == 0
    assert finetune.main([*flags, "--output-dir", str(tmp_path / "one")]) == 0
    sharded, one = (
        json.loads((tmp_path / r / "results.json").read_text()) for r in ("mesh", "one")
    )
    assert len(sharded["machine"]["devices"]) == 8
    assert sharded["base_param_bytes"] == one["base_param_bytes"]
    losses = [[loss for _, loss in r["history"]["train_loss"]] for r in (sharded, one)]
    np.testing.assert_allclose(*losses, rtol=1e-5)
    np.testing.assert_allclose(sharded["after"]["loss"], one["after"]["loss"], rtol=1e-5)


def test_gguf_blocks_kept_as_the_base(tmp_path):
    small = smollm2_first_layers(tmp_path / "smollm2-2.gguf", layers=2)
    budget = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--max-eval-examples", "4"]
    out = tmp_path / "gguf"
    assert (
        finetune.main(
            ["--model", str(small), *budget, "--quantize", "gguf", "--output-dir", str(out)]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["quantize"] == results["settings"]["quantize"] == "gguf"
    # 14 Q4_1 kernels (5 bits a weight) and the Q8_0 embedding (8.5): nothing stored float but
    # the norms, so the base is the file's tensor bytes
    kernels, embedding = 2 * 576 * (2 * 576 + 2 * 192 + 3 * 1536), 49152 * 576
    assert results["quantized_bits_per_weight"] == pytest.approx(
        (5 * kernels + 8.5 * embedding) / (kernels + embedding)
    )
    assert results["base_param_bytes"] == kernels * 5 // 8 + embedding * 17 // 16 + 5 * 576 * 4
    assert results["after"]["loss"] < results["before"]["loss"]
    assert 0 < results["rss_before_load_mb"] < results["load_peak_rss_mb"] <= results["peak_rss_mb"]


def test_quantize_refusals(capsys, tiny_llama_dir, tmp_path):
    output = ["--output-dir", str(tmp_path / "run"), "--seq-len", "16"]
    err = one_error_line(capsys, "--model", str(tiny_llama_dir), *output, "--quantize", "gguf")
    assert "use --quantize nf4 (or int8) for it, or load a .gguf file" in err
    err = one_error_line(capsys, "--model", str(tiny_llama_dir), *output, "--quantize", "nf4")
    assert "not a multiple of the block size 64" in err and "/kernel' (32, 64)" in err
    err = one_error_line(capsys, "--full-finetune", "--quantize", "int8", *output)
    assert "drop one of them" in err
