"""The training loop of ``experiments/finetune.py``: LoRA or full fine-tuning, evaluation, resume.

A run's whole state is (params, optimizer state, step, RNG key, batch-iterator state) plus its
history of losses and metrics; `jaxlora.TrainCheckpointer` saves all of it (the history and the
batch state as JSON), so a resumed run continues bit-identically: batches come from the saved
iterator state, dropout keys from the saved key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

import jaxlora
from experiments import data, tasks
from experiments.tasks import Apply, Params, Task

WARMUP_FRACTION, WEIGHT_DECAY, MAX_GRAD_NORM = 0.1, 0.01, 1.0
MAX_CONSECUTIVE_SKIPS = 100  # non-finite steps in a row after which optax applies them anyway


@dataclasses.dataclass(frozen=True)
class Method:
    """How a task's params train.

    Attributes:
        name: ``"lora"`` or ``"full"``.
        apply: ``lora_model.apply`` or ``model.apply``.
        params: Initial params (the adapted tree for LoRA).
        init: ``init(params) -> opt_state``, the optimizer state ``step`` takes.
        step: Jitted ``step(params, opt_state, batch, rng) -> (params, opt_state, loss)``;
            donates ``params`` and ``opt_state``.
        skipped: ``skipped(opt_state) -> int``, the steps skipped for non-finite gradients
            (None when they are not skipped).
        plain: Maps trained params to params of the original model (`jaxlora.merge` for LoRA).
        trainable_params: Number of parameters the optimizer updates.
        total_params: Number of parameters, adapters included.
        lora_config: The LoRA config (None for full fine-tuning).
        summary: What `jaxlora.lorafy` adapted and what it saw and left (LoRA only).
    """

    name: str
    apply: Apply
    params: Params
    init: Callable[[Params], optax.OptState]
    step: Callable[..., tuple[Params, optax.OptState, jax.Array]]
    skipped: Callable[[optax.OptState], int] | None
    plain: Callable[[Params], Params]
    trainable_params: int
    total_params: int
    lora_config: jaxlora.LoraConfig | None = None
    summary: jaxlora.Summary | None = None


def fit_task(task: Task, batch_size: int, max_eval_examples: int | None, mesh: Mesh | None) -> Task:
    """Checks the batch size against the data, trims the evaluation set, places the params.

    Args:
        task: The task.
        batch_size: Examples per step.
        max_eval_examples: Keep only this many evaluation examples (None: all).
        mesh: Place the params on this mesh (sharded by ``task.tensor_parallel`` over a
            ``model`` axis, else replicated); None leaves them where they are.

    Returns:
        The adjusted task.

    Raises:
        ValueError: If the batch is larger than the training set.
    """
    n = data.dataset_size(task.train)
    if batch_size > n:
        raise ValueError(
            f"--batch-size {batch_size} is larger than the {n} training examples of "
            f"{task.data_name}; use --batch-size {n} or less."
        )
    evaluation = {k: v[:max_eval_examples] for k, v in task.eval.items()}
    params = task.params
    if mesh is not None:
        specs = task.tensor_parallel if "model" in mesh.axis_names else ()
        params = jaxlora.shard_params(params, mesh, specs)
    return dataclasses.replace(task, eval=evaluation, params=params)


def _schedule(lr: float, steps: int) -> optax.Schedule:
    warmup = max(1, math.ceil(WARMUP_FRACTION * steps))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))


def make_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping, linear warmup and cosine decay to zero.

    Args:
        lr: Peak learning rate.
        steps: Total steps of the run (the schedule's length).

    Returns:
        The optimizer.
    """
    return optax.chain(
        optax.clip_by_global_norm(MAX_GRAD_NORM),
        optax.adamw(_schedule(lr, steps), weight_decay=WEIGHT_DECAY),
    )


def make_loraplus_optimizer(
    lr: float, steps: int, ratio: float
) -> Callable[[Any], optax.GradientTransformation]:
    """`make_optimizer` with LoRA+ learning-rate groups, for the adapted params it is given.

    Args:
        lr: Peak learning rate of the A factors (B's is ``ratio`` times it).
        steps: Total steps of the run.
        ratio: LoRA+'s B-to-A learning-rate ratio.

    Returns:
        ``params -> optimizer``: gradients clipped over all trainable leaves together, then
        AdamW per group (`jaxlora.optimizer` with ``loraplus_lr_ratio``).
    """

    def build(params: Any) -> optax.GradientTransformation:
        adamw = functools.partial(optax.adamw, weight_decay=WEIGHT_DECAY)
        groups = jaxlora.optimizer(
            adamw, params, learning_rate=_schedule(lr, steps), loraplus_lr_ratio=ratio
        )
        return optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM), groups)

    return build


