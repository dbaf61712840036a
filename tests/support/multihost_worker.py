"""One process of a multi-process LoRA run: the worker `tests/test_multihost.py` launches.

    python -m tests.support.multihost_worker DIR --phase train|resume --steps N --out OUT.json

Joins the run through `jaxlora.initialize_distributed` (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), builds the ``data=2,model=4`` mesh over the
devices of every process, shards the base (FSDP over ``data``, tensor parallel over
``model``) and trains the adapters, each process feeding its rows of every global batch.

``train`` saves the fresh adapter to ``DIR/adapter``, runs N steps from scratch, then
saves the training state to ``DIR/state`` (RNG key on one device, as a script makes it),
saves the trained adapter over ``DIR/adapter`` and exports it to ``DIR/peft``: every
process calls each save and writes its shards. ``resume`` restores the training state
into a fresh run, loads the adapter and imports the PEFT export onto the sharded base,
and trains N more steps, then tries to replace ``DIR/adapter`` while process 1 fails to
write its part. Process 0 writes the losses and trainable leaves to OUT.json.
The test runs the same functions in one process on 8 devices as the reference.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora._files import replacing
from jaxlora._tree import path_str

MESH = "data=2,model=4"
RNG_SEED = 7
MODULE_MAP = jaxlora.peft_module_map()
FEATURES, HIDDEN, BATCH = 16, 32, 16
SPECS = [
    ("dense_0/kernel", P("data", "model")),  # FSDP + column-parallel
    ("dense_1/kernel", P("model", "data")),  # FSDP + row-parallel
    ("head/kernel", P(None, "model")),
]


class MLP(nn.Module):
    """Two hidden Dense layers and a head, every one a LoRA target."""

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(HIDDEN, name="dense_0")(x))
        x = nn.gelu(nn.Dense(FEATURES, name="dense_1")(x))
        return nn.Dense(FEATURES // 2, name="head")(x)


class Run(NamedTuple):
    """A fresh run: config, sharded base, adapted params, optimizer state, step, RNG."""

    config: jaxlora.LoraConfig
    base: Any
    params: Any
    opt_state: Any
    step_fn: Any
    rng: jax.Array


def global_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole batch of ``step``, the same on every process (a pure function of step)."""
    rng = np.random.default_rng(step)
    x = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
    return x, np.tanh(x[:, : FEATURES // 2] * 2.0).astype(np.float32)


def local_batch(mesh: jax.sharding.Mesh, step: int) -> Any:
    """This process's rows of the global batch, made global by `jaxlora.shard_batch`."""
    rows = NamedSharding(mesh, P("data")).addressable_devices_indices_map((BATCH,)).values()
    start = min(r[0].indices(BATCH)[0] for r in rows)
    stop = max(r[0].indices(BATCH)[1] for r in rows)
    return jaxlora.shard_batch(jax.tree.map(lambda a: a[start:stop], global_batch(step)), mesh)


def setup(mesh: jax.sharding.Mesh) -> Run:
    """A fresh run, identical on every process and in every launch."""
    model = MLP()
    x = jnp.zeros((BATCH, FEATURES))
    base = jaxlora.shard_params(
        jax.device_get(model.init(jax.random.key(0), x)["params"]), mesh, SPECS
    )
    config = jaxlora.LoraConfig(rank=4, alpha=8)
    lora_model, params = jaxlora.lorafy(model, base, config, x, key=jax.random.key(1))
    tx = jaxlora.optimizer(optax.adam(3e-2), params)

    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean((lora_model.apply({"params": params}, x) - y) ** 2)

    step_fn = jaxlora.make_train_step(loss_fn, tx)
    return Run(config, base, params, tx.init(params), step_fn, jax.random.key(RNG_SEED))


def train(mesh: jax.sharding.Mesh, run: Run, start: int, steps: int) -> tuple[Run, list]:
    """``steps`` training steps from step ``start``; the run after them and the losses."""
    params, opt_state, losses = run.params, run.opt_state, []
    for step in range(start, start + steps):
        params, opt_state, loss = run.step_fn(params, opt_state, local_batch(mesh, step))
        losses.append(float(loss))
    return run._replace(params=params, opt_state=opt_state), losses


def _unsplit_axis_error() -> str:
    """What `shard_batch` says when both processes' devices hold the same data shard."""
    try:
        jaxlora.shard_batch(np.zeros((BATCH, 2)), jaxlora.parse_mesh("data=1,model=8"))
    except ValueError as e:
        return str(e)
    return ""


def trainable_leaves(params: Any) -> dict[str, list]:
    """The trained leaves by path, gathered from every process to host lists."""
    trainable, _ = jaxlora.split(params)
    gathered = multihost_utils.process_allgather(trainable, tiled=True)
    leaves = jax.tree_util.tree_leaves_with_path(gathered)
    return {path_str(k): np.asarray(v).tolist() for k, v in leaves}


def one_process_fails_to_write(target: str) -> str:
    """Replaces ``target`` while process 1 fails; this process's error, as a line."""
    try:
        with replacing(target, who="the multihost test") as new:
            if jax.process_index() == 1:
                raise OSError("disk full on process 1")
            new.mkdir()
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
        print(message, flush=True)
        return message
    return "no error"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--phase", choices=["train", "resume"], required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    jaxlora.initialize_distributed(initialization_timeout=60)
    mesh = jaxlora.parse_mesh(MESH)
    run, start, result = setup(mesh), 0, {}
    adapter, peft_dir = f"{args.directory}/adapter", f"{args.directory}/peft"
    with jaxlora.TrainCheckpointer(f"{args.directory}/state") as checkpointer:
        if args.phase == "resume":
            start, params, opt_state, rng, _ = checkpointer.restore_latest(
                run.params, run.opt_state
            )
            run = run._replace(params=params, opt_state=opt_state, rng=rng)
            _, loaded = jaxlora.load_adapter(adapter, run.base)
            _, imported = jaxlora.import_peft(peft_dir, run.base, module_map=MODULE_MAP)
            result = {
                "restored": trainable_leaves(params),
                "loaded": trainable_leaves(loaded),
                "imported": trainable_leaves(imported),
                "rng": np.asarray(jax.random.key_data(rng)).tolist(),
            }
        else:
            jaxlora.save_adapter(adapter, run.params, run.config)  # replaced after training
        run, losses = train(mesh, run, start, args.steps)
        if args.phase == "train":
            checkpointer.save(start + args.steps, run.params, run.opt_state, run.rng, force=True)
            jaxlora.save_adapter(adapter, run.params, run.config)
            jaxlora.export_peft(peft_dir, run.params, run.config, module_map=MODULE_MAP)
            result["unsplit_axis_error"] = _unsplit_axis_error()
        else:
            result["partial_write"] = one_process_fails_to_write(adapter)
    result.update(losses=losses, trainable=trainable_leaves(run.params))
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
