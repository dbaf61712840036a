"""New tokens: train chosen rows of an embedding (PEFT's ``trainable_token_indices``).

The trained rows live in a `TrainableTokens` node beside their weight (key ``"tokens"``
next to a layer's ``embedding``/``kernel``, ``"tokens_<name>"`` next to another weight):
``values`` ``(n_tokens, features)`` are the rows themselves, as PEFT's
``trainable_tokens_delta`` holds them, starting as the base rows. The model reads the
embedding with those rows replaced. Only ``values`` trains, so gradients and optimizer
state are ``(n_tokens, features)``, never the whole table.

Why as LoRA-shaped factors: replacing rows is the update ``ΔW = onehot(indices)ᵀ ⊗ (values
- W[indices])``, rank ``n_tokens`` with a fixed one-hot factor. Handed to the rewrite as
`Factors`, it is applied at every use of the weight — the lookup and a tied output head
(``Embed.attend``, ``x @ E.T``) alike, so a tied head always sees the same rows — without
a full-size ΔW or any gradient of the frozen table. Merge writes the rows exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import meta

from jaxlora._config import (
    adapter_name,
    format_paths,
    node_key,
    path_matches,
    weight_of_node,
)
from jaxlora._views import Factors

TOKENS_KEY = "tokens"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainableTokens:
    """The trained rows of one embedding (PEFT's ``trainable_tokens_delta``).

    Attributes:
      values: ``(n_tokens, features)``: the new rows (not a difference), in the order of
        ``indices``; they start as the base rows.
      indices: the token ids (row indices along ``axis``); static.
      axis: the weight axis the ids index: 0 for an embedding table ``(vocab, features)``,
        the output axis of a Dense kernel (an untied ``lm_head`` ``(features, vocab)``);
        static.
      looked_up: whether ``axis`` is the one a lookup contracts (A's side of the
        equivalent LoRA update) rather than an output axis (B's side); static.
    """

    values: Any
    indices: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    axis: int = dataclasses.field(metadata={"static": True})
    looked_up: bool = dataclasses.field(metadata={"static": True})


def tokens_key(weight: str) -> str:
    """The key of a weight's `TrainableTokens` in its module (see `_tree.node_key`)."""
    return node_key(TOKENS_KEY, weight)


def _weight_of(layer: Mapping[str, Any], key: str) -> str:
    return weight_of_node(TOKENS_KEY, layer, key)


def iter_tokens(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, str, Mapping]]:
    """Yields ``(module_path, weight_key, layer_dict)`` for every `TrainableTokens` of a tree."""
    if not isinstance(tree, Mapping):
        return
    for key, value in tree.items():
        if isinstance(value, TrainableTokens):
            yield "/".join(path), _weight_of(tree, key), tree
        else:
            yield from iter_tokens(value, (*path, str(key)))


def rows(w: jax.Array, node: TrainableTokens) -> jax.Array:
    """``(n_tokens, features)``: the rows of ``w`` that ``node`` replaces."""
    return jnp.moveaxis(jnp.take(w, jnp.asarray(node.indices), axis=node.axis), node.axis, 0)


def with_rows(w: jax.Array, node: TrainableTokens, values: jax.Array) -> jax.Array:
    """``w`` with its rows at ``node.indices`` set to ``values`` (in ``w``'s dtype)."""
    moved = jnp.moveaxis(w, node.axis, 0)
    moved = moved.at[jnp.asarray(node.indices)].set(values.astype(w.dtype))
    return jnp.moveaxis(moved, 0, node.axis)


def factors(node: TrainableTokens, w: jax.Array) -> Factors:
    """The rows as LoRA-shaped factors of the 2-D weight ``w`` (see the module docstring).

    A lookup meets the one-hot factor (``onehot[ids] @ (values - W[indices])``), a tied
    head ``x @ Wᵀ`` meets the difference first; LoRA dropout does not apply, as in PEFT.
    """
    values = node.values
    diff = values - rows(w, node).astype(values.dtype)
    onehot = jax.nn.one_hot(jnp.asarray(node.indices), w.shape[node.axis], dtype=values.dtype)
    other = 1 - node.axis
    if node.looked_up:  # A on the token axis, B on the feature axis
        return Factors(onehot.T, diff, (node.axis, None), (None, other), 1.0, dropout=False)
    return Factors(diff.T, onehot, (other, None), (None, node.axis), 1.0, dropout=False)


def factors_of(tree: Any) -> dict[str, Factors]:
    """``{weight path: Factors}`` of every `TrainableTokens` of a (marker-free) tree."""
    out = {}
    for module, weight, layer in iter_tokens(tree):
        path = f"{module}/{weight}" if module else weight
        out[path] = factors(layer[tokens_key(weight)], meta.unbox(layer[weight]))
    return out


def keys_of(layer: Mapping[str, Any]) -> list[str]:
    """The keys of the `TrainableTokens` in one module dict."""
    return [k for k, v in layer.items() if isinstance(v, TrainableTokens)]


def merge_layer(layer: Mapping[str, Any]) -> dict[str, Any]:
    """A module dict with each node's rows written into its weight (exactly, as PEFT's
    ``index_copy``) and the node removed."""
    out = dict(layer)
    for key in keys_of(layer):
        node, weight = out.pop(key), _weight_of(layer, key)
        out[weight] = meta.replace_boxed(
            layer[weight], with_rows(meta.unbox(layer[weight]), node, node.values)
        )
    return out


def restore_layer(
    out: dict[str, Any], adapted: Mapping[str, Any], merged: Mapping[str, Any], path: str
) -> dict[str, Any]:
    """The unmerged module dict ``out`` with the nodes of ``adapted`` put back and their
    weights' rows set to the base rows (PEFT keeps those as ``trainable_tokens_original``;
    here they are the adapted tree's own base).

    Raises:
      ValueError: ``merged`` still has the base rows where the trained ones differ: those
        params were never merged.
    """
    for key in keys_of(adapted):
        node, weight = adapted[key], _weight_of(adapted, key)
        base = rows(meta.unbox(adapted[weight]), node)
        given = rows(meta.unbox(merged[weight]), node)
        if not any(isinstance(x, jax.core.Tracer) for x in (base, given, node.values)):
            trained = jnp.asarray(node.values, base.dtype)
            if bool(jnp.any(trained != base)) and bool(jnp.array_equal(given, base)):
                raise ValueError(
                    f"unmerge: weight {adapter_name(path.strip('/'), weight)!r} of the first "
                    f"argument still has the base rows at the trained token ids "
                    f"{list(node.indices)}: these params were never merged. Pass the output "
                    "of jaxlora.merge(adapted)."
                )
        out[key] = node
        out[weight] = meta.replace_boxed(
            out[weight], with_rows(meta.unbox(out[weight]), node, base)
        )
    return out


@dataclasses.dataclass(frozen=True)
class Choice:
    """One weight whose rows train.

    Attributes:
      name: the weight's adapter name (its layer's path for an ``embedding``/``kernel``).
      module: the path of its module.
      weight: its key in the module.
      indices: the token ids.
      axis: the axis they index.
      looked_up: whether it is an embedding looked up by row.
    """

    name: str
    module: str
    weight: str
    indices: tuple[int, ...]
    axis: int
    looked_up: bool


def choose(
    table: Mapping[str | None, tuple[int, ...]],
    found: Sequence[Any],
    lora: Sequence[str],
    modules_to_save: Sequence[str],
    *,
    who: str = "lorafy",
) -> list[Choice]:
    """The weights whose rows train, from `requested` and the discovered candidates.

    Args:
      table: `LoraConfig.token_table`'s output.
      found: `_targeting.Candidate` of every weight the model contracts or looks up.
      lora: names of the weights that get a LoRA adapter.
      modules_to_save: the config's ``modules_to_save`` patterns.
      who: the caller, for messages.

    Raises:
      ValueError: naming the layer (and the id) and the fix, for: a list when the model
        looks up no or several embeddings, a pattern matching nothing, a weight that is
        not a 2-D table or Dense kernel, an id out of range, a weight also adapted by LoRA
        or in ``modules_to_save``.
    """
    listing = format_paths(sorted(f"{c.name}  {c.shape}" for c in found))
    chosen: dict[str, Choice] = {}
    for pattern, ids in table.items():
        if pattern is None:
            lookups = [c for c in found if c.embedding]
            if len(lookups) != 1:
                names = [c.name for c in lookups] or ["none"]
                raise ValueError(
                    f"{who}: trainable_token_indices is a list, which names the model's input "
                    f"embedding, but the model looks up {len(lookups)} embeddings "
                    f"({', '.join(names)}). Name the table: trainable_token_indices="
                    f"{{'<layer>': [...]}}. Weights:\n{listing}"
                )
            matched = lookups
        else:
            matched = [c for c in found if c.matches(pattern)]
            if not matched:
                raise ValueError(
                    f"{who}: trainable_token_indices key {pattern!r} matches no layer or "
                    f"weight (a misspelling?). Weights:\n{listing}"
                )
        for c in matched:
            choice = _check(c, ids, who)
            if c.name in chosen and chosen[c.name].indices != ids:
                raise ValueError(
                    f"{who}: trainable_token_indices gives weight {c.name!r} two lists of "
                    "ids; name it once."
                )
            chosen[c.name] = choice
    for choice in chosen.values():
        if choice.name in lora:
            raise ValueError(
                f"{who}: weight {choice.name!r} "
                "is both a LoRA target and in trainable_token_indices "
                "(PEFT refuses this too); exclude it from targets (exclude=[...]) or drop it "
                "from trainable_token_indices."
            )
        parts = choice.module.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        clash = [p for p in modules_to_save if any(path_matches(m, p) for m in prefixes)]
        if clash:
            raise ValueError(
                f"{who}: weight {choice.name!r} is in modules_to_save ({clash[0]!r}), "
                "which trains the whole table, "
                "and in trainable_token_indices (PEFT refuses this too); keep one of the two."
            )
    return list(chosen.values())


def _check(c: Any, ids: tuple[int, ...], who: str) -> Choice:
    if c.roles is None:
        raise ValueError(
            f"{who}: the rows of weight {c.name!r} {c.shape} cannot train: {c.reason}."
        )
    if len(c.shape) != 2 or sorted(c.roles) != ["in", "out"] or c.conv:
        raise ValueError(
            f"{who}: trainable_token_indices names weight {c.name!r} {c.shape}, "
            "which is not an embedding table (vocab, features) "
            "nor a Dense kernel (features, vocab); name the embedding (or an untied output "
            "head) instead."
        )
    axis = c.roles.index("in" if c.embedding else "out")
    size = c.shape[axis]
    out_of_range = [i for i in ids if i >= size]
    if out_of_range:
        raise ValueError(
            f"{who}: trainable_token_indices for {c.name!r}: token ids {out_of_range} are out "
            f"of range for its {size} rows; add the tokens to the vocabulary first (resize "
            f"the table to more than {max(out_of_range)} rows) or use ids below {size}."
        )
    return Choice(c.name, c.module, c.weight, ids, axis, c.embedding)


def values_sharding(w: Any, axis: int) -> jax.sharding.Sharding | None:
    """Where the rows of ``w`` along ``axis`` go: ``(n_tokens, features)`` with the features
    sharded as the table's are (the token axis replicated), or None if ``w`` is not placed
    with a `NamedSharding`."""
    sharding = getattr(w, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    spec = (*sharding.spec, None, None)[:2]
    return jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(None, spec[1 - axis])
    )


def with_node(choice: Choice, layer: Mapping[str, Any], *, dtype: Any) -> dict[str, Any]:
    """The module dict ``layer`` with the node of ``choice``: its base rows in ``dtype``
    (PEFT's initial values), placed like the weight's features."""
    node = TrainableTokens(None, choice.indices, choice.axis, choice.looked_up)
    w = meta.unbox(layer[choice.weight])
    values = rows(w, node).astype(dtype)
    sharding = values_sharding(w, choice.axis)
    values = values if sharding is None else jax.device_put(values, sharding)
    return {**layer, tokens_key(choice.weight): dataclasses.replace(node, values=values)}


def check_not_quantized(choice: Choice, quantized: Sequence[tuple[str, str, Any]]) -> None:
    """Raises if the weight of ``choice`` is among the weights to store quantized."""
    if any((module, weight) == (choice.module, choice.weight) for module, weight, _ in quantized):
        raise ValueError(
            f"lorafy: weight {choice.name!r} has trainable token rows and would be stored "
            f"quantized; keep it in float: LoraConfig(quantize_exclude=[{choice.name!r}])."
        )
