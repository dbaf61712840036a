"""Orbax checkpoints: adapter-only files and resumable training state. All orbax use is here.

`save_adapter` writes the adapters and fully trained leaves of an adapted tree (never
the frozen base) plus a JSON record of the config and every adapted layer, so
`load_adapter` can re-attach them to a freshly loaded base without being told the rank
or alpha. `TrainCheckpointer` keeps the last few complete training states (trainable
params, optimizer state, step, RNG key, data-pipeline state) with orbax's
``CheckpointManager``, saving asynchronously.

Both rely on orbax writing into a temporary directory and renaming it when complete, so
an interrupted save is never mistaken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxlora import _attach, _files, _fingerprint, _io_errors, _sharding
from jaxlora._config import LoraConfig
from jaxlora._distributed import same_on_every_process
from jaxlora._tree import LoraAdapter, PyTree, combine, path_str, split

_FORMAT, _VERSION = "jaxlora.adapter", 2
_READABLE = (1, _VERSION)  # version 1 records carry no checksums
_ARRAYS, _RECORD = "arrays", "record"
_STATE, _META = "state", "meta"


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


def _differences(saved: PyTree, expected: PyTree) -> list[str]:
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


def _check_finite(
    layers: list[tuple[_attach.LayerSpec, Any, Any]], leaves: list[tuple[_attach.LeafSpec, Any]]
) -> None:
    named = [
        *(
            (f"layer {spec.path!r}: {factor}", x)
            for spec, a, b in layers
            for factor, x in (("A", a), ("B", b))
        ),
        *((f"trainable leaf {spec.path!r}", x) for spec, x in leaves),
    ]
    bad = _nonfinite(named)
    if bad:
        raise ValueError(
            f"save_adapter: these arrays hold NaN or inf:{_attach.listing(bad)}\nThe run "
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
    layers, leaves = _attach.collect(params, who="save_adapter")
    _attach.check_config([spec for spec, _, _ in layers], config, who="save_adapter")
    specs = _attach.fingerprinted(params, [spec for spec, _, _ in layers])
    layers = [(spec, a, b) for spec, (_, a, b) in zip(specs, layers, strict=True)]
    if not allow_nonfinite:
        _check_finite(layers, leaves)
    record = {
        "format": _FORMAT,
        "version": _VERSION,
        "config": config.to_dict(),
        "layers": [spec.to_json() for spec, _, _ in layers],
        "trainable": [spec.to_json() for spec, _ in leaves],
        "array_hashes": _array_hashes(
            [(a, b) for _, a, b in layers], [value for _, value in leaves]
        ),
    }
    record["checksum"] = _record_checksum(record)
    arrays: dict[str, Any] = {"adapters": [{"a": a, "b": b} for _, a, b in layers]}
    if leaves:
        arrays["trainable"] = [value for _, value in leaves]
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


def _array_hashes(factors: list[tuple[Any, Any]], leaves: list[Any]) -> dict[str, list[Any]]:
    """`_fingerprint.content_hash` of every saved array, as the record keeps them."""
    return {
        "adapters": [[_fingerprint.content_hash(x) for x in pair] for pair in factors],
        "trainable": [_fingerprint.content_hash(x) for x in leaves],
    }


def _damaged(source: str, what: str) -> ValueError:
    return ValueError(
        f"load_adapter: {source} is damaged: {what}. Re-save it, or restore it from a copy."
    )


class _Record(NamedTuple):
    config: LoraConfig
    layers: list[_attach.LayerSpec]
    leaves: list[_attach.LeafSpec]
    array_hashes: dict[str, list[Any]] | None  # None for version 1


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
        layers = [_attach.LayerSpec.from_json(r) for r in record["layers"]]
        leaves = [_attach.LeafSpec.from_json(r) for r in record["trainable"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"load_adapter: the record of {source} is malformed ({e}).") from e
    return _Record(config, layers, leaves, record.get("array_hashes") if version != 1 else None)


def _check_arrays(record: _Record, arrays: dict[str, Any], source: str) -> None:
    """Raises unless the restored arrays hash as they did when saved (version 2 records)."""
    if record.array_hashes is None:
        return
    restored = _array_hashes(
        [(f["a"], f["b"]) for f in arrays["adapters"]], arrays.get("trainable", [])
    )
    names = [
        *(f"layer {s.path!r}: {f}" for s in record.layers for f in ("A", "B")),
        *(f"trainable leaf {leaf.path!r}" for leaf in record.leaves),
    ]
    saved = [*(h for pair in record.array_hashes["adapters"] for h in pair)]
    saved += record.array_hashes["trainable"]
    now = [*(h for pair in restored["adapters"] for h in pair), *restored["trainable"]]
    bad = [n for n, s, r in zip(names, saved, now, strict=True) if s != r]
    if bad:
        raise _damaged(
            source, f"these arrays differ from the ones saved (checksum):{_attach.listing(bad)}"
        )


def _abstract_adapter(
    params: PyTree,
    layers: list[_attach.LayerSpec],
    leaves: list[_attach.LeafSpec],
    sharding: jax.sharding.Sharding | None,
) -> dict[str, Any]:
    """The ``arrays`` item as ShapeDtypeStructs placed where the base says (or ``sharding``)."""
    adapters = []
    for spec in layers:
        a_sharding, b_sharding = _attach.layer_shardings(params, spec, sharding)
        adapters.append(
            {
                "a": jax.ShapeDtypeStruct(spec.a_shape, spec.dtype, sharding=a_sharding),
                "b": jax.ShapeDtypeStruct(spec.b_shape, spec.dtype, sharding=b_sharding),
            }
        )
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
        differences = _differences(stored, abstract)
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
        f"{_attach.listing(differences)}\nRe-save it."
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
        load_layers, load_leaves = _attach.plan(
            params,
            layers,
            leaves,
            source=source,
            who="load_adapter",
            allow_unmatched=allow_unmatched,
        )
        _attach.check_base(
            params,
            load_layers,
            source=source,
            who="load_adapter",
            allow_other_base=allow_other_base,
        )
        abstract = _abstract_adapter(params, layers, leaves, sharding)
        arrays = _restore_arrays(checkpointer, path, abstract, source)
    _check_arrays(record, arrays, source)
    wanted = {spec.path for spec in load_layers}
    adapters = {
        spec: LoraAdapter(f["a"], f["b"], scale=spec.scale, delta_eq=spec.delta_eq)
        for spec, f in zip(layers, arrays["adapters"], strict=True)
        if spec.path in wanted
    }
    wanted = {leaf.path for leaf in load_leaves}
    trainable = {
        leaf.path: value
        for leaf, value in zip(leaves, arrays.get("trainable", []), strict=True)
        if leaf.path in wanted
    }
    return config, _attach.attach(params, adapters, trainable)


class ResumeState(NamedTuple):
    """A training state brought back by `TrainCheckpointer.restore_latest`.

    Attributes:
      step: the step it was saved at (the number of steps done).
      params: the adapted tree: trained leaves from the checkpoint, frozen leaves from
        the ``params`` passed to restore (for NNX: the restored trainable state).
      opt_state: the optimizer state.
      rng: the PRNG key as saved (typed key or raw ``uint32`` key data), replicated over
        the mesh of the params passed to restore (on the first local device if none).
      data_state: the data-pipeline state dict as saved.
    """

    step: int
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    data_state: dict[str, Any]


def _abstract(tree: PyTree) -> PyTree:
    def leaf(x):
        sharding = getattr(x, "sharding", None) or _attach.default_sharding()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def _trained_part(params: PyTree) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """What a training checkpoint stores of ``params``, and how to rebuild ``params`` from it."""
    if isinstance(params, nnx.State):
        return params, lambda restored: restored
    trainable, frozen = split(params)
    if not jax.tree.leaves(trainable):
        raise ValueError(
            "TrainCheckpointer: these params hold nothing that trains. Pass the adapted tree "
            "from jaxlora.lorafy, or for NNX nnx.state(model, jaxlora.TrainableParam)."
        )
    return trainable, lambda restored: combine(restored, frozen)


def _scales(trainable: PyTree) -> dict[str, float]:
    """``{layer path: scale}`` of the adapters of a linen tree (an NNX state holds none)."""
    marked = jax.tree_util.tree_leaves_with_path(
        trainable, is_leaf=lambda x: isinstance(x, LoraAdapter)
    )
    return {path_str(k[:-1]): x.scale for k, x in marked if isinstance(x, LoraAdapter)}


def _scale_differences(saved: Mapping[str, float] | None, trainable: PyTree) -> list[str]:
    """Layers whose scale (alpha / rank) differs from the one saved (none if none was saved)."""
    if saved is None:  # a checkpoint of a jaxlora that did not record scales
        return []
    return [
        f"layer {path!r}: saved with scale {saved.get(path)}, the params given have {scale}"
        for path, scale in _scales(trainable).items()
        if saved.get(path) != scale
    ]


def _rng_parts(rng: jax.Array) -> tuple[jax.Array, str | None]:
    """Key data and implementation name of a typed key (None for raw key data)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng), str(jax.random.key_impl(rng))
    return rng, None


