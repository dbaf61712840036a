"""Adapter files: `save_adapter` and `load_adapter`.

`save_adapter` writes the adapters and fully trained leaves of an adapted tree (never
the frozen base) plus a JSON record of the config and every adapted layer, so
`load_adapter` can re-attach them to a freshly loaded base without being told the rank
or alpha. Orbax writes into a temporary directory and renames it when complete, so an
interrupted save is never mistaken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxlora import (
    _attach,
    _base_checks,
    _files,
    _fingerprint,
    _init_from_weights,
    _io_errors,
    _records,
    _sharding,
    _token_records,
)
from jaxlora._config import LoraConfig, listing
from jaxlora._tree import LoraAdapter, PyTree, path_str

# Version 1 records carry no checksums; version 3 ones carry parts version 2 lacks (token
# rows, DoRA magnitudes), written only when present, so that an older jaxlora refuses such
# a file instead of loading it without them.
_FORMAT, _VERSION = "jaxlora.adapter", 3
_READABLE = (1, 2, _VERSION)
_ARRAYS, _RECORD = "arrays", "record"


def _adapter_checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            **{_ARRAYS: ocp.StandardCheckpointHandler(), _RECORD: ocp.JsonCheckpointHandler()}
        )
    )


def _is_adapter(path: Path) -> bool:
    return (path / _ARRAYS).is_dir() and (path / _RECORD).is_dir()


def _shapes(tree: PyTree) -> dict[str, str]:
    """``{leaf path: "dtype(shape)"}`` of an array, abstract or metadata tree."""
    return {
        path_str(key_path): f"{jnp.dtype(x.dtype).name}{tuple(x.shape)}"
        for key_path, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def shape_differences(saved: PyTree, expected: PyTree) -> list[str]:
    saved, expected = _shapes(saved), _shapes(expected)
    return [
        f"{k}: saved {saved.get(k, 'nothing')}, expected {expected.get(k, 'nothing')}"
        for k in sorted(saved.keys() | expected.keys())
        if saved.get(k) != expected.get(k)
    ]


def _nonfinite(named: list[tuple[str, Any]]) -> list[str]:
    """The names of the arrays holding a NaN or inf (each checked where it lives)."""
    finite = jax.device_get([jnp.isfinite(x).all() for _, x in named])
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def _named_arrays(spec: _records.LayerSpec, a: Any, b: Any, m: Any) -> list[tuple[str, Any]]:
    """``("A", a)``, ``("B", b)`` and, for DoRA, ``("magnitude", m)``: a layer's saved arrays."""
    return [("A", a), ("B", b)] + ([] if m is None else [("magnitude", m)])


def _saved(layer: tuple) -> dict[str, Any]:
    """One entry of the ``arrays`` item's ``adapters`` list."""
    _, a, b, m = layer
    return {"a": a, "b": b} if m is None else {"a": a, "b": b, "m": m}


def _check_finite(
    layers: list[tuple[_records.LayerSpec, Any, Any, Any]],
    leaves: list[tuple[_records.LeafSpec, Any]],
    tokens: list[tuple[Any, Any]],
) -> None:
    named = [
        *(
            (f"layer {layer[0].path!r}: {factor}", x)
            for layer in layers
            for factor, x in _named_arrays(*layer)
        ),
        *((f"trainable leaf {spec.path!r}", x) for spec, x in leaves),
        *((f"token rows of {spec.name!r}", x) for spec, x in tokens),
    ]
    bad = _nonfinite(named)
    if bad:
        raise ValueError(
            f"save_adapter: these arrays hold NaN or inf:{listing(bad)}\nThe run "
            "diverged (a non-finite loss or gradient); the adapter would output NaN. Save an "
            "earlier state, or train with jaxlora.make_train_step(..., skip_nonfinite=True); "
            "pass allow_nonfinite=True to save it anyway."
        )


