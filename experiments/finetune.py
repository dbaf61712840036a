"""Fine-tune a pretrained model with LoRA (or in full) and report what it achieved.

Run from the repository root::

    python experiments/finetune.py                      # MiniLM + Rotten Tomatoes, LoRA q,v r=8
    python experiments/finetune.py --full-finetune      # the same budget, every weight trains
    python experiments/finetune.py --model smollm2      # SmolLM2-135M on Hamlet (data default)
    python experiments/finetune.py --model path/to/hf_dir --targets query,key,value --rank 16
    python experiments/finetune.py --stop-at 100 --output-dir runs/a  # stop after step 100 ...
    python experiments/finetune.py --resume --output-dir runs/a  # ... continue, bit-identically

Everything lands in ``--output-dir`` (default ``runs/<model>-<data>-<lora|full>``):
``settings.json`` (every setting that changes results), ``results.json``, ``curves.png``,
``checkpoints/`` (the resumable training state) and the weights: ``adapter/`` (for
``jaxlora.load_adapter``) and ``peft/`` (for PEFT) under LoRA, ``model.safetensors`` (Hugging
Face names) under full fine-tuning. ``--resume`` takes the recorded settings; a flag that
contradicts them is refused. Ctrl-C (SIGINT) or SIGTERM during training finishes the step in
flight, saves a checkpoint, prints the command that resumes and exits with status 128 + the
signal's number. Bad input ends with one line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python experiments/finetune.py`: import from the repo
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

try:
    import jax
    from jax.experimental import multihost_utils
    from safetensors.numpy import save_file

    import jaxlora
    from experiments import report, tasks, training
    from experiments.models.loading import flax_to_hf_state_dict
except ModuleNotFoundError as e:
    print(
        f"error: the package {(e.name or '?').split('.')[0]!r} is not installed; install jaxlora "
        "with the experiment dependencies: `pip install -e '.[experiments]'`.",
        file=sys.stderr,
    )
    sys.exit(2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The options; every flag that `given_settings` records is None when not given.
    """
    p = argparse.ArgumentParser(
        description="LoRA (or full) fine-tuning: MiniLM on Rotten Tomatoes sentiment, "
        "SmolLM2-135M on Hamlet, or a local Hugging Face BERT/Llama directory.",
    )
    add = p.add_argument
    add("--model", help="minilm (default), smollm2, HF directory or .gguf file")
    add("--data", choices=tasks.DATASETS, help="default: rotten_tomatoes (bert), hamlet (llama)")
    add(
        "--full-finetune",
        action="store_true",
        default=None,
        help="train every weight (plain optax), no LoRA",
    )
    add(
        "--quantize",
        choices=("none", "int8", "nf4", "fp8", "gguf"),
        help="store the frozen base quantized, each Dense kernel as it is read (QLoRA; none); "
        "gguf: keep a .gguf model's own Q4_1/Q8_0 blocks, kernels and embedding",
    )
    add(
        "--variant",
        choices=VARIANTS,
        help="lora (default); dora: weight-decomposed LoRA (PEFT's use_dora, a trained "
        "magnitude per output feature); pissa / olora: adapters initialised from the base weights "
        "(PEFT's init_lora_weights), the frozen weights becoming the residual; loraplus: B "
        "at --loraplus-ratio times the learning rate (PEFT's create_loraplus_optimizer)",
    )
    add("--loraplus-ratio", type=float, help="LoRA+: B's learning rate over A's (16)")
    add("--rank", type=int, help="LoRA rank (8)")
    add("--alpha", type=float, help="LoRA alpha; scale = alpha/rank (16)")
    add(
        "--targets",
        help="comma-separated layer patterns (bert: query,value; llama: every block linear)",
    )
    add("--steps", type=int, help="optimizer steps (rotten_tomatoes 300, hamlet 100)")
    add("--lr", type=float, help="peak learning rate (LoRA 1e-3, hamlet 5e-4; full 5e-5)")
    add("--batch-size", type=int, help="examples per step (16; hamlet 4)")
    add("--seq-len", type=int, help="tokens per example (64; hamlet 128)")
    add("--eval-every", type=int, help="steps between evaluations (100; hamlet 50)")
    add("--save-every", type=int, help="steps between checkpoints (default: --eval-every)")
    add("--max-eval-examples", type=int, help="evaluate on the first N examples only")
    add(
        "--skip-nonfinite",
        action=argparse.BooleanOptionalAction,
        help="skip steps whose gradients hold NaN or inf, and count them (on)",
    )
    add("--seed", type=int, help="seed of the head and adapter init, batches, dropout (0)")
    add("--output-dir", type=Path, help="default: runs/<model>-<data>-<lora|full>")
    add(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir with its recorded settings",
    )
    add("--stop-at", type=int, help="stop after this step (continue later with --resume)")
    add("--mesh", help="device mesh, e.g. data=2,model=4 (batches over data, weights over model)")
    add(
        "--distributed",
        action="store_true",
        help="join a multi-process run set up by $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES "
        "and $JAX_PROCESS_ID (default mesh: data=-1)",
    )
    return p.parse_args(argv)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (a multi-line listing joined with spaces).

    Args:
        error: The exception.

    Returns:
        The message, or the exception's type name if it has none.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