def _rng_sharding(params: PyTree) -> jax.sharding.Sharding:
    """Where a restored key goes: replicated over the params' mesh, so a jitted step can take
    it next to them; on the first local device if they are on no mesh."""
    mesh = _sharding.mesh_of(params)
    if mesh is None:
        return _attach.default_sharding()
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _global_rng(key_data: Any, params: PyTree) -> Any:
    """Key data that a multi-process checkpoint can write.

    With several processes, a key on this process's devices only (``jax.random.key(0)``)
    cannot be saved; it is replicated over the mesh of ``params``, after checking that
    every process passes the same key.
    """
    if (
        jax.process_count() == 1
        or not isinstance(key_data, jax.Array)
        or not key_data.is_fully_addressable
    ):
        return key_data
    if _sharding.mesh_of(params) is None:
        raise ValueError(
            "TrainCheckpointer.save: in a multi-process run the RNG key must be a global "
            "array, but it is on this process's devices only and the params are on no mesh "
            "to replicate it over. Pass jax.device_put(key, NamedSharding(mesh, "
            "PartitionSpec())), or place the params on the mesh (jaxlora.shard_params)."
        )
    if not same_on_every_process(jax.device_get(key_data)):
        raise ValueError(
            "TrainCheckpointer.save: the processes passed different RNG keys; a checkpoint "
            "holds one. Save the key every process derives its own from (the same on all)."
        )
    return _sharding.place_on_mesh_of(params, key_data)


