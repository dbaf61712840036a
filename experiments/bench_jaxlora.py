"""jaxlora benchmark runners: LoRA training (linen and NNX), unmerged forward, merged forward.

Kept apart from ``bench_jax.py`` so that while the library is broken or incomplete only these
rows fail (the harness reports the import error as an error row).
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

import jaxlora
from experiments import gpt2
from experiments.bench_common import (
    TARGETS,
    Measurement,
    Workload,
    adapter_ids,
    stored_bytes,
    time_calls,
    time_switches,
)
from experiments.bench_jax import (
    FunctionalRun,
    adamw,
    device_batch,
    init_linen,
    linen_loss,
    measure_forward,
    measure_nnx,
    measured,
    model_config,
    param_count,
    xla_gflops,
)


def lora_config(setting: str, w: Workload) -> jaxlora.LoraConfig:
    """The jaxlora config of ``setting`` (``"qv"`` or ``"all"``).

    On ``gpt2-moe``, ``"all"`` also adapts each ``router`` (at rank at most ``w.experts``, its
    output width); ``up``/``down`` name the expert weights there.
    """
    if w.model == "gpt2-moe" and setting == "all":
        return jaxlora.LoraConfig(
            rank=w.rank,
            alpha=w.alpha,
            targets=[*TARGETS[setting], "router"],
            rank_pattern={"router": min(w.rank, w.experts)},
        )
    return jaxlora.LoraConfig(rank=w.rank, alpha=w.alpha, targets=list(TARGETS[setting]))


def qlora_config(setting: str, w: Workload) -> jaxlora.LoraConfig:
    """:func:`lora_config` on an NF4 base (double-quantized scales) of the setting's target
    layers only, as ``qwix-qlora`` quantizes them: the other linears stay float32."""
    others = [name for name in TARGETS["all"] if name not in TARGETS[setting]]
    return dataclasses.replace(
        lora_config(setting, w), quantize="nf4", quantize_exclude=[*others, "lm_head"]
    )


def lorafy_linen(
    setting: str, w: Workload, config: jaxlora.LoraConfig | None = None
) -> tuple[nn.Module, Any, Any]:
    """The base linen model, its LoRA-fied counterpart, and the LoRA params.

    Args:
        setting: ``"qv"`` or ``"all"``; picks the target layer names.
        w: The workload (rank, alpha and model dimensions).
        config: The config to use instead of ``lora_config(setting, w)``.

    Returns:
        ``(model, lora_model, lora_params)``.
    """
    model, params = init_linen(w)
    tokens, _ = device_batch(w)
    lora_model, lora_params = jaxlora.lorafy(
        model, params, config or lora_config(setting, w), tokens, key=jax.random.key(1)
    )
    return model, lora_model, lora_params


def linen_lora(
    setting: str, w: Workload, quantized: bool = False, dora: bool = False
) -> FunctionalRun:
    """``jaxlora``: adapters train, the rest is frozen and has no optimizer state;
    ``jaxlora-qlora`` (``quantized``): the same on :func:`qlora_config`'s NF4 base;
    ``jaxlora-dora`` (``dora``): DoRA adapters (``LoraConfig(use_dora=True)``)."""
    config = qlora_config(setting, w) if quantized else lora_config(setting, w)
    config = dataclasses.replace(config, use_dora=dora)
    _, lora_model, lora_params = lorafy_linen(setting, w, config)
    tx = jaxlora.optimizer(adamw(), lora_params)
    step = jaxlora.make_train_step(linen_loss(lora_model), tx)
    summary = jaxlora.summary(lora_params)
    opt_state = tx.init(lora_params)
    return FunctionalRun(
        step,
        lora_params,
        opt_state,
        summary.trainable_params,
        summary.total_params,
        base_bytes(lora_params),
    )


def base_bytes(lora_params: Any) -> int:
    """Bytes of an adapted tree's base parameters as stored: every leaf but the adapters."""
    leaves = jax.tree.leaves(lora_params, is_leaf=lambda x: isinstance(x, jaxlora.LoraAdapter))
    return stored_bytes(x for x in leaves if not isinstance(x, jaxlora.LoraAdapter))


def run_train_nnx(setting: str, w: Workload) -> Measurement:
    """``jaxlora-nnx``: the NNX model with plain ``nnx.Linear`` layers, adapted by jaxlora."""
    model = gpt2.NNXGPT2(model_config(w), (), w.rank, nnx.Rngs(0))
    model = jaxlora.lorafy(model, lora_config(setting, w), rngs=nnx.Rngs(1))
    return measure_nnx(model, jaxlora.TrainableParam, w, adapters=jaxlora.LoraParam)