DEFAULT_MODEL = "minilm"
VARIANTS = ("lora", "dora", "pissa", "olora", "loraplus")
VARIANT_NAMES = {
    "lora": "LoRA",
    "dora": "DoRA",
    "pissa": "PiSSA",
    "olora": "OLoRA",
    "loraplus": "LoRA+",
}


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that change results which the command line gives explicitly.

    Args:
        args: From `parse_args`.

    Returns:
        ``{setting: value}`` of the flags given (see `settings` for the names).

    Raises:
        ValueError: If a count or the learning rate is not positive.
    """
    counts = {
        "--steps": args.steps,
        "--batch-size": args.batch_size,
        "--seq-len": args.seq_len,
        "--eval-every": args.eval_every,
        "--save-every": args.save_every,
        "--max-eval-examples": args.max_eval_examples,
        "--stop-at": args.stop_at,
    }
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}.")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}.")
    if args.full_finetune and args.quantize not in (None, "none"):
        raise ValueError(
            f"--quantize {args.quantize} stores a frozen base, and --full-finetune trains every "
            "weight: drop one of them."
        )
    if args.loraplus_ratio is not None and not args.loraplus_ratio > 0:
        raise ValueError(f"--loraplus-ratio must be positive, got {args.loraplus_ratio}.")
    if args.full_finetune and (args.variant or args.loraplus_ratio) is not None:
        raise ValueError(
            "--variant and --loraplus-ratio are LoRA's; leave them out with --full-finetune."
        )
    targets = None
    if args.targets is not None:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    given = {
        "model": args.model,
        "data": args.data,
        "method": "full" if args.full_finetune else None,
        "quantize": args.quantize,
        "variant": args.variant,
        "loraplus_lr_ratio": args.loraplus_ratio,
        "rank": args.rank,
        "alpha": args.alpha,
        "targets": targets,
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "skip_nonfinite": args.skip_nonfinite,
        "eval_every": args.eval_every,
        "max_eval_examples": args.max_eval_examples,
    }
    return {k: v for k, v in given.items() if v is not None}


def settings(
    given: dict[str, Any],
    family: str,
    data_name: str,
    recorded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every setting that changes a run's results: given, else recorded, else the defaults.

    Args:
        given: From `given_settings` (checked against ``recorded`` by `check_resume`).
        family: ``"bert"`` or ``"llama"``.
        data_name: The dataset.
        recorded: A resumed run's ``settings.json`` (None for a fresh run).

    Returns:
        JSON-serialisable settings: model, data, method, variant (lora, dora, pissa, olora,
        loraplus; "full" for full fine-tuning), loraplus_lr_ratio, quantize, rank, alpha,
        targets, steps, lr, batch_size, seq_len, seed, skip_nonfinite, eval_every and
        max_eval_examples (None: the whole evaluation set).
    """
    recorded = recorded or {}
    method = given.get("method", recorded.get("method", "lora"))
    budget = tasks.BUDGETS[data_name]
    defaults = {
        "model": DEFAULT_MODEL,
        "data": data_name,
        "method": method,
        "quantize": "none",
        "variant": "full" if method == "full" else "lora",
        "loraplus_lr_ratio": 16.0,
        "rank": 8,
        "alpha": 16.0,
        "targets": list(tasks.DEFAULT_TARGETS[family]),
        "steps": budget.steps,
        "lr": budget.lr_full if method == "full" else budget.lr_lora,
        "batch_size": budget.batch_size,
        "seq_len": budget.seq_len,
        "seed": 0,
        "skip_nonfinite": True,
        "eval_every": budget.eval_every,
        "max_eval_examples": None,
    }
    return {**defaults, **recorded, **given}