def _check_save_args(
    step: Any, rng: Any, data_state: Any, latest: int | None, directory: Path
) -> None:
    """Raises a clear error for arguments orbax would take and then lose or choke on."""
    who = "TrainCheckpointer.save"
    if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
        raise (ValueError if isinstance(step, numbers.Integral) else TypeError)(
            f"{who}: step={step!r} must be an int >= 0 (the number of steps done)."
        )
    if latest is not None and step < latest:
        raise ValueError(
            f"{who}: step {step} is before step {latest}, the newest in {directory}; it "
            "would not be saved. Continue the step count of the run you resumed "
            "(restore_latest(...).step), or save to a new directory."
        )
    if not (
        isinstance(rng, jax.Array | np.ndarray)
        and (jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) or rng.dtype == jnp.uint32)
    ):
        raise TypeError(
            f"{who}: rng is a {type(rng).__name__}, not a PRNG key; pass the key the run "
            "continues with, e.g. jax.random.key(0) (or its raw uint32 key data)."
        )
    if data_state is not None and not isinstance(data_state, Mapping):
        raise TypeError(
            f"{who}: data_state is a {type(data_state).__name__}, not a dict; pass e.g. "
            '{"epoch": 1, "position": 4096}.'
        )


class _DamagedStep(ValueError):
    """A training checkpoint step that cannot be read (truncated, corrupt or missing files)."""


