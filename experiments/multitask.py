"""Two tasks, two adapters, one frozen base: trained in one mixed stream, served from one.

Run from the repository root::

    python experiments/multitask.py                   # MiniLM: sentiment + subjectivity
    python experiments/multitask.py --model smollm2   # SmolLM2-135M: Hamlet + the debates
    python experiments/multitask.py --steps 20 --max-eval-examples 64 --output-dir runs/m

Each task gets its own LoRA adapter in one `jaxlora.AdapterBank` (MiniLM: each with its own
classification head, ``modules_to_save``). Both train together: every batch mixes the rows
of both tasks (the smaller training set repeated to the size of the larger, so each batch
is half one task on average), each row naming its adapter, and one step updates each
adapter from its own rows only. The bank is saved (`jaxlora.save_bank`: one adapter
directory per task), loaded back onto a fresh base, and both tasks' evaluation sets run as
ONE stream of mixed batches. Per task it prints the metric from the mixed batches, from the
adapter alone (``bank.select(name)`` with `jaxlora.LoraModel`) and merged
(``jaxlora.merge(bank, adapters=name)``), the largest logit difference mixed vs alone, the
bytes of the base and of each adapter, and the throughput of the mixed stream against
serving each task in turn with its adapter reloaded from disk and merged. Language models
also decode one batch in which each prompt uses its own adapter.

``--output-dir`` (default ``runs/<model>-multitask``) receives ``results.json``,
``curves.png`` (the mixed training stream), ``adapters/`` (the saved bank) and
``checkpoints/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python experiments/multitask.py`: import from the repo
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxlora
from experiments import data, finetune, report, tasks, training
from experiments.models.llama import generate

TASKS = {
    "bert": {"sentiment": "rotten_tomatoes", "subjectivity": "subjectivity"},
    "llama": {"hamlet": "hamlet", "debates": "debates"},
}
"""Per model family: task name -> dataset (`tasks.DATASETS`)."""
MAX_LOGIT_DIFF = 1e-5  # mixed batch vs the adapter alone


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (defaults: the first task's `tasks.BUDGETS`)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--model", default="minilm", help="minilm (default), smollm2, HF directory or .gguf")
    add("--rank", type=int, default=8, help="LoRA rank of both adapters (8)")
    add("--alpha", type=float, default=16.0, help="LoRA alpha (16)")
    add("--steps", type=int, help="optimizer steps of the mixed stream (300; llama 100)")
    add("--lr", type=float, help="peak learning rate (1e-3; llama 5e-4)")
    add("--batch-size", type=int, help="rows per mixed batch (16; llama 4)")
    add("--seq-len", type=int, help="tokens per example (64; llama 128)")
    add("--eval-every", type=int, help="steps between evaluations of the stream (100; llama 50)")
    add("--max-eval-examples", type=int, help="evaluate each task on its first N examples")
    add("--seed", type=int, default=0, help="seed of heads, adapters, batches, dropout (0)")
    add("--output-dir", type=Path, help="default: runs/<model>-multitask")
    return p.parse_args(argv)


def settings(args: argparse.Namespace, family: str) -> dict[str, Any]:
    """Every setting that changes the results, given or defaulted."""
    budget = tasks.BUDGETS[next(iter(TASKS[family].values()))]
    run = {
        "model": args.model,
        "tasks": TASKS[family],
        "rank": args.rank,
        "alpha": args.alpha,
        "targets": list(tasks.DEFAULT_TARGETS[family]),
        "steps": args.steps or budget.steps,
        "lr": args.lr or budget.lr_lora,
        "batch_size": args.batch_size or budget.batch_size,
        "seq_len": args.seq_len or budget.seq_len,
        "eval_every": args.eval_every or budget.eval_every,
        "max_eval_examples": args.max_eval_examples,
        "seed": args.seed,
    }
    for flag in ("steps", "batch_size", "seq_len", "eval_every", "max_eval_examples", "rank"):
        if run[flag] is not None and run[flag] < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer.")
    return run


# ----------------------------------------------------------------------------- the mixed stream


def _mixed_arrays(parts: Sequence[dict[str, np.ndarray]], repeat: bool) -> dict[str, np.ndarray]:
    """The tasks' arrays as one set, each row with its adapter id (task ``i`` has id ``i + 1``).

    ``repeat`` tiles the smaller sets to the largest one's size (training: as many rows of
    each task); otherwise the rows are interleaved, so that each batch mixes the tasks.
    """
    sizes = [data.dataset_size(p) for p in parts]
    picks = [np.resize(np.arange(n), max(sizes) if repeat else n) for n in sizes]
    ids = [np.full(len(p), i + 1, np.int32) for i, p in enumerate(picks)]
    order = np.argsort(np.concatenate([np.arange(len(p)) / len(p) for p in picks]), kind="stable")
    out = {
        k: np.concatenate([p[k][i] for p, i in zip(parts, picks, strict=True)])[order]
        for k in parts[0]
    }
    return {**out, "adapter": np.concatenate(ids)[order]}


def _per_row(fn: Callable) -> Callable:
    """A task function of ``(apply, params, batch, ...)`` run with each row's adapter."""

    def run(apply, params, batch, *rest):
        return fn(functools.partial(apply, adapter=batch["adapter"]), params, batch, *rest)

    return run


