"""A tiny LoRA training run that checkpoints every step: the process the SIGKILL test kills.

    python -m tests.support.train_resume DIR --steps N --out FINAL.npz

Resumes from the newest complete checkpoint in DIR (printing ``RESUMED <step>``, or
``FRESH``), trains to step N printing ``SAVING <step>`` as soon as each asynchronous save
has started, and writes the final trainable leaves to FINAL.npz. Everything a step uses
is derived from the checkpointed state: batches from the data state (seed, position),
LoRA dropout from the RNG key.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora
from jaxlora._tree import path_str

FEATURES, BATCH = 8, 16
DATA_STATE = {"seed": 7, "position": 0}


class MLP(nn.Module):
    """Two hidden Dense layers (LoRA targets) and a head (trained in full)."""

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.tanh(nn.Dense(16, name=f"dense_{i}")(x))
        return nn.Dense(1, name="head")(x)


def batch(data_state: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """The batch at ``data_state``: a pure function of (seed, position)."""
    rng = np.random.default_rng([data_state["seed"], data_state["position"]])
    x = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
    return x, np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)


def setup() -> tuple[Any, Any, optax.GradientTransformation, Callable]:
    """Adapted params, optimizer state, optimizer and jitted step of a fresh run."""
    model = MLP()
    x = jnp.zeros((BATCH, FEATURES))
    params = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoraConfig(rank=2, targets=["dense_*"], modules_to_save=["head"], dropout=0.1)
    lora_model, lora_params = jaxlora.lorafy(model, params, config, x, key=jax.random.key(1))
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)

    def loss_fn(params, batch, rng):
        x, y = batch
        pred = lora_model.apply({"params": params}, x, rngs={"dropout": rng})
        return jnp.mean((pred - y) ** 2)

    return lora_params, tx.init(lora_params), tx, jaxlora.make_train_step(loss_fn, tx)


def trainable_leaves(params: Any) -> dict[str, np.ndarray]:
    """The trained leaves by path, as host arrays."""
    trainable, _ = jaxlora.split(params)
    return {path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(trainable)}


def train(directory: str | None, steps: int) -> dict[str, np.ndarray]:
    """Trains to ``steps``, resuming from and saving to ``directory`` if given."""
    params, opt_state, _, step_fn = setup()
    start, rng, data_state = 0, jax.random.key(42), dict(DATA_STATE)
    checkpointer = directory and jaxlora.TrainCheckpointer(directory, max_to_keep=2)
    if checkpointer:
        resumed = checkpointer.restore_latest(params, opt_state)
        if resumed:
            start, params, opt_state, rng, data_state = resumed
        print(f"RESUMED {start}" if resumed else "FRESH", flush=True)
    for step in range(start, steps):
        rng, dropout_rng = jax.random.split(rng)
        params, opt_state, _ = step_fn(params, opt_state, batch(data_state), dropout_rng)
        data_state = {**data_state, "position": data_state["position"] + 1}
        if checkpointer:
            checkpointer.save(step + 1, params, opt_state, rng, data_state)
            print(f"SAVING {step + 1}", flush=True)
    if checkpointer:
        checkpointer.close()
    return trainable_leaves(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    np.savez(args.out, **train(args.directory, args.steps))


if __name__ == "__main__":
    main()
