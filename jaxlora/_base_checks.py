"""Saved records checked against the base tree they are loaded into.

`plan` matches records to the tree (a different shape: error; unmatched: error unless
allowed, then a warning); `check_base` compares each base weight with the one its adapter
was trained on, by content fingerprint (`fingerprinted` records them at save time).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from flax.core import meta

from jaxlora import _fingerprint
from jaxlora._config import listing
from jaxlora._records import LayerSpec, LeafSpec, trainable_leaves, unmark
from jaxlora._tree import PyTree, iter_adapters, params_of, subtree


def _base_weight(params: PyTree, spec: LayerSpec) -> Any:
    return meta.unbox(subtree(params_of(params)[0], spec.module)[spec.weight_key])


def fingerprinted(params: PyTree, layers: Sequence[LayerSpec]) -> list[LayerSpec]:
    """``layers`` with the fingerprints of their base weights in ``params``."""
    return [
        dataclasses.replace(
            spec, base_fingerprint=_fingerprint.kernel_fingerprint(_base_weight(params, spec))
        )
        for spec in layers
    ]


def check_base(
    params: PyTree,
    layers: Sequence[LayerSpec],
    *,
    source: str,
    who: str,
    allow_other_base: bool,
    hint: str = "",
) -> None:
    """Raises (or warns, with ``allow_other_base``) if a layer's base weight is not the one
    its adapter was trained on, by content fingerprint. Layers without one are skipped, and
    so are layers whose base is stored otherwise than at training (float and nf4, say):
    adapters do not depend on the base's storage, and `summary` tells how it is stored.

    Args:
      params: the tree being loaded into, already checked with `plan`.
      layers: the saved layers to load.
      source: what is being loaded, for messages.
      who: the calling function, for messages.
      allow_other_base: warn instead of raising.
      hint: a sentence added to the message (what else may be wrong).
    """
    recorded = [spec for spec in layers if spec.base_fingerprint is not None]
    now = {
        spec.path: _fingerprint.kernel_fingerprint(_base_weight(params, spec)) for spec in recorded
    }
    other = [
        f"layer {spec.path!r}: its {spec.weight_key} differs from the one the adapter was "
        "trained on"
        for spec in recorded
        if _fingerprint.storage(now[spec.path]) == _fingerprint.storage(spec.base_fingerprint)
        and now[spec.path] != spec.base_fingerprint
    ]
    if not other:
        return
    message = (
        f"{who}: {source} was trained on another base model (same shapes, other weights; "
        f"compared by content fingerprint):{listing(other)}\n{hint}"
    )
    if not allow_other_base:
        raise ValueError(
            message + "Load it onto the base it was trained on (float32 or bfloat16 alike), "
            "or pass allow_other_base=True to load it anyway."
        )
    warnings.warn(message + "Loaded anyway (allow_other_base=True).", UserWarning, stacklevel=3)


def report_unmatched(
    unmatched: Sequence[str], *, source: str, who: str, allow_unmatched: bool
) -> None:
    """Raises on unmatched entries, or warns about them with ``allow_unmatched``."""
    if not unmatched:
        return
    if not allow_unmatched:
        raise ValueError(
            f"{who}: {source} does not match these params:{listing(unmatched)}\n"
            "Load it onto the model it was trained for, or pass allow_unmatched=True to "
            "load the matching part and get the rest as a warning."
        )
    warnings.warn(
        f"{who}: loaded {source} partially (allow_unmatched=True); not loaded:{listing(unmatched)}",
        UserWarning,
        stacklevel=3,
    )


def _kernel_mismatch(spec: LayerSpec, node: Any, source: str, who: str) -> None:
    weight = node.get(spec.weight_key) if isinstance(node, Mapping) else None
    shape = None if weight is None else tuple(meta.unbox(weight).shape)
    if shape == spec.kernel_shape:
        return
    found = f"has {spec.weight_key} {shape}" if shape else f"has no {spec.weight_key!r}"
    raise ValueError(
        f"{who}: layer {spec.path!r} {found}, but {source} was trained on a base whose "
        f"{spec.weight_key} is {spec.kernel_shape} ({spec.kernel_dtype}). Load it onto the "
        "base model it was trained on (same architecture and sizes)."
    )


def plan(
    params: PyTree,
    layers: Sequence[LayerSpec],
    leaves: Sequence[LeafSpec],
    *,
    source: str,
    who: str,
    allow_unmatched: bool,
    unmatched: Sequence[str] = (),
) -> tuple[list[LayerSpec], list[LeafSpec]]:
    """Checks saved records against the tree they are loaded into.

    A layer or leaf whose shape differs from the saved base is an error. Saved entries
    with no counterpart in ``params``, and adapters or trainable leaves of an adapted
    ``params`` that nothing saved replaces, are unmatched: an error, or a warning with
    ``allow_unmatched``.

    Args:
      params: a base or adapted tree (params collection or variables dict).
      layers: the saved adapters.
      leaves: the saved fully trained leaves.
      source: what is being loaded, for messages (e.g. ``"adapter /ckpt"``).
      who: the calling function, for messages.
      allow_unmatched: warn instead of raising on unmatched entries.
      unmatched: entries the caller already found unmatched, reported together.

    Returns:
      The layers and leaves to load.
    """
    inner, _ = params_of(params)
    unmatched = list(unmatched)
    matched_layers = []
    for spec in layers:
        node = subtree(inner, spec.module)
        if node is None:
            unmatched.append(f"saved adapter for layer {spec.path!r}: no such layer here")
            continue
        _kernel_mismatch(spec, node, source, who)
        matched_layers.append(spec)
    matched_leaves = []
    for leaf in leaves:
        node = subtree(inner, leaf.path)
        if node is None or isinstance(node, Mapping):
            unmatched.append(f"saved trainable leaf {leaf.path!r}: no such parameter here")
            continue
        shape = tuple(unmark(node).shape)
        if shape != leaf.shape:
            raise ValueError(
                f"{who}: parameter {leaf.path!r} has shape {shape}, but {source} saved it "
                f"with shape {leaf.shape}. Load it onto the base model it was trained on."
            )
        matched_leaves.append(leaf)
    existing_layers, existing_leaves = _existing(inner)
    unmatched += [
        f"layer {p!r} has an adapter that {source} does not replace"
        for p in sorted(existing_layers - {s.path for s in layers})
    ]
    unmatched += [
        f"trainable leaf {p!r} is not in {source}"
        for p in sorted(existing_leaves - {s.path for s in leaves})
    ]
    report_unmatched(unmatched, source=source, who=who, allow_unmatched=allow_unmatched)
    return matched_layers, matched_leaves


def _existing(inner: PyTree) -> tuple[set[str], set[str]]:
    """Paths of the adapted layers and trainable leaves already in ``inner``."""
    layers = {name for name, *_ in iter_adapters(inner)}
    return layers, {path for path, _ in trainable_leaves(inner)}