def mixed_task(named: dict[str, tasks.Task], bank: jaxlora.AdapterBank) -> tasks.Task:
    """One task whose rows are those of ``named`` (same model family), each with its adapter."""
    first = next(iter(named.values()))
    return dataclasses.replace(
        first,
        data_name="+".join(t.data_name for t in named.values()),
        params=bank,
        train=_mixed_arrays([t.train for t in named.values()], repeat=True),
        eval=_mixed_arrays([t.eval for t in named.values()], repeat=False),
        loss=_per_row(first.loss),
        eval_sums=_per_row(first.eval_sums),
        logits=_per_row(first.logits),
        sample=None,
    )


def bank_method(
    task: tasks.Task, bank_model: jaxlora.BankModel, bank: jaxlora.AdapterBank, run: dict
) -> training.Method:
    """Every adapter of the bank trains, each from its own rows of a mixed batch."""
    tx = jaxlora.optimizer(training.make_optimizer(run["lr"], run["steps"]), bank)
    step = jaxlora.make_train_step(
        functools.partial(task.loss, bank_model.apply),
        tx,
        skip_nonfinite=True,
        max_consecutive_skips=training.MAX_CONSECUTIVE_SKIPS,
    )
    sizes = {n: sum(x.size for x in jax.tree.leaves(t)) for n, t in bank.adapters.items()}
    base = sum(x.size for x in jax.tree.leaves(bank.base))
    return training.Method(
        "mixed",
        bank_model.apply,
        bank,
        step.init,
        step,
        step.skipped,
        lambda b: b,
        sum(sizes.values()),
        base + sum(sizes.values()),
        bank.config(bank.names[0]),
    )


# ----------------------------------------------------------------------------- evaluation


def _expand(rows: jax.Array, like: jax.Array) -> jax.Array:
    return rows.reshape(rows.shape + (1,) * (like.ndim - 1))


def compare_fn(logits: Callable, bank_model: jaxlora.BankModel, names: Sequence[str]) -> Callable:
    """Jitted ``compare(bank, merged, batch)``: per task (its rows of a mixed batch), the
    evaluation inputs of the mixed, alone and merged logits and the largest logit
    difference mixed vs alone.

    Args:
        logits: A task's ``logits(apply, params, batch)`` (`tasks.Task.logits`).
        bank_model: The bank's model.
        names: The adapters, in id order.
    """
    model = bank_model.model

    @jax.jit
    def compare(bank, merged, batch):
        mixed = logits(functools.partial(bank_model.apply, adapter=batch["adapter"]), bank, batch)
        out = {}
        for i, name in enumerate(names, start=1):
            lora_model = jaxlora.LoraModel(model, bank.config(name))
            alone = logits(lora_model.apply, bank.select(name), batch)
            folded = logits(model.apply, merged[name], batch)
            rows = batch["adapter"] == i
            diff = jnp.where(_expand(rows, mixed), jnp.abs(mixed - alone), 0.0)
            out[name] = {
                "outputs": {"mixed": mixed, "alone": alone, "merged": folded},
                "rows": rows,
                "max_abs_logit_diff": jnp.max(diff),
            }
        return out

    return compare