def read_settings(output_dir: Path) -> dict[str, Any]:
    """The recorded settings of the run to resume in ``output_dir``.

    Args:
        output_dir: The run's output directory.

    Returns:
        Its ``settings.json``.

    Raises:
        FileNotFoundError: If there is no run in ``output_dir``.
    """
    checkpoints, recorded = output_dir / "checkpoints", output_dir / "settings.json"
    if not (checkpoints.is_dir() and recorded.is_file()):
        raise FileNotFoundError(
            f"--resume: no run to continue in {output_dir} (it needs checkpoints/ and "
            "settings.json); start without --resume, or pass the run's --output-dir."
        )
    return json.loads(recorded.read_text())


def check_resume(given: dict[str, Any], recorded: dict[str, Any], output_dir: Path) -> None:
    """Refuses flags that contradict the settings a resumed run was started with.

    Args:
        given: From `given_settings`.
        recorded: From `read_settings`.
        output_dir: The run's output directory (for the message).

    Raises:
        ValueError: Naming each setting, its recorded value and the one given.
    """
    changed = sorted(k for k in given if k in recorded and given[k] != recorded[k])
    if changed:
        was = ", ".join(f"{k}={recorded[k]!r} (now {given[k]!r})" for k in changed)
        raise ValueError(
            f"--resume: the run in {output_dir} was started with {was}; resume it with the "
            "settings it was started with (leave those flags out: --resume uses the "
            "recorded ones)."
        )


def prepare_output(output_dir: Path, resume: bool, run: dict[str, Any]) -> Path:
    """Starts a fresh run in ``output_dir``, or finds the one to resume.

    A fresh run removes the directory's old checkpoints and records its settings in
    ``settings.json`` (a resumed run's were read and checked by `read_settings` and
    `check_resume`).

    Args:
        output_dir: The run's output directory.
        resume: Whether the run continues from its checkpoints.
        run: From `settings`.

    Returns:
        The checkpoint directory, ``output_dir / "checkpoints"``.
    """
    checkpoints, recorded = output_dir / "checkpoints", output_dir / "settings.json"
    if not resume and jax.process_index() == 0:
        if checkpoints.exists():
            print(f"note: starting afresh, removing the earlier run's checkpoints in {output_dir}")
            shutil.rmtree(checkpoints)
        output_dir.mkdir(parents=True, exist_ok=True)
        report.write_json(recorded, run)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("finetune: output directory ready")
    return checkpoints


def resume_command(args: argparse.Namespace, output_dir: Path) -> str:
    """The shell command that continues the run in ``output_dir``.

    Args:
        args: From `parse_args` (``--mesh`` and ``--distributed``, which are not recorded,
            are passed on).
        output_dir: The run's output directory.

    Returns:
        The command, quoted for a POSIX shell.
    """
    script = Path(__file__).resolve()
    if script.is_relative_to(Path.cwd()):
        script = script.relative_to(Path.cwd())
    command = [sys.executable, str(script), "--resume", "--output-dir", str(output_dir)]
    if args.mesh:
        command += ["--mesh", args.mesh]
    if args.distributed:
        command.append("--distributed")
    return shlex.join(command)


def save_weights(
    output_dir: Path,
    pretrained: tasks.Pretrained,
    task: tasks.Task,
    method: training.Method,
    params: tasks.Params,
) -> dict[str, Path]:
    """Saves what was trained: the adapter (jaxlora and PEFT formats) or the full weights.

    Every process calls it (in a multi-process run the jaxlora savers gather and write
    together; the full weights are gathered here and written by process 0).

    Args:
        output_dir: The run's output directory.
        pretrained: The base model (family and name, for the PEFT export).
        task: The task (PEFT task type).
        method: How the params trained.
        params: The trained params.

    Returns:
        What was written, by what it is: ``{"adapter": ..., "PEFT export": ...}`` (LoRA)
        or ``{"weights": .../model.safetensors}`` (full fine-tuning), the trained weights
        first.
    """
    config = method.lora_config
    if config is None:
        path = output_dir / "model.safetensors"
        host_params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() == 0:
            save_file(flax_to_hf_state_dict(host_params), path)
        return {"weights": path}
    jaxlora.export_peft(
        output_dir / "peft",
        params,
        config,
        module_map=jaxlora.peft_module_maps[pretrained.family],
        base_model_name_or_path=pretrained.source,
        task_type=task.peft_task_type,
    )
    path = output_dir / "adapter"
    jaxlora.save_adapter(path, params, config)
    return {"adapter": path, "PEFT export": output_dir / "peft"}


def _metrics(evaluation: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in evaluation.items() if k != "step"}


