"""Trained token rows in PEFT's files (``trainable_token_indices`` of a ``LoraConfig``).

PEFT writes one tensor per wrapped torch module,
``base_model.model.<module>.token_adapter.trainable_tokens_delta`` ``(n_tokens, features)``
(``<module>.trainable_tokens_delta`` for its rows-only ``TrainableTokensConfig``,
``peft_type: "TRAINABLE_TOKENS"``, one ``token_indices`` list for every module):
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
ROWS_ONLY = "TRAINABLE_TOKENS"  # PEFT's peft_type of TrainableTokensConfig
_ROWS_ONLY_SUFFIX = ".trainable_tokens_delta"


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
    rows, rest = {}, {}
    for k, v in tensors.items():
        if k.startswith(PREFIX) and k.endswith(_ROWS_ONLY_SUFFIX):
            name = k[len(PREFIX) : -len(_ROWS_ONLY_SUFFIX)]
            rows[name.removesuffix(".token_adapter")] = v
        else:
            rest[k] = v
    return rows, rest


def rows_only_config(
    nodes: Sequence[tuple[str, TrainableTokens]],
    module_map: ModuleMap,
    base_model_name_or_path: str | None,
    task_type: str | None,
    *,
    who: str,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """PEFT's ``TrainableTokensConfig`` file for rows trained without LoRA.

    PEFT's TrainableTokensModel keeps its own copy of the rows for a head tied to the
    embedding: when the module map names one (its ``tied``) and no flax weight has rows of
    its own there, the embedding's rows are written for it too.

    Raises:
      ValueError: tables with different ids (PEFT's config has one list for all).
    """
    ids = {tuple(node.indices) for _, node in nodes}
    if len(ids) != 1:
        raise ValueError(
            f"{who}: PEFT's TrainableTokensConfig (rows without LoRA) has one token_indices "
            f"list for every module, but these tables train different ids "
            f"{[(name, list(node.indices)) for name, node in nodes]}; give them the same ids "
            "or save with jaxlora.save_adapter."
        )
    tensors, by_name = exported(nodes, module_map, who=who)
    head, embedding = getattr(module_map, "tied", None) or (None, None)
    if embedding in by_name and head not in by_name:
        tensors[f"{PREFIX}{head}{SUFFIX}"] = tensors[f"{PREFIX}{embedding}{SUFFIX}"]
        by_name[head] = by_name[embedding]
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "init_weights": True,
        "peft_type": ROWS_ONLY,
        "revision": None,
        "target_modules": sorted(by_name),
        "task_type": task_type,
        "token_indices": list(next(iter(ids))),
    }
    renamed = {k.replace(SUFFIX, _ROWS_ONLY_SUFFIX): v for k, v in tensors.items()}
    return config, renamed


def without_tied_copies(
    rows: Mapping[str, np.ndarray], index: Mapping[str, Sequence[Slot]]
) -> dict[str, np.ndarray]:
    """``rows`` less those of a torch module no flax weight maps to that hold exactly the rows
    of another module of the file: PEFT saves a tied head's copy of the embedding's rows
    (jaxlora's tied head reads the embedding's)."""
    return {
        name: value
        for name, value in rows.items()
        if name in index or not any(o != name and np.array_equal(v, value) for o, v in rows.items())
    }


def token_ids(peft_config: Mapping[str, Any], rows: Mapping[str, np.ndarray]) -> Any:
    """``trainable_token_indices`` as a LoRA config has it; a rows-only config's one
    ``token_indices`` list given to each module of the file."""
    if peft_config.get("peft_type") == ROWS_ONLY:
        return {name: list(peft_config.get("token_indices") or ()) for name in rows}
    return peft_config.get("trainable_token_indices")


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
    configured = token_ids(peft_config, rows)
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