def save_adapter(
    directory: str | os.PathLike,
    params: PyTree,
    config: LoraConfig,
    *,
    allow_nonfinite: bool = False,
) -> None:
    """Saves only the trained part of an adapted tree: adapters and `Trainable` leaves.

    The directory is an orbax checkpoint with two items: ``arrays`` (A and B of every
    adapted layer, and every fully trained leaf) and ``record``, a JSON description:
    the config (``config.to_dict()``); per adapted layer its path, base kernel shape,
    dtype and content fingerprint (see `load_adapter`), A/B shapes and dtype, scale and
    ``delta_eq``; a content hash of every saved array; and a SHA-256 checksum of the
    record itself, so a damaged adapter fails to load with one error instead of loading
    changed.

    The write is atomic: the checkpoint is completed in a staging directory next to
    ``directory`` and only then renamed into place, and an existing adapter there is
    deleted only after that. Killed at any point, the old or the new adapter is on disk.
    With several JAX processes, every process calls it with the same ``directory`` on a
    filesystem they share: each writes its shards, and all return once the adapter is in
    place.

    Args:
      directory: where to write; created, or replaced if it holds an adapter.
      params: the adapted tree (params collection or variables dict).
      config: the `LoraConfig` the params were adapted with.
      allow_nonfinite: save adapters holding NaN or inf (otherwise an error naming them).

    Raises:
      ValueError: no adapters, a config that does not describe them, a non-finite
        array (without ``allow_nonfinite``), or a directory that is not an adapter.

    Example:
      >>> jaxlora.save_adapter("runs/adapter", lora_params, cfg)
      >>> cfg, lora_params = jaxlora.load_adapter("runs/adapter", base_params)
    """
    layers, leaves = _records.collect(params, who="save_adapter")
    _records.check_config([spec for spec, *_ in layers], config, who="save_adapter")
    specs = _base_checks.fingerprinted(params, [spec for spec, *_ in layers])
    layers = [(spec, *arrays) for spec, (_, *arrays) in zip(specs, layers, strict=True)]
    tokens = _token_records.collect(params, config, who="save_adapter")
    if not allow_nonfinite:
        _check_finite(layers, leaves, tokens)
    record = {
        "format": _FORMAT,
        "version": _VERSION if tokens or any(m is not None for *_, m in layers) else 2,
        "config": config.to_dict(),
        "layers": [spec.to_json() for spec, *_ in layers],
        "trainable": [spec.to_json() for spec, _ in leaves],
        "array_hashes": _array_hashes(
            [list(_saved(layer).values()) for layer in layers],
            [value for _, value in leaves],
            [values for _, values in tokens],
        ),
    }
    if tokens:
        record["tokens"] = [spec.to_json() for spec, _ in tokens]
    record["checksum"] = _record_checksum(record)
    arrays: dict[str, Any] = {"adapters": [_saved(layer) for layer in layers]}
    if leaves:
        arrays["trainable"] = [value for _, value in leaves]
    if tokens:
        arrays["tokens"] = [values for _, values in tokens]
    target = Path(directory)
    _files.check_parent(target, who="save_adapter")
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(
            f"save_adapter: {target} is a file, not a directory; refusing to replace it. "
            "Choose a new directory."
        )
    if target.exists() and any(target.iterdir()) and not _is_adapter(target):
        raise ValueError(
            f"save_adapter: {target} exists and is not an adapter saved by jaxlora; "
            "refusing to replace it. Choose a new directory."
        )
    with (
        _files.replacing(target, who="save_adapter") as new,
        _adapter_checkpointer() as checkpointer,
    ):
        checkpointer.save(
            new,
            args=ocp.args.Composite(
                **{_ARRAYS: ocp.args.StandardSave(arrays), _RECORD: ocp.args.JsonSave(record)}
            ),
        )