def results_of(
    run: dict[str, Any],
    method: training.Method,
    state: training.RunState,
    times: list[float],
    saved: Path,
    outputs: dict[str, Path],
    metric: str,
    loading: dict[str, float],
) -> dict[str, Any]:
    """Everything ``results.json`` records.

    Args:
        run: From `settings`.
        method: How the params trained.
        state: The final state (its history holds the metrics and samples).
        times: Step times of this process.
        saved: The trained weights (the adapter, or the full weights) whose size to report.
        outputs: Every file or directory the run leaves, by what it is.
        metric: The task's headline metric.
        loading: ``rss_before_load_mb`` (resident memory before the model was read) and
            ``load_peak_rss_mb`` (peak resident memory once it was).

    Returns:
        The results.
    """
    evals = state.history["eval"]
    what = (
        "full fine-tuning"
        if method.lora_config is None
        else (
            f"{VARIANT_NAMES[run['variant']]} r={run['rank']} alpha={run['alpha']:g} on "
            f"{','.join(run['targets'])}"
        )
    )
    return {
        "title": f"{run['model']} on {run['data']}, {what}, {run['steps']} steps",
        "date": datetime.date.today().isoformat(),
        "settings": run,
        "metric": metric,
        "before": _metrics(evals[0]),
        "after": _metrics(evals[-1]),
        "trainable_params": method.trainable_params,
        "total_params": method.total_params,
        "trainable_percent": 100 * method.trainable_params / method.total_params,
        "quantize": run["quantize"],
        **base_storage(method, state.params),
        "step_time_median_s": training.median_step_time(times),
        "steps_timed": max(len(times) - 1, 0),
        "skipped_steps": None if method.skipped is None else method.skipped(state.opt_state),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **loading,
        "saved_path": str(saved),
        "saved_bytes": report.directory_bytes(saved),
        "outputs": {name: str(path) for name, path in outputs.items()},
        "lora_config": None if method.lora_config is None else method.lora_config.to_dict(),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "devices": [str(d) for d in jax.devices()],
            "platform": platform.platform(),
            "jax": jax.__version__,
        },
        "samples": state.history["samples"],
        "history": {"train_loss": state.history["train_loss"], "eval": evals},
    }


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB (Linux ``/proc/self/statm``; else 0)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _quantize_format(setting: str) -> str | None:
    """What the loader stores quantized (``"gguf"``: the file's blocks), None for float."""
    return None if setting == "none" else setting


def base_storage(method: training.Method, params: Any) -> dict[str, Any]:
    """``base_param_bytes`` (the frozen base as stored; every param for full fine-tuning)
    and ``quantized_bits_per_weight`` (stored bits per weight of its quantized kernels,
    codes and scales; None if none is quantized).

    Args:
        method: How the params trained.
        params: The params (adapted tree for LoRA).

    Returns:
        The two fields.
    """
    base = params if method.lora_config is None else jaxlora.split(params)[1]
    leaves = jax.tree.leaves(base, is_leaf=lambda x: isinstance(x, jaxlora.QuantizedArray))
    quantized = [x for x in leaves if isinstance(x, jaxlora.QuantizedArray)]
    weights = sum(math.prod(q.shape) for q in quantized)
    return {
        "base_param_bytes": int(sum(x.nbytes for x in leaves)),
        "quantized_bits_per_weight": (
            8 * sum(q.nbytes for q in quantized) / weights if quantized else None
        ),
    }


def make_method(task: tasks.Task, run: dict[str, Any], key: jax.Array) -> training.Method:
    """LoRA on the run's targets (new heads trained in full), or full fine-tuning.

    Args:
        task: The task.
        run: From `settings`.
        key: PRNG key for the adapters' A factors.

    Returns:
        The method, with AdamW at the run's learning rate over its steps.

    Raises:
        ValueError: For a bad LoRA config or a target that matches no layer.
    """
    tx = training.make_optimizer(run["lr"], run["steps"])
    if run["method"] == "full":
        return training.full_method(task, tx, run["skip_nonfinite"])
    variant = run["variant"]
    if variant == "loraplus":
        tx = training.make_loraplus_optimizer(run["lr"], run["steps"], run["loraplus_lr_ratio"])
    config = jaxlora.LoraConfig(
        rank=run["rank"],
        alpha=run["alpha"],
        targets=run["targets"],
        modules_to_save=task.modules_to_save,
        # the loader stored the kernels; "gguf" blocks are read, not computed by lorafy
        quantize=None if run["quantize"] == "gguf" else _quantize_format(run["quantize"]),
        init=variant if variant in ("pissa", "olora") else "kaiming",
        use_dora=variant == "dora",
    )
    return training.lora_method(task, config, tx, run["seq_len"], key, run["skip_nonfinite"])