def lora_method(
    task: Task,
    config: jaxlora.LoraConfig,
    tx: optax.GradientTransformation | Callable[[Any], optax.GradientTransformation],
    seq_len: int,
    key,
    skip_nonfinite: bool,
) -> Method:
    """Adapts the task's model with LoRA; only adapters and ``modules_to_save`` train.

    Args:
        task: The task.
        config: Which layers to adapt, rank and alpha.
        tx: The optimizer (masked here to the trainable leaves), or a function building
            it from the adapted params (`make_loraplus_optimizer`).
        seq_len: Tokens per example, for the abstract trace that finds the layers.
        key: PRNG key for the A factors.
        skip_nonfinite: Skip steps with non-finite gradients (`jaxlora.make_train_step`'s
            ``skip_nonfinite``).

    Returns:
        The method.

    Raises:
        ValueError: If a target matches no layer (the message lists the layers).
    """
    example = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    lora_model, params = jaxlora.lorafy(task.model, task.params, config, example, key=key)
    tx = (
        jaxlora.optimizer(tx, params)
        if isinstance(tx, optax.GradientTransformation)
        else tx(params)
    )
    step = jaxlora.make_train_step(
        functools.partial(task.loss, lora_model.apply),
        tx,
        skip_nonfinite=skip_nonfinite,
        max_consecutive_skips=MAX_CONSECUTIVE_SKIPS,
    )
    counts = jaxlora.summary(params, lora_model)
    return Method(
        "lora",
        lora_model.apply,
        params,
        step.init,
        step,
        step.skipped if skip_nonfinite else None,
        jaxlora.merge,
        counts.trainable_params,
        counts.total_params,
        config,
        counts,
    )


def full_method(task: Task, tx: optax.GradientTransformation, skip_nonfinite: bool) -> Method:
    """Full fine-tuning: plain optax over every parameter.

    Args:
        task: The task.
        tx: The optimizer.
        skip_nonfinite: Skip steps with non-finite gradients (``optax.apply_if_finite``).

    Returns:
        The method.
    """
    skipped = None
    if skip_nonfinite:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=MAX_CONSECUTIVE_SKIPS)

        def skipped(opt_state):
            return int(jax.device_get(opt_state.total_notfinite))

    loss_fn = functools.partial(task.loss, task.model.apply)

    def step(params, opt_state, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    size = sum(x.size for x in jax.tree.leaves(task.params))
    jitted = jax.jit(step, donate_argnums=(0, 1))
    return Method(
        "full", task.model.apply, task.params, tx.init, jitted, skipped, lambda p: p, size, size
    )


Feed = Callable[[Mapping[str, np.ndarray]], Mapping[str, jax.Array]]
"""Puts a host batch (every process holds the whole batch) on the devices."""


def batch_feeder(mesh: Mesh | None) -> Feed:
    """How batches reach the devices: as they are, or split over the mesh's ``data`` axis.

    Args:
        mesh: None (one device), or a mesh with a ``data`` axis.

    Returns:
        The feed; on a mesh each process passes its contiguous slice of the batch to
        `jaxlora.shard_batch`.

    Raises:
        ValueError: If the mesh has no ``data`` axis.
    """
    if mesh is None:
        return lambda batch: batch
    if "data" not in mesh.axis_names:
        raise ValueError(
            f"--mesh has axes {tuple(mesh.axis_names)} but no 'data' axis to split batches "
            "over; add one (data=1 keeps every batch whole), e.g. data=1,model=4."
        )

    def feed(batch):
        here, processes = jax.process_index(), jax.process_count()
        local = {k: np.array_split(v, processes)[here] for k, v in batch.items()}
        return jaxlora.shard_batch(local, mesh, "data")

    return feed


def padded_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict]:
    """Every row once, in order, in equally shaped batches (the last one padded).

    Args:
        arrays: Equally long arrays ``(n, ...)``.
        batch_size: Rows per batch.

    Yields:
        The arrays' rows plus ``weight`` ``(batch_size,)`` float32: 1 for real rows, 0 for
        padding (copies of row 0).
    """
    n = data.dataset_size(arrays)
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size)
        real = rows < n
        picked = np.where(real, rows, 0)
        yield {**{k: v[picked] for k, v in arrays.items()}, "weight": real.astype(np.float32)}