def _record_checksum(record: Mapping[str, Any]) -> str:
    """SHA-256 of the record without its checksum, as canonical JSON."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _array_hashes(
    factors: list[list[Any]], leaves: list[Any], tokens: list[Any]
) -> dict[str, list[Any]]:
    """`_fingerprint.content_hash` of every saved array, as the record keeps them."""
    hashes = {
        "adapters": [[_fingerprint.content_hash(x) for x in pair] for pair in factors],
        "trainable": [_fingerprint.content_hash(x) for x in leaves],
    }
    if tokens:
        hashes["tokens"] = [_fingerprint.content_hash(x) for x in tokens]
    return hashes


def _damaged(source: str, what: str) -> ValueError:
    return ValueError(
        f"load_adapter: {source} is damaged: {what}. Re-save it, or restore it from a copy."
    )


class _Record(NamedTuple):
    config: LoraConfig
    layers: list[_records.LayerSpec]
    leaves: list[_records.LeafSpec]
    array_hashes: dict[str, list[Any]] | None  # None for version 1
    tokens: list[_token_records.TokenSpec]


def _read_record(checkpointer: ocp.Checkpointer, path: Path, source: str) -> _Record:
    try:
        args = ocp.args.Composite(**{_RECORD: ocp.args.JsonRestore()})
        record = checkpointer.restore(path, args=args)[_RECORD]
    except Exception as e:
        raise _damaged(source, f"its record cannot be read ({_io_errors.brief(e)})") from e
    if not isinstance(record, dict):
        raise _damaged(source, "its record is not a JSON object")
    checksum = record.get("checksum")
    if checksum is not None and checksum != _record_checksum(record):
        raise _damaged(source, "its record does not match its checksum")
    if record.get("format") != _FORMAT:
        raise ValueError(
            f"load_adapter: {source} is not a jaxlora adapter (its record has no "
            f"format={_FORMAT!r}); save adapters with jaxlora.save_adapter."
        )
    version = record.get("version")
    if version not in _READABLE:
        raise ValueError(
            f"load_adapter: {source} has format version {version!r}; this jaxlora reads "
            f"versions {_READABLE}. Load it with the jaxlora that wrote it."
        )
    if version != 1 and checksum is None:
        raise _damaged(source, "its record has lost its checksum")
    try:
        config = LoraConfig(**record["config"])
        layers = [_records.LayerSpec.from_json(r) for r in record["layers"]]
        leaves = [_records.LeafSpec.from_json(r) for r in record["trainable"]]
        tokens = [_token_records.TokenSpec.from_json(r) for r in record.get("tokens", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"load_adapter: the record of {source} is malformed ({e}).") from e
    hashes = record.get("array_hashes") if version != 1 else None
    return _Record(config, layers, leaves, hashes, tokens)


def _check_arrays(record: _Record, arrays: dict[str, Any], source: str) -> None:
    """Raises unless the restored arrays hash as they did when saved (version 2 and 3 records)."""
    if record.array_hashes is None:
        return
    restored = _array_hashes(
        [list(f.values()) for f in arrays["adapters"]],
        arrays.get("trainable", []),
        arrays.get("tokens", []),
    )
    names = [
        *(
            f"layer {s.path!r}: {f}"
            for s in record.layers
            for f in ("A", "B", "magnitude")[: 2 if s.magnitude_shape is None else 3]
        ),
        *(f"trainable leaf {leaf.path!r}" for leaf in record.leaves),
        *(f"token rows of {t.name!r}" for t in record.tokens),
    ]
    saved = [*(h for pair in record.array_hashes["adapters"] for h in pair)]
    saved += record.array_hashes["trainable"] + record.array_hashes.get("tokens", [])
    now = [*(h for pair in restored["adapters"] for h in pair), *restored["trainable"]]
    now += restored.get("tokens", [])
    bad = [n for n, s, r in zip(names, saved, now, strict=True) if s != r]
    if bad:
        raise _damaged(source, f"these arrays differ from the ones saved (checksum):{listing(bad)}")


def _abstract_adapter(
    params: PyTree,
    layers: list[_records.LayerSpec],
    leaves: list[_records.LeafSpec],
    sharding: jax.sharding.Sharding | None,
) -> dict[str, Any]:
    """The ``arrays`` item as ShapeDtypeStructs placed where the base says (or ``sharding``)."""
    adapters = []
    for spec in layers:
        a_sharding, b_sharding = _attach.layer_shardings(params, spec, sharding)
        entry = {
            "a": jax.ShapeDtypeStruct(spec.a_shape, spec.dtype, sharding=a_sharding),
            "b": jax.ShapeDtypeStruct(spec.b_shape, spec.dtype, sharding=b_sharding),
        }
        if spec.magnitude_shape is not None:
            m_sharding = _sharding.magnitude_sharding(b_sharding, len(spec.b_shape), spec.delta_eq)
            entry["m"] = jax.ShapeDtypeStruct(spec.magnitude_shape, spec.dtype, sharding=m_sharding)
        adapters.append(entry)
    tree: dict[str, Any] = {"adapters": adapters}
    if leaves:
        tree["trainable"] = [
            jax.ShapeDtypeStruct(
                leaf.shape, leaf.dtype, sharding=_attach.leaf_sharding(params, leaf, sharding)
            )
            for leaf in leaves
        ]
    return tree


def _restore_arrays(
    checkpointer: ocp.Checkpointer, path: Path, abstract: dict[str, Any], source: str
) -> dict[str, Any]:
    try:
        stored = checkpointer.metadata(path).item_metadata[_ARRAYS]
        differences = shape_differences(stored, abstract)
        if not differences:
            args = ocp.args.Composite(**{_ARRAYS: ocp.args.StandardRestore(abstract)})
            return checkpointer.restore(path, args=args)[_ARRAYS]
    except Exception as e:
        raise ValueError(
            f"load_adapter: cannot read the arrays of {source}; a file is truncated or "
            f"corrupt ({_io_errors.brief(e)}). Re-save it."
        ) from e
    raise ValueError(
        f"load_adapter: {source} is corrupt: its arrays disagree with its record:"
        f"{listing(differences)}\nRe-save it."
    )


def load_adapter(
    directory: str | os.PathLike,
    params: PyTree,
    *,
    sharding: jax.sharding.Sharding | None = None,
    allow_unmatched: bool = False,
    allow_other_base: bool = False,
) -> tuple[LoraConfig, PyTree]:
    """Re-attaches a saved adapter to a base tree, or replaces the adapters of an adapted one.

    Rank, alpha and layouts come from the saved record. The arrays are restored straight
    into their target placement: each factor follows its base kernel's sharding (a
    ``NamedSharding`` kernel ``(in, out)`` sharded ``P('x', 'y')`` gives A ``P('x',
    None)`` and B ``P(None, 'y')``), each trainable leaf the base leaf's.

    Args:
      directory: a directory written by `save_adapter`.
      params: base params (e.g. freshly loaded pretrained weights) or an adapted tree
        whose adapters are replaced; a params collection or a variables dict.
      sharding: put every restored array here instead (e.g.
        ``NamedSharding(mesh, PartitionSpec())``).
      allow_unmatched: load what matches and warn about the rest, instead of raising
        when a saved layer is not in ``params`` or an adapter of ``params`` would be left
        as it was.
      allow_other_base: load onto base weights other than those the adapter was trained
        on, with a warning, instead of raising. Each adapted layer's base weight is
        recognised by a fingerprint of a fixed strided sample of it rounded to bfloat16
        (so a float32 base and its bfloat16 cast are the same base).

    Returns:
      ``(config, lora_params)``: the saved `LoraConfig` (for ``LoraModel(model,
      config)``) and the adapted tree, in the form of ``params``.

    Raises:
      FileNotFoundError: no directory.
      ValueError: not a jaxlora adapter, a damaged, corrupt or truncated file, a base of
        other shapes, or other weights (without ``allow_other_base``), or unmatched layers
        (without ``allow_unmatched``); the message names the layer and what was expected.
    """
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(
            f"load_adapter: sharding is a {type(sharding).__name__}, not a "
            "jax.sharding.Sharding; pass e.g. NamedSharding(mesh, PartitionSpec()), or None "
            "to follow the base kernels."
        )
    path = Path(directory).absolute()
    source = f"adapter {str(path)!r}"
    if not path.is_dir():
        raise FileNotFoundError(f"load_adapter: no adapter at {path}.{_files.missing_hint(path)}")
    if not _is_adapter(path):
        raise ValueError(
            f"load_adapter: {path} is not an adapter written by jaxlora.save_adapter (it "
            f"lacks {_ARRAYS}/ or {_RECORD}/).{_files.missing_hint(path)}"
        )
    with _adapter_checkpointer() as checkpointer:
        record = _read_record(checkpointer, path, source)
        config, layers, leaves = record.config, record.layers, record.leaves
        load_layers, load_leaves = _base_checks.plan(
            params,
            layers,
            leaves,
            source=source,
            who="load_adapter",
            allow_unmatched=allow_unmatched,
        )
        # PiSSA/OLoRA adapters were trained on the residual: recompute it from the base
        params = _attach.to_residual(params, load_layers, config.init)
        _base_checks.check_base(
            params,
            load_layers,
            source=source,
            who="load_adapter",
            allow_other_base=allow_other_base,
            hint=_residual_hint(config),
        )
        _token_records.check_base(params, record.tokens, source=source, who="load_adapter")
        abstract = _abstract_adapter(params, layers, leaves, sharding)
        if record.tokens:
            abstract["tokens"] = _token_records.abstract(params, record.tokens, sharding)
        arrays = _restore_arrays(checkpointer, path, abstract, source)
    _check_arrays(record, arrays, source)
    wanted = {spec.path for spec in load_layers}
    adapters = {
        spec: LoraAdapter(
            f["a"], f["b"], scale=spec.scale, delta_eq=spec.delta_eq, magnitude=f.get("m")
        )
        for spec, f in zip(layers, arrays["adapters"], strict=True)
        if spec.path in wanted
    }
    wanted = {leaf.path for leaf in load_leaves}
    trainable = {
        leaf.path: value
        for leaf, value in zip(leaves, arrays.get("trainable", []), strict=True)
        if leaf.path in wanted
    }
    adapted = _attach.attach(params, adapters, trainable)
    return config, _token_records.attach(adapted, record.tokens, arrays.get("tokens", []))


def _residual_hint(config: LoraConfig) -> str:
    if not _init_from_weights.is_from_weights(config.init):
        return ""
    return (
        f"It was made with init={config.init!r}: load_adapter recomputes the residual base "
        "from the untouched base weights (as PEFT does), so pass the base as loaded, not "
        "the residual of an adapted tree nor a merged one. To load it on other bases, "
        "convert it to plain LoRA with jaxlora.convert_to_lora.\n"
    )
