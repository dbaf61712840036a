"""What a training checkpoint holds, checked before orbax sees it.

The trained part of the params (and how to rebuild the whole tree from it), the adapter
scales recorded beside it, the RNG key's data and placement, and the arguments of a save.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora import _attach, _sharding
from jaxlora._distributed import same_on_every_process
from jaxlora._tree import LoraAdapter, PyTree, combine, path_str, split


def abstract(tree: PyTree) -> PyTree:
    """``tree`` as orbax restore targets: shape, dtype and where each array goes."""

    def leaf(x):
        sharding = getattr(x, "sharding", None) or _attach.default_sharding()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def trained_part(params: PyTree) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
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


def scales(trainable: PyTree) -> dict[str, float]:
    """``{layer path: scale}`` of the adapters of a linen tree (an NNX state holds none)."""
    marked = jax.tree_util.tree_leaves_with_path(
        trainable, is_leaf=lambda x: isinstance(x, LoraAdapter)
    )
    return {path_str(k[:-1]): x.scale for k, x in marked if isinstance(x, LoraAdapter)}


def scale_differences(saved: Mapping[str, float] | None, trainable: PyTree) -> list[str]:
    """Layers whose scale (alpha / rank) differs from the one saved (none if none was saved)."""
    if saved is None:  # a checkpoint of a jaxlora that did not record scales
        return []
    return [
        f"layer {path!r}: saved with scale {saved.get(path)}, the params given have {scale}"
        for path, scale in scales(trainable).items()
        if saved.get(path) != scale
    ]


def rng_parts(rng: jax.Array) -> tuple[jax.Array, str | None]:
    """Key data and implementation name of a typed key (None for raw key data)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng), str(jax.random.key_impl(rng))
    return rng, None


def rng_sharding(params: PyTree) -> jax.sharding.Sharding:
    """Where a restored key goes: replicated over the params' mesh, so a jitted step can take
    it next to them; on the first local device if they are on no mesh."""
    mesh = _sharding.mesh_of(params)
    if mesh is None:
        return _attach.default_sharding()
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def global_rng(key_data: Any, params: PyTree) -> Any:
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


def check_save_args(
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