def evaluate(
    eval_fn: Callable[[Params, Mapping], Mapping[str, jax.Array]],
    params: Params,
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    feed: Feed,
) -> dict[str, float]:
    """Metrics over a whole evaluation set.

    Args:
        eval_fn: Jitted ``task.eval_sums`` with ``apply`` bound.
        params: The params to evaluate.
        arrays: The evaluation set.
        batch_size: Rows per forward pass.
        feed: Puts a batch on the devices.

    Returns:
        ``tasks.metrics_of`` of the summed statistics.
    """
    totals: dict[str, float] = {}
    batches = math.ceil(data.dataset_size(arrays) / batch_size)
    for batch in tqdm(padded_batches(arrays, batch_size), "eval", batches, leave=False):
        for name, value in eval_fn(params, feed(batch)).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return tasks.metrics_of(totals)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When a run evaluates, checkpoints and stops.

    Attributes:
        steps: Total steps.
        batch_size: Examples per step (and per evaluation forward pass).
        eval_every: Steps between evaluations (also at step 0 and at the end).
        save_every: Steps between checkpoints (also where the run stops).
        stop_at: Stop after this step (a later ``--resume`` continues); None runs to the end.
    """

    steps: int
    batch_size: int
    eval_every: int
    save_every: int
    stop_at: int | None = None

    @property
    def last_step(self) -> int:
        """The step this process stops after."""
        return self.steps if self.stop_at is None else min(self.stop_at, self.steps)


@dataclasses.dataclass
class RunState:
    """Everything a checkpoint holds.

    Attributes:
        step: Steps done.
        params: The params (adapted tree for LoRA).
        opt_state: The optimizer state.
        rng: Key the next dropout keys are split from.
        batches: ``data.next_batch`` state.
        history: ``{"train_loss": [[step, loss], ...], "eval": [{"step", metrics...}],
            "samples": {"before"/"after": text}}``, JSON.
    """

    step: int
    params: Params
    opt_state: optax.OptState
    rng: jax.Array
    batches: data.BatchState
    history: dict[str, Any]


def _committed(tree: Any, mesh: Mesh | None) -> Any:
    """Commits the uncommitted arrays of ``tree`` (to the first device, or replicated on ``mesh``).

    ``jit`` compiles anew when the same arguments come back committed, as a step's outputs
    do, after a first call that mixed committed and uncommitted ones (as `jaxlora.lorafy`
    and ``tx.init`` return, and as a restored checkpoint is).
    """
    if mesh is None:
        place = functools.partial(jax.device_put, device=jax.devices()[0])
    else:  # a jitted copy also replicates a host-local array over the devices of all processes
        place = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))
    return jax.tree.map(lambda x: x if x.committed else place(x), tree)


def initial_state(method: Method, seed: int, rng: jax.Array, mesh: Mesh | None) -> RunState:
    """The state before the first step, with every array committed to its devices.

    Args:
        method: How the params train.
        seed: Seed of the batch order.
        rng: Key of the dropout keys.
        mesh: The device mesh, or None for one device.

    Returns:
        The state at step 0.
    """
    history = {"train_loss": [], "eval": [], "samples": {}}
    opt_state = method.init(method.params)
    params, opt_state, rng = _committed((method.params, opt_state, rng), mesh)
    return RunState(0, params, opt_state, rng, data.init_batch_state(seed), history)


def _saved_view(method: Method, params: Params) -> Params:
    """What the checkpointer sees: full fine-tuning marks every leaf trainable."""
    return params if method.lora_config else jax.tree.map(jaxlora.Trainable, params)


def _unmarked(method: Method, params: Params) -> Params:
    if method.lora_config:
        return params
    return jax.tree.map(
        lambda t: t.value, params, is_leaf=lambda x: isinstance(x, jaxlora.Trainable)
    )


def save_state(checkpointer: jaxlora.TrainCheckpointer, method: Method, state: RunState) -> None:
    """Starts an asynchronous checkpoint of ``state``.

    Args:
        checkpointer: Where to save.
        method: How the params train (full fine-tuning saves every leaf).
        state: The state.
    """
    history = copy.deepcopy(state.history)  # saved in the background while training goes on
    meta = {"batches": dict(state.batches), "history": history}
    params = _saved_view(method, state.params)
    checkpointer.save(state.step, params, state.opt_state, state.rng, meta, force=True)


def restore_state(
    checkpointer: jaxlora.TrainCheckpointer, method: Method, fresh: RunState
) -> RunState:
    """The newest checkpoint, restored into the placement of a fresh state.

    Args:
        checkpointer: Where the run saved.
        method: How the params train.
        fresh: The state of a new run (templates and frozen leaves).

    Returns:
        The restored state.

    Raises:
        ValueError: If there is no checkpoint, or it does not fit the method.
    """
    template = _saved_view(method, fresh.params)
    resumed = checkpointer.restore_latest(template, fresh.opt_state)
    if resumed is None:
        raise ValueError(
            f"--resume: no checkpoint in {checkpointer.directory}; start without --resume."
        )
    params = _unmarked(method, resumed.params)
    batches = data.BatchState(**resumed.data_state["batches"])
    history = resumed.data_state["history"]
    return RunState(resumed.step, params, resumed.opt_state, resumed.rng, batches, history)


class Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM (preemption) as a request to stop at the next step boundary.

    A context manager: inside it the first of these signals only records itself, and
    `train` finishes the step in flight, checkpoints and returns; a second one stops the
    process at once, unsaved (the signal's default action). On exit the previous handlers
    are back. Signal handlers belong to the main thread, so enter it there.

    Attributes:
        signum: The signal this process received, or None.
        stopped: Whether `requested` said yes (in a multi-process run, on every process).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stopped = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing the step in flight, then saving a "
            "checkpoint (send it again to stop at once, unsaved)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self) -> bool:
        """Whether to stop now; every process of a multi-process run must call it together.

        Returns:
            True if a signal arrived (in any process of the run).
        """
        asked = self.signum is not None
        if jax.process_count() > 1:
            asked = bool(multihost_utils.process_allgather(np.int32(asked)).any())
        self.stopped = self.stopped or asked
        return asked

    @property
    def exit_status(self) -> int:
        """The shell's status for a process ended by the signal: 128 + its number."""
        return 128 + (self.signum or signal.SIGTERM)


