"""JAX benchmark runners: linen full fine-tuning and floor, Flax NNX (LoRA, full), base forward.

Each runner takes ``(setting, workload)`` and returns a :class:`Measurement`. The helpers here
(model setup, functional train step, timing, FLOP count) are reused by ``bench_jaxlora.py``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx

from experiments import gpt2, gpt2_einsum
from experiments.bench_common import (
    FLOOR_PARAM,
    LEARNING_RATE,
    TARGETS,
    WEIGHT_DECAY,
    Measurement,
    Workload,
    array_counts,
    stored_bytes,
    time_calls,
    token_batch,
)

Batch = tuple[jax.Array, jax.Array]
LossFn = Callable[[Any, Batch], jax.Array]


def adamw() -> optax.GradientTransformation:
    """The optimizer every JAX row uses."""
    return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def model_config(w: Workload) -> gpt2.GPT2Config:
    """The model dimensions of workload ``w``."""
    return gpt2.GPT2Config(w.vocab, w.d_model, w.layers, w.heads, w.mlp, w.seq, w.attention)


def linen_model(w: Workload) -> nn.Module:
    """The linen model ``w.model`` names (see ``bench_common.MODELS``)."""
    c = model_config(w)
    if w.model == "gpt2":
        return gpt2.GPT2(c)
    if w.model == "gpt2-einsum":
        return gpt2_einsum.GPT2(c)
    if w.model == "gpt2-moe":
        return gpt2_einsum.GPT2(c, gpt2_einsum.MoEConfig(w.experts, w.top_k))
    raise ValueError(f"unknown model {w.model!r}; choose one of gpt2, gpt2-einsum, gpt2-moe")


def device_batch(w: Workload) -> Batch:
    """:func:`token_batch` as JAX arrays."""
    tokens, targets = token_batch(w)
    return jnp.asarray(tokens), jnp.asarray(targets)


def init_linen(w: Workload) -> tuple[nn.Module, Any]:
    """The linen model (:func:`linen_model`) and its randomly initialised ``params``."""
    model = linen_model(w)
    tokens, _ = device_batch(w)
    return model, jax.jit(model.init)(jax.random.key(0), tokens)["params"]


def linen_loss(model: Any) -> LossFn:
    """``loss_fn(params, (tokens, targets))`` for a linen model (base or LoRA-fied)."""

    def loss_fn(params: Any, batch: Batch) -> jax.Array:
        tokens, targets = batch
        return gpt2.cross_entropy(model.apply({"params": params}, tokens), targets)

    return loss_fn


def param_count(tree: Any) -> int:
    """Number of array elements in a pytree."""
    return array_counts(jax.tree.leaves(tree))[0]


def xla_gflops(jitted: Any, *args: Any) -> float | None:
    """XLA's FLOP count (GFLOP) of ``jitted`` compiled for ``args``; ``None`` if not lowerable."""
    if not hasattr(jitted, "lower"):
        return None
    return jitted.lower(*args).compile().cost_analysis()["flops"] / 1e9


class FunctionalRun(NamedTuple):
    """A functional training setup: its step and initial state, and what to report.

    Attributes:
        step: Jitted ``(params, opt_state, batch) -> (params, opt_state, loss)``; it may
            donate ``params`` and ``opt_state``.
        params: Initial parameters.
        opt_state: Initial optimizer state.
        trainable: Trainable parameter count.
        total: Total parameter count.
        base_bytes: Bytes of the model's own parameters as stored (adapters left out).
    """

    step: Callable
    params: Any
    opt_state: Any
    trainable: int
    total: int
    base_bytes: int


def measure_functional(run: FunctionalRun, w: Workload) -> Measurement:
    """Measures ``run.step``, carrying the state from step to step.

    Each timed step blocks on the loss only: all outputs of one XLA execution become ready
    together (blocking on the new params afterwards returns at once).

    Returns:
        The measurement, with the optimizer state counted before ``step`` donates it.
    """
    batch = device_batch(w)
    gflops = xla_gflops(run.step, run.params, run.opt_state, batch)
    floats, scalars = array_counts(jax.tree.leaves(run.opt_state))
    state = (run.params, run.opt_state)

    def call() -> None:
        nonlocal state
        *new_state, loss = run.step(*state, batch)
        state = tuple(new_state)
        loss.block_until_ready()

    times = time_calls(call, w)
    return Measurement(times, run.total, run.trainable, floats, scalars, gflops, run.base_bytes)


def measure_forward(model: Any, params: Any, w: Workload) -> Measurement:
    """Measures the jitted forward pass ``model.apply({"params": params}, tokens)``."""
    forward = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens))
    tokens, _ = device_batch(w)
    gflops = xla_gflops(forward, params, tokens)
    times = time_calls(lambda: forward(params, tokens).block_until_ready(), w)
    return Measurement(times, param_count(params), gflops=gflops)


