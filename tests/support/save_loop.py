"""Saves versions of a small adapter or training state in a loop, in children a test SIGKILLs.

    python -m tests.support.save_loop SOURCE

SOURCE is what `prepare` wrote: the base params, the adapter every version derives from,
and a JAX compilation cache. The server imports JAX without starting it, then serves one
command per line of stdin, each ``adapter DIR`` or ``checkpoint DIR``: it forks a child
(which starts JAX afresh, so a kill costs no new interpreter) that prints ``CHILD
<pid>``, then ``SAVING <i>`` just before its i-th save, forever:
``save_adapter(DIR, version(i))`` from i = 1, or ``TrainCheckpointer(DIR).save(i,
version(i), ...)`` (asynchronous, as in training) from the step after the newest one in
DIR. Once the child has died the server prints ``DIED <pid> <signal>``. Every version is
a pure function of ``i`` (`version`), so a test can check exactly what it loads.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import jaxlora
from tests.support import models

HANG_SECONDS = 120  # a child still alive after this is stuck: it dies of SIGALRM


def setup():
    """``(base params, config, adapted tree)`` of the small MLP every version adapts."""
    model, key, x = models.MLP(features=(64, 64, 32)), jax.random.key(0), jnp.ones((2, 16))
    params = model.init(key, x)["params"]
    cfg = jaxlora.LoraConfig(rank=4, targets=["dense_0", "dense_1"])
    _, lora_params = jaxlora.lorafy(model, params, cfg, x, key=key)
    return params, cfg, lora_params


def version(lora_params, i: int):
    """The adapted tree whose trained leaves are those of ``lora_params`` plus ``i``."""
    trainable, frozen = jaxlora.split(lora_params)
    return jaxlora.combine(jax.tree.map(lambda x: x + i, trainable), frozen)


def optimizer(lora_params) -> optax.GradientTransformation:
    """The optimizer whose state the checkpoint loop saves (fresh, for every version)."""
    return jaxlora.optimizer(optax.sgd(0.1), lora_params)


def prepare(source: Path, params, lora_params, cfg) -> None:
    """Writes what the children start from: a child loads it instead of running `setup`."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    np.savez(source / "base.npz", **flat)
    jaxlora.save_adapter(source / "adapter", lora_params, cfg)


def start(source: Path):
    """``(config, adapted tree)`` from what `prepare` wrote, without tracing the model."""
    jax.config.update("jax_compilation_cache_dir", str(source / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    with np.load(source / "base.npz") as base:
        params = traverse_util.unflatten_dict(dict(base), sep="/")
    return jaxlora.load_adapter(source / "adapter", params)


def _save_forever(source: Path, kind: str, directory: str) -> None:
    cfg, lora_params = start(source)
    tx = optimizer(lora_params)
    checkpointer = kind == "checkpoint" and jaxlora.TrainCheckpointer(directory, max_to_keep=2)
    first = (checkpointer.latest_step or 0) + 1 if checkpointer else 1  # resumes, as a run would
    for i in itertools.count(first):
        params = version(lora_params, i)
        print(f"SAVING {i}", flush=True)
        if checkpointer:
            checkpointer.save(i, params, tx.init(params), jax.random.key(i), {"version": i})
        else:
            jaxlora.save_adapter(directory, params, cfg)


def main() -> None:
    source = Path(sys.argv[1])
    for line in sys.stdin:
        kind, directory = line.split()
        # No JAX array exists here, so JAX's backend has not started: the child starts it.
        pid = os.fork()
        if pid == 0:
            signal.alarm(HANG_SECONDS)
            print(f"CHILD {os.getpid()}", flush=True)
            try:
                _save_forever(source, kind, directory)
            finally:
                os._exit(1)  # never back into the server's loop
        _, status = os.waitpid(pid, 0)
        print(f"DIED {pid} {os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0}", flush=True)


if __name__ == "__main__":
    main()
