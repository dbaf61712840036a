"""What the no-weight-gradient tests share: a full fine-tuning step and the compiled dots."""

import re

import jax
import optax

import jaxlora

_DOT = re.compile(r"= f32\[([\d,]+)\]\S* (?:dot|convolution)\(")


def full_finetune_step(loss_fn, tx: optax.GradientTransformation):
    """A jitted step training every parameter: ``(params, opt_state, batch) -> (.., .., loss)``."""

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def compiled_dot_shapes(jitted, *args) -> set[tuple[int, ...]]:
    """Output shapes of the f32 dots and convolutions in ``jitted``'s compiled HLO."""
    hlo = jitted.lower(*args).compile().as_text()
    shapes = {tuple(int(d) for d in m.group(1).split(",")) for m in _DOT.finditer(hlo)}
    assert shapes, "no dots found: the HLO pattern is stale"
    return shapes


def moved(params, scale: float):
    """An adapted linen tree with every trainable leaf moved by ``scale``·N(0, 1) (seed 1), so
    the adapters are off their initial values (B no longer zero, token rows changed)."""
    trainable, frozen = jaxlora.split(params)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return jaxlora.combine(jax.tree.unflatten(treedef, leaves), frozen)