# jax._src.dispatch.BACKEND_COMPILE_EVENT: recorded once per XLA compilation
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def switching(forward_with: Callable[[int], Any], count: int) -> tuple[list[float], int]:
    """Times adapter switches (`time_switches`) and counts the XLA compilations meanwhile.

    Args:
        forward_with: Selects adapter ``i`` and returns the jitted forward pass's output.
        count: How many adapters there are.

    Returns:
        ``(switch times, compilations)``; the count covers the first call (adapter 0, which
        compiles) and every switch after it, so one compilation per structure gives 1.
    """
    compiled = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == COMPILE_EVENT:
            compiled.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(forward_with(0))
        times = time_switches(lambda i: jax.block_until_ready(forward_with(i)), count)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return times, len(compiled)


def run_forward_unmerged(setting: str, w: Workload) -> Measurement:
    """``fwd-lora``: forward pass with the adapters applied on the fly; switching between two
    adapters of one bank as plain adapted trees (``bank.select`` + the jitted forward)."""
    model, lora_model, lora_params = lorafy_linen(setting, w)
    measurement = measure_forward(lora_model, lora_params, w)
    config, (tokens, _) = lora_config(setting, w), device_batch(w)
    bank = jaxlora.AdapterBank.from_adapted("t0", lora_params, config)
    _, bank = jaxlora.lorafy(model, bank, config, tokens, key=jax.random.key(2), name="t1")
    forward = jax.jit(lambda p, tokens: lora_model.apply({"params": p}, tokens))
    times, compilations = switching(lambda i: forward(bank.select(bank.names[i]), tokens), 2)
    return dataclasses.replace(measurement, switch_times_s=times, compilations=compilations)


def run_forward_merged(setting: str, w: Workload) -> Measurement:
    """``fwd-merged``: forward pass of the base model with the adapters merged in."""
    model, _, lora_params = lorafy_linen(setting, w)
    return measure_forward(model, jaxlora.merge(lora_params), w)


def mixed_bank(setting: str, w: Workload) -> tuple[Any, Any, jax.Array]:
    """A bank of ``w.adapters`` adapters of ``setting`` on the linen GPT-2, and the ids
    giving each example of the batch one of them, drawn uniformly.

    Returns:
        ``(bank_model, bank, ids)``; ``ids`` ``(batch,)`` in ``1..K`` (0 is the base).
    """
    model, params = init_linen(w)
    tokens, _ = device_batch(w)
    bank_model, bank, k = None, params, int(w.adapters)
    for i in range(k):
        bank_model, bank = jaxlora.lorafy(
            model, bank, lora_config(setting, w), tokens, key=jax.random.key(1 + i), name=f"t{i}"
        )
    return bank_model, bank, jnp.asarray(adapter_ids(w))


def run_forward_mixed(setting: str, w: Workload) -> Measurement:
    """``jaxlora-mixed``: one forward pass of a batch whose examples use their own adapters;
    switching the whole batch from adapter to adapter by one int id (``bank.index``)."""
    bank_model, bank, ids = mixed_bank(setting, w)
    forward = jax.jit(lambda b, tokens: bank_model.apply({"params": b}, tokens, adapter=ids))
    tokens, _ = device_batch(w)
    gflops = xla_gflops(forward, bank, tokens)
    times = time_calls(lambda: forward(bank, tokens).block_until_ready(), w)
    one = jax.jit(lambda b, tokens, i: bank_model.apply({"params": b}, tokens, adapter=i))
    switch_times, compilations = switching(
        lambda i: one(bank, tokens, bank.index(bank.names[i])), len(bank.names)
    )
    return Measurement(
        times,
        param_count(bank),
        gflops=gflops,
        base_param_bytes=bank.nbytes()["base"],
        switch_times_s=switch_times,
        compilations=compilations,
    )


def linen_mixed(setting: str, w: Workload) -> FunctionalRun:
    """``jaxlora-mixed-train``: every adapter of the bank trains on its own examples."""
    bank_model, bank, ids = mixed_bank(setting, w)

    def loss_fn(b: Any, batch: Any) -> jax.Array:
        tokens, targets = batch
        return gpt2.cross_entropy(bank_model.apply({"params": b}, tokens, adapter=ids), targets)

    tx = jaxlora.optimizer(adamw(), bank)
    step = jaxlora.make_train_step(loss_fn, tx)
    trainable, _ = jaxlora.split(bank)
    n_trainable, total = param_count(trainable), param_count(bank)
    return FunctionalRun(step, bank, tx.init(bank), n_trainable, total, bank.nbytes()["base"])


RUNNERS = {
    "jaxlora": measured(linen_lora),
    "jaxlora-qlora": measured(functools.partial(linen_lora, quantized=True)),
    "jaxlora-dora": measured(functools.partial(linen_lora, dora=True)),
    "jaxlora-nnx": run_train_nnx,
    "fwd-lora": run_forward_unmerged,
    "fwd-merged": run_forward_merged,
    "jaxlora-mixed": run_forward_mixed,
    "jaxlora-mixed-train": measured(linen_mixed),
}