def run(args: argparse.Namespace) -> int:
    """Loads, trains, evaluates and writes everything (see the module docstring).

    Args:
        args: From `parse_args`.

    Returns:
        The exit status: 0, or 128 + the signal's number if SIGINT or SIGTERM stopped
        the training.
    """
    given = given_settings(args)
    recorded = None
    if args.resume and args.output_dir is not None:  # refuse a contradiction before loading
        recorded = read_settings(args.output_dir)
        check_resume(given, recorded, args.output_dir)
    if args.distributed:
        jaxlora.initialize_distributed()
    mesh_spec = args.mesh or ("data=-1" if args.distributed else None)
    mesh = jaxlora.parse_mesh(mesh_spec) if mesh_spec else None
    feed = training.batch_feeder(mesh)
    known = {**(recorded or {}), **given}
    quantize = _quantize_format(known.get("quantize", "none"))
    loading = {"rss_before_load_mb": current_rss_mb()}
    pretrained = tasks.load_pretrained(known.get("model", DEFAULT_MODEL), quantize)
    loading["load_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    data_name = known.get("data", tasks.DEFAULT_DATA[pretrained.family])
    method_name = known.get("method") or known.get("variant", "lora")
    output_dir = args.output_dir or Path("runs") / f"{pretrained.name}-{data_name}-{method_name}"
    if args.resume and recorded is None:
        recorded = read_settings(output_dir)
        check_resume(given, recorded, output_dir)
    run_settings = settings(given, pretrained.family, data_name, recorded)
    head_key, lora_key, rng = jax.random.split(jax.random.key(run_settings["seed"]), 3)
    task = tasks.build_task(pretrained, data_name, run_settings["seq_len"], head_key)
    batch_size = run_settings["batch_size"]
    task = training.fit_task(task, batch_size, run_settings["max_eval_examples"], mesh)
    method = make_method(task, run_settings, lora_key)
    checkpoints = prepare_output(output_dir, args.resume, run_settings)  # input is valid
    if method.summary is not None:
        print(method.summary)
    eval_every = run_settings["eval_every"]
    schedule = training.Schedule(
        steps=run_settings["steps"],
        batch_size=batch_size,
        eval_every=eval_every,
        save_every=args.save_every or eval_every,
        stop_at=args.stop_at,
    )
    state = training.initial_state(method, run_settings["seed"], rng, mesh)
    with (
        training.Interrupt() as interrupt,
        jaxlora.TrainCheckpointer(checkpoints, max_to_keep=2) as checkpointer,
    ):
        if args.resume:
            state = training.restore_state(checkpointer, method, state)
            print(f"resumed after step {state.step} from {checkpoints}")
        state, times = training.train(task, method, schedule, state, checkpointer, feed, interrupt)
    resume = resume_command(args, output_dir)
    if interrupt.stopped or interrupt.requested():  # a signal after the last step stops too
        if jax.process_index() == 0:
            name = "a signal" if interrupt.signum is None else signal.Signals(interrupt.signum).name
            print(
                f"interrupted by {name}: saved a checkpoint after step {state.step} of "
                f"{schedule.steps} in {checkpoints}; resume with:\n  {resume}",
                file=sys.stderr,
            )
        return interrupt.exit_status
    if state.step < schedule.steps:
        print(f"stopped after step {state.step} of {schedule.steps}; continue with:\n  {resume}")
        return 0

    weights = save_weights(output_dir, pretrained, task, method, state.params)
    if jax.process_index() == 0:
        outputs = {
            "results": output_dir / "results.json",
            "curves": output_dir / "curves.png",
            **weights,
        }
        saved = next(iter(weights.values()))
        results = results_of(
            run_settings, method, state, times, saved, outputs, task.metric, loading
        )
        report.write_json(outputs["results"], results)
        report.plot_curves(outputs["curves"], results["history"], task.metric, results["title"])
        for when, text in results["samples"].items():
            print(f"sample {when}: {text!r}")
        print(report.format_table(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; bad input prints ``error: ...`` (one line) and returns 2.

    Ctrl-C outside the training loop (while loading, or saving the weights at the end)
    prints one line and returns 130; during training `run` checkpoints first.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted (SIGINT) outside the training loop; nothing was saved since the "
            "run's last checkpoint.",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