def full_train_step(loss_fn: LossFn, tx: optax.GradientTransformation) -> Callable:
    """Jitted full fine-tuning step; donates params and optimizer state."""

    def step(params: Any, opt_state: Any, batch: Batch) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def linen_full(setting: str, w: Workload) -> FunctionalRun:
    """``jax-full``: every linen weight trains with ``optax.adamw``."""
    del setting  # always "full"
    model, params = init_linen(w)
    tx = adamw()
    n, base = param_count(params), stored_bytes(jax.tree.leaves(params))
    step = full_train_step(linen_loss(model), tx)
    return FunctionalRun(step, params, tx.init(params), n, n, base)


def floor_train_step(loss_fn: LossFn, tx: optax.GradientTransformation) -> Callable:
    """Jitted step that differentiates and updates only ``params[FLOOR_PARAM]``.

    Every layer's activation gradient is computed on the way back to the position table,
    but no weight gradient of any other parameter: the work a LoRA step cannot avoid.
    """

    def step(params: Any, opt_state: Any, batch: Batch) -> tuple[Any, Any, jax.Array]:
        def loss_of(trained: jax.Array) -> jax.Array:
            return loss_fn({**params, FLOOR_PARAM: trained}, batch)

        trained = params[FLOOR_PARAM]
        loss, grads = jax.value_and_grad(loss_of)(trained)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return {**params, FLOOR_PARAM: optax.apply_updates(trained, updates)}, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def linen_floor(setting: str, w: Workload) -> FunctionalRun:
    """``jax-floor``: the linen model with only the position table training."""
    del setting  # always FROZEN
    model, params = init_linen(w)
    tx = adamw()
    return FunctionalRun(
        floor_train_step(linen_loss(model), tx),
        params,
        tx.init(params[FLOOR_PARAM]),
        param_count(params[FLOOR_PARAM]),
        param_count(params),
        stored_bytes(jax.tree.leaves(params)),
    )


def measured(setup: Callable[[str, Workload], FunctionalRun]) -> Callable[..., Measurement]:
    """The benchmark runner that measures the run ``setup(setting, w)`` builds."""
    return lambda setting, w: measure_functional(setup(setting, w), w)


def run_forward_base(setting: str, w: Workload) -> Measurement:
    """``fwd-base``: forward pass of the plain linen model."""
    del setting  # always "full": no adapters
    return measure_forward(*init_linen(w), w)


def nnx_train_step(wrt: type[nnx.Variable]) -> Callable:
    """``nnx.jit`` step differentiating (and updating) only variables of type ``wrt``."""

    @nnx.jit(donate_argnums=(0, 1))
    def step(model: gpt2.NNXGPT2, optimizer: nnx.Optimizer, batch: Batch) -> jax.Array:
        tokens, targets = batch

        def loss_fn(m: gpt2.NNXGPT2) -> jax.Array:
            return gpt2.cross_entropy(m(tokens), targets)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    return step


def measure_nnx(
    model: nnx.Module,
    wrt: type[nnx.Variable],
    w: Workload,
    adapters: type[nnx.Variable] = nnx.LoRAParam,
) -> Measurement:
    """Measures :func:`nnx_train_step` on ``model``, training the variables of type ``wrt``;
    the parameters of type ``adapters`` are left out of the base's bytes."""
    optimizer = nnx.Optimizer(model, adamw(), wrt=wrt)
    step = nnx_train_step(wrt)
    batch = device_batch(w)
    gflops = xla_gflops(step, model, optimizer, batch)
    floats, scalars = array_counts(jax.tree.leaves(nnx.state(optimizer)))
    times = time_calls(lambda: step(model, optimizer, batch).block_until_ready(), w)
    total = param_count(nnx.state(model, nnx.Param))  # LoRA variables subclass nnx.Param
    base = stored_bytes(jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(adapters)))))
    trainable = param_count(nnx.state(model, wrt))
    return Measurement(times, total, trainable, floats, scalars, gflops, base)


def run_nnx(setting: str, w: Workload) -> Measurement:
    """``nnx-lora`` (``nnx.LoRALinear`` on the setting's targets) or ``nnx-full``."""
    targets = TARGETS.get(setting, ())
    model = gpt2.NNXGPT2(model_config(w), targets, w.rank, nnx.Rngs(0))
    return measure_nnx(model, nnx.LoRAParam if targets else nnx.Param, w)


RUNNERS = {
    "jax-full": measured(linen_full),
    "jax-floor": measured(linen_floor),
    "nnx-lora": run_nnx,
    "nnx-full": run_nnx,
    "fwd-base": run_forward_base,
}
