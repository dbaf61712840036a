"""Trained token rows in PEFT's files (``trainable_token_indices`` of a ``LoraConfig``).

PEFT writes one tensor per wrapped torch module,
``base_model.model.<module>.token_adapter.trainable_tokens_delta`` ``(n_tokens, features)``:
the new rows themselves, in torch's layout, which is jaxlora's `TrainableTokens.values`
for an embedding ``(vocab, features)`` and for a Dense head ``(features, vocab)`` (torch's
``Linear`` weight is ``(vocab, features)``) alike. A head tied to the embedding has no
tensor of its own: PEFT ties it to the embedding's rows, as jaxlora's rewrite does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora._config import listing
from jaxlora._peft_files import PREFIX
from jaxlora._peft_match import Slot
from jaxlora._peft_names import ModuleMap
from jaxlora._token_records import TokenSpec
from jaxlora._tokens import TrainableTokens
from jaxlora._tokens_nnx import token_weights
from jaxlora._tree import subtree

SUFFIX = ".token_adapter.trainable_tokens_delta"


def exported(
    nodes: Sequence[tuple[str, TrainableTokens]], module_map: ModuleMap, *, who: str
) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """PEFT's tensors and ``trainable_token_indices`` (by torch name) of `nodes_of`'s rows."""
    tensors, indices = {}, {}
    for path, node in nodes:
        name = module_map(path)
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"{who}: module_map({path!r}) gave {name!r} for a weight with trained token "
                "rows; PEFT keys them by one torch module name (e.g. 'model.embed_tokens')."
            )
        tensors[f"{PREFIX}{name}{SUFFIX}"] = np.asarray(node.values)
        indices[name] = list(node.indices)
    return tensors, indices


def split(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """``({torch module: rows}, the other tensors)`` of a PEFT file."""
    rows = {
        k[len(PREFIX) : -len(SUFFIX)]: v
        for k, v in tensors.items()
        if k.startswith(PREFIX) and k.endswith(SUFFIX)
    }
    rest = {k: v for k, v in tensors.items() if not k.endswith(SUFFIX)}
    return rows, rest


def _ids_for(name: str, configured: Any, n_modules: int, source: str) -> list[int]:
    """The ids PEFT's config gives torch module ``name`` (a dict key matches a name suffix)."""
    if isinstance(configured, Mapping):
        keys = [k for k in configured if name == k or name.endswith("." + k)]
        if len(keys) != 1:
            raise ValueError(
                f"import_peft: {source} has trained token rows for {name!r} but its "
                f"trainable_token_indices {dict(configured)} names it {len(keys)} times."
            )
        return list(configured[keys[0]])
    if n_modules != 1:
        raise ValueError(
            f"import_peft: {source} gives one list of trainable_token_indices but holds token "
            f"rows for {n_modules} modules."
        )
    return list(configured)


def _row_axis(weight: str, shape: tuple[int, ...], rows: tuple[int, ...]) -> int:
    if weight in ("kernel", "embedding") or len(shape) != 2 or len(rows) != 2:
        return 1 if weight == "kernel" else 0
    return 1 if shape[1] != rows[1] and shape[0] == rows[1] else 0


def set_rows(
    module: nnx.Module,
    token_specs: Sequence[TokenSpec],
    values: Sequence[np.ndarray],
    sharding: jax.sharding.Sharding | None,
) -> None:
    """Puts the file's rows into the `TokenAdapter`s `lorafy` gave an NNX module."""
    by_name = {spec.name: value for spec, value in zip(token_specs, values, strict=True)}
    for name, _, adapter in token_weights(module):
        value = jnp.asarray(by_name[name], adapter.values.dtype)
        adapter.values[...] = value if sharding is None else jax.device_put(value, sharding)


def specs(
    rows: Mapping[str, np.ndarray],
    peft_config: Mapping[str, Any],
    index: Mapping[str, Sequence[Slot]],
    plain: Mapping[str, Any],
    source: str,
) -> tuple[list[TokenSpec], list[np.ndarray]]:
    """Where each file's rows go in the flax tree, checked against the weight's shape.

    A ``kernel`` is a Dense head ``(features, vocab)``: its rows are the output columns;
    an ``embedding`` is indexed along its first axis; any other 2-D weight (Tunix's
    ``input_embedding`` ``(vocab, features)``, a head's ``w`` ``(features, vocab)``) along
    the axis whose partner has the rows' width (the first if both have).

    Raises:
      ValueError: rows without ``trainable_token_indices``, a torch name no flax weight
        maps to, or shapes or ids that do not fit the weight (each named).
    """
    configured = peft_config.get("trainable_token_indices")
    if rows and not configured:
        raise ValueError(
            f"import_peft: {source} holds trained token rows ({sorted(rows)}) but its config "
            "has no trainable_token_indices; the file is damaged."
        )
    out, values = [], []
    for name, value in rows.items():
        found = [s for s in index.get(name, ()) if s.block is None and s.parts == 1]
        if len(found) != 1:
            known = [n for n, s in index.items() if len(s) == 1]
            raise ValueError(
                f"import_peft: {source} has trained token rows for torch module {name!r}, "
                f"which no flax weight maps to; check module_map. Torch names of these "
                f"params:{listing(sorted(known)[:40])}"
            )
        path = found[0].path
        node = subtree(plain, path)
        if isinstance(node, Mapping):
            module, weight = path, "embedding" if "embedding" in node else "kernel"
        else:
            module, _, weight = path.rpartition("/")
        shape = tuple(np.shape(subtree(plain, module)[weight]))
        axis = _row_axis(weight, shape, value.shape)
        ids = _ids_for(name, configured, len(rows), source)
        spec = TokenSpec(
            module, weight, tuple(ids), axis, axis == 0, shape, value.shape, value.dtype.name
        )
        expected = (len(ids), shape[1 - axis]) if len(shape) == 2 else None
        if value.shape != expected or max(ids) >= shape[axis]:
            raise ValueError(
                f"import_peft: {source} trains rows {ids} of {name!r} with shape "
                f"{value.shape}, which do not fit flax weight {spec.name!r} {shape}; load "
                "it onto the base model it was trained on (vocabulary resized as it was)."
            )
        out.append(spec)
        values.append(value)
    return out, values
