"""Saves two versions of a small adapter to one directory, alternately, forever.

    python -m tests.support.save_loop DIR

Prints ``SAVING <i>`` before the i-th save (version ``i % 2``): the process the SIGKILL
test of `save_adapter` kills at random points.
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp

import jaxlora
from tests.support import models

KEY = jax.random.key(0)
X = jnp.ones((2, 16))


def versions():
    """``(base params, config, [version 0, version 1])``: adapted trees of one base."""
    model = models.MLP(features=(64, 64, 32))
    params = model.init(KEY, X)["params"]
    cfg = jaxlora.LoraConfig(rank=4, targets=["dense_0", "dense_1"])
    _, lora_params = jaxlora.lorafy(model, params, cfg, X, key=KEY)
    trainable, frozen = jaxlora.split(lora_params)
    return (
        params,
        cfg,
        [
            jaxlora.combine(jax.tree.map(lambda x, v=v: x + v, trainable), frozen)
            for v in (1.0, 2.0)
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    directory = parser.parse_args().directory
    _, cfg, adapted = versions()
    for i in itertools.count():
        print(f"SAVING {i}", flush=True)
        jaxlora.save_adapter(directory, adapted[i % 2], cfg)


if __name__ == "__main__":
    main()