def _evaluate_into(
    bar: tqdm, task: Task, eval_fn: Callable, state: RunState, batch_size: int, feed: Feed
) -> None:
    metrics = evaluate(eval_fn, state.params, task.eval, batch_size, feed)
    state.history["eval"].append({"step": state.step, **metrics})
    bar.write(f"step {state.step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _sample_into(task: Task, method: Method, state: RunState, when: str) -> None:
    if task.sample is not None:
        state.history["samples"][when] = task.sample(method.plain(state.params))


def train(
    task: Task,
    method: Method,
    schedule: Schedule,
    state: RunState,
    checkpointer: jaxlora.TrainCheckpointer,
    feed: Feed,
    interrupt: Interrupt | None = None,
) -> tuple[RunState, list[float]]:
    """Trains from ``state`` to ``schedule.last_step``, evaluating and checkpointing.

    Evaluates (and, for language models, samples) at step 0 and at the end, and evaluates
    every ``eval_every`` steps; saves every ``save_every`` steps and at ``last_step``. A
    progress bar shows the loss and the throughput of the last step. When ``interrupt``
    is requested, it saves the state at the step reached (unless that step is already
    saved) and returns before the next step.

    Args:
        task: The task.
        method: How the params train.
        schedule: Steps, batch size, evaluation and checkpoint cadence.
        state: Where to start (fresh or restored); updated in place.
        checkpointer: Where to save.
        feed: Puts batches on the devices.
        interrupt: Checked between steps (None: never stop early).

    Returns:
        ``(final state, wall time of each step this process ran)``; the first time includes
        compilation.
    """
    eval_fn = jax.jit(functools.partial(task.eval_sums, method.apply))
    times: list[float] = []
    saved = checkpointer.latest_step
    with tqdm(total=schedule.steps, initial=state.step, desc=method.name, unit="step") as bar:
        if state.step == 0 and not state.history["eval"]:
            _evaluate_into(bar, task, eval_fn, state, schedule.batch_size, feed)
            _sample_into(task, method, state, "before")
        while state.step < schedule.last_step:
            if interrupt is not None and interrupt.requested():
                if saved != state.step:
                    save_state(checkpointer, method, state)
                break
            batch, state.batches = data.next_batch(task.train, state.batches, schedule.batch_size)
            state.rng, dropout_rng = jax.random.split(state.rng)
            start = time.perf_counter()
            state.params, state.opt_state, loss = method.step(
                state.params, state.opt_state, feed(batch), dropout_rng
            )
            loss = float(loss)
            times.append(time.perf_counter() - start)
            state.step += 1
            state.history["train_loss"].append([state.step, loss])
            rate = schedule.batch_size * task.units_per_example / times[-1]
            bar.set_postfix({"loss": f"{loss:.4f}", f"{task.unit}/s": f"{rate:,.0f}"})
            bar.update()
            if state.step % schedule.eval_every == 0 or state.step == schedule.steps:
                _evaluate_into(bar, task, eval_fn, state, schedule.batch_size, feed)
            if state.step % schedule.save_every == 0 or state.step == schedule.last_step:
                save_state(checkpointer, method, state)
                saved = state.step
    if state.step == schedule.steps:
        _sample_into(task, method, state, "after")
    return state, times


def median_step_time(times: list[float]) -> float | None:
    """Median wall time per step after compilation (the first step of a process compiles).

    Args:
        times: Wall time of each step this process ran.

    Returns:
        Seconds per step, or None with fewer than two steps.
    """
    return statistics.median(times[1:]) if len(times) > 1 else None