def evaluate_all(
    task: tasks.Task,
    sums_of: Callable,
    compare: Callable,
    bank: jaxlora.AdapterBank,
    merged: dict[str, Any],
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """Per task: its metric mixed / alone / merged, and the max logit difference, from one
    stream of mixed batches over every task's evaluation set (``task.eval``)."""
    sums: dict[str, dict[str, dict[str, float]]] = {}
    diffs = dict.fromkeys(bank.names, 0.0)
    batches = math.ceil(data.dataset_size(task.eval) / batch_size)
    stream = training.padded_batches(task.eval, batch_size)
    for batch in tqdm(stream, "eval mixed / alone / merged", batches, leave=False):
        for name, got in compare(bank, merged, batch).items():
            mine = {**batch, "weight": batch["weight"] * got["rows"]}
            for how, out in got["outputs"].items():
                into = sums.setdefault(name, {}).setdefault(how, {})
                for k, v in sums_of(out, mine).items():
                    into[k] = into.get(k, 0.0) + float(v)
            diffs[name] = max(diffs[name], float(got["max_abs_logit_diff"]))
    return {
        name: {
            **{
                f"{metric}_{how}": value
                for how, total in sums[name].items()
                for metric, value in tasks.metrics_of(total).items()
            },
            "examples": int(sums[name]["mixed"]["count"]),
            "max_abs_logit_diff": diffs[name],
        }
        for name in bank.names
    }


def _timed_stream(fn: Callable, batches: list[dict]) -> tuple[float, int]:
    """Seconds to run ``fn`` over ``batches`` (compiled first on one), and the real rows."""
    jax.block_until_ready(fn(batches[0]))
    start = time.perf_counter()
    for batch in batches:
        jax.block_until_ready(fn(batch))
    return time.perf_counter() - start, int(sum(b["weight"].sum() for b in batches))


def throughput(
    named: dict[str, tasks.Task],
    mixed: tasks.Task,
    bank_model: jaxlora.BankModel,
    bank: jaxlora.AdapterBank,
    saved: Path,
    batch_size: int,
) -> dict[str, float]:
    """Examples per second over every task's evaluation set, served three ways: one stream
    of mixed batches; each task's batches in turn by adapter id (the bank, no reload); each
    task in turn with its adapter reloaded from disk and merged into plain params."""
    logits = next(iter(named.values())).logits
    model = bank_model.model
    stream = list(training.padded_batches(mixed.eval, batch_size))
    by_task = {n: list(training.padded_batches(t.eval, batch_size)) for n, t in named.items()}
    mixed_fn = jax.jit(
        lambda b, x: logits(functools.partial(bank_model.apply, adapter=x["adapter"]), b, x)
    )
    by_id = jax.jit(lambda b, x, i: logits(functools.partial(bank_model.apply, adapter=i), b, x))
    plain = jax.jit(lambda p, x: logits(model.apply, p, x))
    seconds, rows = _timed_stream(lambda x: mixed_fn(bank, x), stream)
    out = {"mixed_ex_per_s": rows / seconds}
    seconds = 0.0
    for name, batches in by_task.items():
        i = jnp.int32(bank.index(name))
        seconds += _timed_stream(lambda x, i=i: by_id(bank, x, i), batches)[0]
    out["switch_by_id_ex_per_s"] = rows / seconds
    jax.block_until_ready(plain(bank.base, stream[0]))  # compiled before the clock starts
    start = time.perf_counter()
    for name, batches in by_task.items():
        _, adapted = jaxlora.load_adapter(saved / name, bank.base)
        merged = jaxlora.merge(adapted, jnp.float32)
        for batch in batches:
            jax.block_until_ready(plain(merged, batch))
    out["reload_merge_ex_per_s"] = rows / (time.perf_counter() - start)
    return out


@dataclasses.dataclass(frozen=True)
class _Routed:
    """A model whose ``apply`` takes ``{"params": (bank, ids)}``: `generate` with an adapter
    per row (its params argument is the only traced one)."""

    bank_model: jaxlora.BankModel

    def apply(self, variables: dict, *args: Any, **kwargs: Any) -> Any:
        bank, ids = variables["params"]
        return self.bank_model.apply({"params": bank}, *args, adapter=ids, **kwargs)


def generations(
    named: dict[str, tasks.Task],
    bank_model: jaxlora.BankModel,
    bank: jaxlora.AdapterBank,
    tokenizer: Any,
) -> list[dict[str, str]]:
    """One batch of greedy continuations: each task's first held-out prompt with its own
    adapter, then with the base model, decoded together."""
    prompts = [t.eval["tokens"][0, : tasks.PROMPT_TOKENS] for t in named.values()]
    rows = [(n, p, n) for n, p in zip(named, prompts, strict=True)]
    rows += [(n, p, jaxlora.AdapterBank.BASE) for n, p in zip(named, prompts, strict=True)]
    ids = jnp.asarray([bank.index(a) for _, _, a in rows], jnp.int32)
    batch = np.stack([p for _, p, _ in rows])
    eos = bank_model.model.config.eos_token_id
    eos = eos if isinstance(eos, int) else None
    out = generate(
        _Routed(bank_model),
        (bank, ids),
        batch,
        np.full(len(rows), batch.shape[1]),
        tasks.SAMPLE_TOKENS,
        eos,
    )
    return [
        {"prompt_of": n, "adapter": a, "text": tokenizer.decode(p.tolist() + o.tolist())}
        for (n, p, a), o in zip(rows, np.asarray(out), strict=True)
    ]


# ----------------------------------------------------------------------------- the run


def format_table(results: dict[str, Any]) -> str:
    """The closing table: per task the metric three ways, the logit difference, the bytes."""
    metric, names = results["metric"], list(results["settings"]["tasks"])
    fmt = "{:.2%}" if metric == "accuracy" else "{:.2f}"
    rows = [("", *names)]
    for how in ("mixed", "alone", "merged"):
        rows.append(
            (f"{metric} {how}", *(fmt.format(results[n][f"{metric}_{how}"]) for n in names))
        )
    rows.append(
        ("max |logit| mixed-alone", *(f"{results[n]['max_abs_logit_diff']:.1e}" for n in names))
    )
    rows.append(("adapter bytes", *(f"{results['adapter_param_bytes'][n]:,}" for n in names)))
    rows.append(("base bytes", f"{results['base_param_bytes']:,}", ""))
    t = results["throughput"]
    rows.append(("mixed batches", f"{t['mixed_ex_per_s']:,.1f} ex/s", "one stream, both tasks"))
    rows.append(("switch by id", f"{t['switch_by_id_ex_per_s']:,.1f} ex/s", "task by task"))
    rows.append(("reload + merge", f"{t['reload_merge_ex_per_s']:,.1f} ex/s", "task by task"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join([results["title"], *lines])


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def run(args: argparse.Namespace) -> int:
    """Trains, saves, reloads and evaluates both adapters (see the module docstring)."""
    wall = time.perf_counter()
    pretrained = tasks.load_pretrained(args.model)
    run_settings = settings(args, pretrained.family)
    output_dir = args.output_dir or Path("runs") / f"{pretrained.name}-multitask"
    head_key, lora_key, rng = jax.random.split(jax.random.key(run_settings["seed"]), 3)
    batch_size, seq_len = run_settings["batch_size"], run_settings["seq_len"]
    named = {
        name: training.fit_task(
            tasks.build_task(pretrained, data_name, seq_len, head_key),
            batch_size,
            run_settings["max_eval_examples"],
            None,
        )
        for name, data_name in run_settings["tasks"].items()
    }
    first = next(iter(named.values()))
    example = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    bank = first.params  # every task starts from the same base (and the same new head)
    for i, (name, task) in enumerate(named.items()):
        config = jaxlora.LoraConfig(
            rank=run_settings["rank"],
            alpha=run_settings["alpha"],
            targets=run_settings["targets"],
            modules_to_save=task.modules_to_save,
        )
        key = jax.random.fold_in(lora_key, i)
        bank_model, bank = jaxlora.lorafy(task.model, bank, config, example, key=key, name=name)
    print(jaxlora.summary(bank))
    mixed = mixed_task(named, bank)
    method = bank_method(mixed, bank_model, bank, run_settings)
    schedule = training.Schedule(
        steps=run_settings["steps"],
        batch_size=batch_size,
        eval_every=run_settings["eval_every"],
        save_every=run_settings["steps"],
        stop_at=None,
    )
    finetune.prepare_output(output_dir, False, run_settings)  # settings.json, old checkpoints
    state = training.initial_state(method, run_settings["seed"], rng, None)
    with jaxlora.TrainCheckpointer(output_dir / "checkpoints", max_to_keep=1) as checkpointer:
        state, times = training.train(
            mixed, method, schedule, state, checkpointer, training.batch_feeder(None)
        )
    saved = output_dir / "adapters"
    jaxlora.save_bank(saved, state.params)
    bank = jaxlora.load_bank(saved, first.params)  # as a server would: the base + the files
    merged = {name: jaxlora.merge(bank, jnp.float32, adapters=name) for name in bank.names}
    compare = compare_fn(first.logits, bank_model, bank.names)
    per_task = evaluate_all(mixed, first.sums_of, compare, bank, merged, batch_size)
    nbytes = bank.nbytes()
    results = {
        "title": f"{pretrained.name}: {' + '.join(named)}, one adapter each, "
        f"{run_settings['steps']} mixed steps",
        "date": datetime.date.today().isoformat(),
        "settings": run_settings,
        "metric": first.metric,
        **{
            name: {
                **per_task[name],
                "adapter_param_bytes": nbytes[name],
                "saved_bytes": report.directory_bytes(saved / name),
            }
            for name in bank.names
        },
        "base_param_bytes": nbytes["base"],
        "adapter_param_bytes": {name: nbytes[name] for name in bank.names},
        "throughput": throughput(named, mixed, bank_model, bank, saved, batch_size),
        "step_time_median_s": training.median_step_time(times),
        "trainable_params": method.trainable_params,
        "total_params": method.total_params,
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "jax": jax.__version__,
        },
        "history": {"train_loss": state.history["train_loss"], "eval": state.history["eval"]},
    }
    if first.sample is not None:
        results["generations"] = generations(named, bank_model, bank, pretrained.tokenizer)
        for g in results["generations"]:
            print(f"[{g['prompt_of']} prompt, adapter {g['adapter']}] {g['text']!r}")
    results["wall_time_s"] = time.perf_counter() - wall
    report.write_json(output_dir / "results.json", results)
    report.plot_curves(
        output_dir / "curves.png", results["history"], first.metric, results["title"]
    )
    print(format_table(results))
    print(f"written: {output_dir / 'results.json'}, {output_dir / 'curves.png'}, {saved}")
    worst = max(per_task[n]["max_abs_logit_diff"] for n in bank.names)
    if worst > MAX_LOGIT_DIFF:
        print(
            f"error: mixed batches and the adapters alone differ by {worst:.2e} in their "
            f"logits (more than {MAX_LOGIT_DIFF:g})",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; bad input prints ``error: ...`` (one line) and returns 2."""
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"error: {finetune.one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