class TrainCheckpointer:
    """Resumable training checkpoints: trainable params, optimizer state, step, RNG, data state.

    Each checkpoint is an orbax ``CheckpointManager`` step with two items: ``state``
    (`split(params)`'s trainable part, never the frozen base; the optimizer state; the
    RNG key data) and ``meta`` (JSON: the data-pipeline state and the RNG
    implementation). Saves run in the background (``async_save``); a step becomes
    visible only once fully written, so a process killed mid-save resumes from the
    previous complete step. Only the newest ``max_to_keep`` steps are kept.

    Args:
      directory: the checkpoint root (created if needed).
      max_to_keep: how many complete checkpoints to keep (None: all).
      save_interval_steps: `save` writes only steps that are a multiple of this (and
        the first one, when the directory holds no checkpoint yet).
      async_save: write in a background thread; `save` returns once the arrays are
        copied off the device. A write that fails in the background is raised by the
        next `save`, `wait` or `close`.

    Raises:
      ValueError: ``max_to_keep`` below 1 (orbax would delete every step it saves) or
        ``save_interval_steps`` below 1.
      OSError: the directory cannot be created (no permission, read-only, disk full).

    Example:
      >>> with jaxlora.TrainCheckpointer("runs/ckpt", max_to_keep=2) as ckpt:
      ...     start, rng, data_state = 0, jax.random.key(0), {"position": 0}
      ...     if resumed := ckpt.restore_latest(params, opt_state):
      ...         start, params, opt_state, rng, data_state = resumed
      ...     for step in range(start, num_steps):
      ...         batch, data_state = next_batch(data_state)
      ...         params, opt_state, loss = train_step(params, opt_state, batch)
      ...         ckpt.save(step + 1, params, opt_state, rng, data_state)
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        if max_to_keep is not None and not (isinstance(max_to_keep, int) and max_to_keep >= 1):
            raise ValueError(
                f"TrainCheckpointer: max_to_keep={max_to_keep!r} must be None (keep all) or "
                "an int >= 1; orbax would delete every checkpoint right after saving it."
            )
        if not (isinstance(save_interval_steps, int) and save_interval_steps >= 1):
            raise ValueError(
                f"TrainCheckpointer: save_interval_steps={save_interval_steps!r} must be an "
                "int >= 1 (1: every step)."
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.directory = Path(directory).absolute()
        self._in_flight: int | None = None  # the step of the asynchronous save under way
        _files.check_parent(self.directory, who="TrainCheckpointer")
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                item_handlers={
                    _STATE: ocp.StandardCheckpointHandler(),
                    _META: ocp.JsonCheckpointHandler(),
                },
                options=options,
            )
        except Exception as e:
            clear = _io_errors.write_error(
                "TrainCheckpointer", self.directory, e, "Nothing was written."
            )
            if clear is None:
                raise
            raise clear from e

    def save(
        self,
        step: int,
        params: PyTree,
        opt_state: PyTree,
        rng: jax.Array,
        data_state: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Starts saving the training state at ``step`` (if the interval says so).

        Args:
          step: steps done so far; the value `restore_latest` returns.
          params: the adapted linen tree (only its trainable part is written), or for
            NNX the trainable state, ``nnx.state(model, jaxlora.TrainableParam)``.
          opt_state: the optimizer state.
          rng: the PRNG key to resume with (typed key or raw key data). With several
            processes, a key on one device (the same on every process) is replicated
            over the params' mesh for saving.
          data_state: JSON-serialisable data-pipeline state (e.g. epoch and position).
          force: save even if ``step`` is off the interval.

        Returns:
          Whether a save was started.

        Raises:
          ValueError: ``step`` is negative or before the newest step on disk (a save
            there would be skipped), or ``data_state`` is not JSON-serialisable.
          TypeError: ``step`` is not an int, ``rng`` not a key, ``data_state`` not a dict.
          OSError: the OS refused a write (disk full, no permission, ...), of this save
            or of the one in flight; the message names the step and the steps kept.
        """
        _check_save_args(step, rng, data_state, self._manager.latest_step(), self.directory)
        data_state = dict(data_state or {})
        try:
            json.dumps(data_state)
        except TypeError as e:
            raise ValueError(
                f"TrainCheckpointer.save: data_state must be JSON-serialisable ({e}); "
                "store plain ints, floats, strings, lists and dicts."
            ) from None
        trainable, _ = _trained_part(params)
        key_data, impl = _rng_parts(rng)
        key_data = _global_rng(key_data, trainable)
        state = {"params": trainable, "opt_state": opt_state, "rng": key_data}
        meta = {"data_state": data_state, "rng_impl": impl, "scales": _scales(trainable)}
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
        )
        self.wait()  # orbax waits here too; a failure of the save in flight is raised here
        try:
            started = self._manager.save(step, args=args, force=force)
        except Exception as e:
            self._save_failed(step, e)
        self._in_flight = step if started else None
        return started

    def _save_failed(self, step: int | None, e: Exception) -> NoReturn:
        """Raises ``e``, as one clear `OSError` if the OS refused the write (disk full, ...)."""
        steps = sorted(self._manager.all_steps())
        kept = f"Step {step} is not saved; " + (
            f"the complete steps {steps} are unchanged." if steps else "no step was saved before."
        )
        clear = _io_errors.write_error("TrainCheckpointer.save", self.directory, e, kept)
        if clear is None:
            raise e
        raise clear from e

    @property
    def latest_step(self) -> int | None:
        """The newest complete step on disk, or None."""
        return self._manager.latest_step()

    def restore_latest(self, params: PyTree, opt_state: PyTree) -> ResumeState | None:
        """The newest readable checkpoint (see `restore`), or None if there is none.

        A damaged newer step (a truncated or corrupt file, a missing item) is skipped with
        a warning naming it.

        Raises:
          ValueError: every step on disk is damaged (each is named), or the newest
            readable one does not fit the templates.
        """
        self.wait()
        damaged = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                resumed = self.restore(step, params, opt_state)
            except _DamagedStep as e:
                damaged.append(str(e))
                continue
            if damaged:
                warnings.warn(
                    f"TrainCheckpointer: resuming from step {step}; newer steps are damaged:"
                    f"{_attach.listing(damaged)}",
                    UserWarning,
                    stacklevel=2,
                )
            return resumed
        if damaged:
            raise ValueError(
                f"TrainCheckpointer: every checkpoint in {self.directory} is damaged:"
                f"{_attach.listing(damaged)}\nStart afresh in a new directory (or restore "
                "the checkpoints from a copy)."
            )
        return None

    def restore(self, step: int, params: PyTree, opt_state: PyTree) -> ResumeState:
        """Restores the checkpoint at ``step`` into the placement of the given templates.

        Args:
          step: a complete step (see `latest_step`).
          params: the adapted tree of the run (e.g. from `lorafy`); gives the frozen
            leaves, the structure and the sharding of the trainable ones. For NNX, the
            trainable state (``nnx.state(model, jaxlora.TrainableParam)``); put the
            restored one back with ``nnx.update(model, resumed.params)``.
          opt_state: an optimizer state of the same structure (e.g. ``tx.init(params)``).

        Returns:
          The `ResumeState`.

        Raises:
          FileNotFoundError: no complete step ``step`` (the message lists those there are).
          ValueError: the step is damaged (unreadable files; the message names the step
            and the cause), or it does not fit the templates (another model, config or
            optimizer: other shapes, or for linen params another alpha or rank, i.e.
            another adapter scale); the message lists the differing leaves or layers.
        """
        self.wait()
        trainable, rebuild = _trained_part(params)
        steps = self._manager.all_steps()
        if step not in steps:
            raise FileNotFoundError(
                f"TrainCheckpointer.restore: no step {step} in {self.directory}; the complete "
                f"steps there are {sorted(steps)} (restore_latest picks the newest)."
            )
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )[_META]
            stored = self._manager.item_metadata(step)[_STATE]
            rng_shape = tuple(stored["rng"].shape)
            data_state, rng_impl = meta["data_state"], meta["rng_impl"]
        except Exception as e:
            raise self._damaged(step, e) from e
        abstract = {
            "params": _abstract(trainable),
            "opt_state": _abstract(opt_state),
            "rng": jax.ShapeDtypeStruct(rng_shape, jnp.uint32, sharding=_rng_sharding(trainable)),
        }
        differences = _differences(stored, abstract) or _scale_differences(
            meta.get("scales"), trainable
        )
        if differences:
            raise ValueError(
                f"TrainCheckpointer.restore: step {step} in {self.directory} does not fit the "
                f"params / opt_state given:{_attach.listing(differences)}\nRestore with the "
                "model, LoraConfig and optimizer the run was saved with."
            )
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)})
        try:
            state = self._manager.restore(step, args=args)[_STATE]
        except Exception as e:
            raise self._damaged(step, e) from e
        rng = state["rng"]
        if rng_impl is not None:
            rng = jax.random.wrap_key_data(rng, impl=rng_impl)
        return ResumeState(step, rebuild(state["params"]), state["opt_state"], rng, data_state)

    def _damaged(self, step: int, cause: BaseException) -> _DamagedStep:
        return _DamagedStep(
            f"step {step} in {self.directory} is damaged (a file is missing, truncated or "
            f"corrupt: {_io_errors.brief(cause)})"
        )

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is complete on disk.

        Raises:
          OSError: the save in flight failed for want of space, permission, ...; the
            message names the step and the steps left on disk.
        """
        step, self._in_flight = self._in_flight, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._save_failed(step, e)

    def close(self) -> None:
        """Waits for the save in flight (raising as `wait` does), then releases orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
