"""LoRA+: B factors (and embedding adapters) on their own learning rate, as PEFT groups them.

PEFT's ``create_loraplus_optimizer`` puts every trainable parameter in one of three
learning-rate groups: an embedding layer's adapter factors get ``loraplus_lr_embedding``;
B factors, and every other trainable 1-D parameter (biases, norm scales, DoRA's
magnitudes), get ``lr · loraplus_lr_ratio``; everything else (A factors,
``modules_to_save`` matrices) gets ``lr``.
Here each group is a label of ``optax.partition`` with its own copy of the optimizer,
built at its learning rate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from flax import nnx

from jaxlora._nnx_wrappers import LoraLayer
from jaxlora._tree import PyTree, iter_adapters, params_of, path_str

LORA_A, LORA_B, EMBEDDING, FROZEN = "lora_a", "lora_b", "embedding", "frozen"
LearningRate = float | Callable[[Any], Any]


def _factor_of(key_path: tuple[Any, ...]) -> str | None:
    """``"a"``/``"b"`` when the leaf at ``key_path`` is a LoRA factor (linen or NNX), ``"m"``
    when it is DoRA's magnitude, else None."""
    names = path_str(key_path).split("/")
    if names[-1] == "value" and not isinstance(key_path[-1], jax.tree_util.DictKey):
        names = names[:-1]  # an NNX Variable's own field
    last = names[-1] if names else ""
    if last in ("lora_a", "lora_b", "lora_magnitude"):
        return {"lora_a": "a", "lora_b": "b", "lora_magnitude": "m"}[last]
    # a linen `LoraAdapter`'s fields, under its key ``lora``/``lora_<weight>``
    is_field = isinstance(key_path[-1], jax.tree_util.GetAttrKey)
    fields = {"a": "a", "b": "b", "magnitude": "m"}
    if is_field and last in fields and len(names) >= 2 and names[-2].startswith("lora"):
        return fields[last]
    return None


def _label(key_path: tuple[Any, ...], leaf: Any, embeddings: set[str]) -> str:
    factor = _factor_of(key_path)
    if factor in ("a", "b") and any(path_str(key_path).startswith(e + "/") for e in embeddings):
        return EMBEDDING
    # DoRA's magnitude is 1-D in PEFT (one per layer), so in its B group, embeddings' too
    if factor in ("b", "m") or (factor is None and getattr(leaf, "ndim", 0) == 1):
        return LORA_B
    return LORA_A


def _linen_embeddings(params: PyTree) -> set[str]:
    """Paths (from the tree's root) of the adapters of ``embedding`` tables."""
    inner, _ = params_of(params)
    prefix = "params/" if inner is not params else ""
    return {
        f"{prefix}{module}/lora" if module else f"{prefix}lora"
        for _, module, weight, _ in iter_adapters(inner)
        if weight == "embedding"
    }


def linen_labels(params: PyTree, mask: PyTree) -> PyTree:
    """The LoRA+ group of every leaf of an adapted linen tree (``"frozen"`` where ``mask``
    is False), with PEFT's rules."""
    embeddings = _linen_embeddings(params)
    return jax.tree_util.tree_map_with_path(
        lambda p, m, x: _label(p, x, embeddings) if m else FROZEN, mask, params
    )


def nnx_labels(module: nnx.Module) -> Callable[[PyTree], PyTree]:
    """A function giving the LoRA+ group of every leaf of ``nnx.state(module, TrainableParam)``
    (with or without its Variables), for ``optax.partition``."""
    embeddings = {
        "/".join(str(p) for p in path)
        for path, m in nnx.iter_modules(module)
        if isinstance(m, LoraLayer) and isinstance(m.base, nnx.Embed)
    }

    def labels(state: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(
            lambda p, x: _label(p, x, embeddings), nnx.as_pure(state)
        )

    return labels


def _scaled(learning_rate: LearningRate, ratio: float) -> LearningRate:
    if callable(learning_rate):
        return lambda count: ratio * learning_rate(count)
    return ratio * learning_rate


def transforms(
    make_tx: Callable[[LearningRate], optax.GradientTransformation],
    learning_rate: LearningRate,
    ratio: float,
    lr_embedding: LearningRate,
) -> Mapping[str, optax.GradientTransformation]:
    """One optimizer per LoRA+ group, each built by ``make_tx`` at its learning rate."""
    return {
        LORA_A: make_tx(learning_rate),
        LORA_B: make_tx(_scaled(learning_rate, ratio)),
        EMBEDDING: make_tx(lr_embedding),
        FROZEN: optax.set_to_zero(),
    }


def check_arguments(tx: Any, learning_rate: Any, ratio: Any) -> None:
    """Raises unless ``tx`` builds an optimizer from a learning rate and both rates are given."""
    if isinstance(tx, optax.GradientTransformation) or not callable(tx):
        raise TypeError(
            "jaxlora.optimizer(loraplus_lr_ratio=...): LoRA+ builds one optimizer per "
            "learning-rate group, so pass a function of the learning rate instead of a "
            "built optimizer, e.g. jaxlora.optimizer(optax.adamw, params, "
            "learning_rate=2e-4, loraplus_lr_ratio=16) or functools.partial(optax.adamw, "
            "weight_decay=0.01)."
        )
    if learning_rate is None:
        raise TypeError(
            "jaxlora.optimizer(loraplus_lr_ratio=...): pass learning_rate=, the rate of the "
            "A factors (B gets learning_rate * loraplus_lr_ratio)."
        )
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio > 0:
        raise ValueError(
            f"jaxlora.optimizer: loraplus_lr_ratio={ratio!r} must be a positive number "
            "(the LoRA+ paper uses 2 to 32; PEFT recommends >= 1)."
        )
