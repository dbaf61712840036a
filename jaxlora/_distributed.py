"""Meshes, processes and batches: what a (multi-host) training script sets up around jaxlora."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlora._sharding import mesh_axes_size
from jaxlora._tree import PyTree, path_str

_MESH_ITEM = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*(-?\d+)\s*")


def _parse_axes(spec: str) -> list[tuple[str, int]]:
    axes = []
    for item in spec.split(","):
        match = _MESH_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(
                f"parse_mesh: cannot read {item.strip()!r} in {spec!r}; write the mesh as "
                'comma-separated name=size pairs, e.g. "data=2,model=4" or "data=-1,model=4".'
            )
        axes.append((match.group(1), int(match.group(2))))
    names = [name for name, _ in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"parse_mesh: {spec!r} names an axis twice; axis names must differ.")
    return axes


def _device_summary() -> str:
    return (
        f"{jax.device_count()} devices ({jax.process_count()} process(es) x "
        f"{jax.local_device_count()} local devices)"
    )


def parse_mesh(spec: str, *, axis_type: AxisType = AxisType.Auto) -> Mesh:
    """A device mesh over all devices (of all processes) from ``"name=size,..."``.

    Args:
      spec: comma-separated ``name=size`` pairs, major axis first, e.g. ``"data=2,model=4"``.
        One size may be ``-1``: it takes the devices the others leave.
      axis_type: `jax.sharding.AxisType` of every axis. ``Auto`` (the default here, unlike
        ``jax.make_mesh``) lets XLA propagate shardings through unmodified linen/NNX
        models; ``Explicit`` puts shardings in the types (models must then pass
        ``out_sharding`` to contractions over sharded axes).

    Returns:
      A `jax.sharding.Mesh` over ``jax.devices()``.

    Raises:
      ValueError: if the sizes do not multiply to the number of devices (naming both), or
        the spec is malformed.

    Example:
      >>> mesh = jaxlora.parse_mesh("data=2,model=4")  # 8 devices
      >>> mesh.shape
      {'data': 2, 'model': 4}
    """
    axes = _parse_axes(spec)
    sizes = [size for _, size in axes]
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"parse_mesh: sizes in {spec!r} must be positive, with at most one -1 (inferred)."
        )
    n = jax.device_count()
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"parse_mesh: the fixed axes of {spec!r} (product {known}) do not divide the "
                f"{_device_summary()}; use sizes whose product divides {n}."
            )
        sizes = [n // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != n:
        raise ValueError(
            f"parse_mesh: {spec!r} has {math.prod(sizes)} devices but JAX sees "
            f"{_device_summary()}; make the sizes multiply to {n} (or use -1 for one axis). "
            "In a multi-process run, call jaxlora.initialize_distributed() first, with the "
            "same process count everywhere."
        )
    names = tuple(name for name, _ in axes)
    return jax.make_mesh(tuple(sizes), names, axis_types=(axis_type,) * len(names))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"initialize_distributed: ${name}={value!r} is not an integer.") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | list[int] | None = None,
    initialization_timeout: int = 300,
) -> None:
    """Joins this process to a multi-process (multi-host) JAX run; a no-op for one process.

    Each argument left as None is read from the environment: ``JAX_COORDINATOR_ADDRESS``
    (``host:port`` of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. With no
    coordinator address at all, the run is single-process and nothing happens. (On a
    cluster JAX can detect by itself, such as Slurm or a TPU pod, you may call
    ``jax.distributed.initialize()`` directly instead.) CPU processes exchange data
    with gloo collectives.

    Call it before anything else touches JAX devices.

    Args:
      coordinator_address: ``host:port`` of the coordinator (process 0).
      num_processes: total number of processes; the same on every process.
      process_id: this process's index, in ``[0, num_processes)``.
      local_device_ids: restrict this process to these local devices.
      initialization_timeout: seconds to wait for every process to join.

    Raises:
      ValueError: a missing or out-of-range process count or id, or a cluster that formed
        with a process count other than ``num_processes``, naming both numbers.

    Example:
      >>> # JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0
      >>> jaxlora.initialize_distributed()
      >>> mesh = jaxlora.parse_mesh("data=2,model=4")
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if not coordinator_address:
        if num_processes not in (None, 1):
            raise ValueError(
                f"initialize_distributed: num_processes={num_processes} but no coordinator "
                "address; pass coordinator_address='host:port' of process 0 or set "
                "$JAX_COORDINATOR_ADDRESS."
            )
        return
    if num_processes is None or process_id is None:
        raise ValueError(
            "initialize_distributed: a multi-process run needs num_processes and process_id "
            f"(got {num_processes} and {process_id}); pass them or set $JAX_NUM_PROCESSES "
            "and $JAX_PROCESS_ID."
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"initialize_distributed: process_id={process_id} is outside [0, {num_processes}) "
            f"for num_processes={num_processes}; number the processes 0..{num_processes - 1}."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    if jax.process_count() != num_processes:
        raise ValueError(
            f"initialize_distributed: this process was started with num_processes="
            f"{num_processes}, but the run formed with {jax.process_count()} processes; "
            "start every process with the same process count."
        )


def _positions(mesh: Mesh, axes: tuple[str, ...]) -> dict[int, set[tuple[int, ...]]]:
    """For each process, the positions along ``axes`` its devices occupy."""
    dims = [mesh.axis_names.index(ax) for ax in axes]
    positions: dict[int, set[tuple[int, ...]]] = {}
    for idx, device in np.ndenumerate(mesh.devices):
        positions.setdefault(device.process_index, set()).add(tuple(idx[d] for d in dims))
    return positions


def _process_shards(mesh: Mesh, axes: tuple[str, ...], size: int) -> int:
    """The data shards this process feeds; raises if another process feeds one of them too."""
    positions = _positions(mesh, axes)
    here = positions[jax.process_index()]
    sharing = sorted(p for p, other in positions.items() if other & here)
    if len(sharing) > 1:
        axis = axes[0] if len(axes) == 1 else axes
        raise ValueError(
            f"shard_batch: mesh axis {axis!r} (size {size}) does not split the batch between "
            f"processes {sharing}: their devices hold the same rows, so they cannot each pass "
            "their own. Pass the whole global batch on every process with "
            "process_local=False, or give the data axis one position per process at least."
        )
    return len(here)


def shard_batch(
    batch: PyTree,
    mesh: Mesh,
    axis: str | tuple[str, ...] = "data",
    *,
    process_local: bool = True,
) -> PyTree:
    """Makes a global batch sharded over ``axis`` on its leading dimension.

    Leaves are split over the mesh axis ``axis`` and replicated over the others; host
    (numpy) arrays go straight to the devices that hold them. With one process both
    modes are the same: pass the whole batch.

    Args:
      batch: a pytree of arrays with a leading batch dimension.
      mesh: the device mesh.
      axis: the data-parallel mesh axis (or axes).
      process_local: True: every process passes only its own rows, those its devices
        hold along ``axis`` (a contiguous ``1/num_processes`` of the global batch when
        ``axis`` spans the processes evenly, as ``data=2,model=4`` over 2 hosts of 4
        devices); the global batch is their concatenation in mesh order. False: every
        process passes the same whole global batch and only the rows its devices need are
        transferred.

    Returns:
      The batch as global `jax.Array` leaves with ``NamedSharding(mesh, P(axis))``.

    Raises:
      ValueError: if a leaf's batch size is not divisible by the size of ``axis`` (the
        shards this process feeds, for process-local data), naming the leaf, the axis
        and the sizes; or if ``axis`` does not split the batch between processes.

    Example:
      >>> batch = jaxlora.shard_batch({"ids": ids, "labels": labels}, mesh)
    """
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    size = mesh_axes_size(
        mesh, axes, where="shard_batch: ", fix="pass the data-parallel axis, e.g. axis='data'."
    )
    shards = _process_shards(mesh, axes, size) if process_local else size
    sharding = NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else axes[0]))

    def place(key_path: Any, x: Any) -> jax.Array:
        n = np.shape(x)[0] if np.ndim(x) else None
        if n is None or n % shards:
            leaf = f"leaf {path_str(key_path)!r}" if key_path else "the batch"
            per_process = (
                f" on process {jax.process_index()}, which feeds {shards} of its shards"
                if shards != size
                else ""
            )
            raise ValueError(
                f"shard_batch: {leaf} has batch size {n}{per_process}, not divisible by "
                f"mesh axis {axis!r} (size {size}); use a batch size that is a multiple of "
                f"{shards}" + (" per process" if shards != size else "") + "."
            )
        if process_local:
            return jax.make_array_from_process_local_data(sharding, x)
        return jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index])

    return jax.tree_util.tree_map_with_path(place, batch)


def is_primary() -> bool:
    """Whether this is process 0, the one that writes shared files (true with one process)."""
    return jax.process_index() == 0


def from_primary(value: np.ndarray) -> np.ndarray:
    """Process 0's ``value`` on every process (a collective: every process calls it).

    ``value`` must have the same shape and dtype on every process.
    """
    return np.asarray(multihost_utils.broadcast_one_to_all(value))


def to_host(x: Any) -> np.ndarray:
    """The whole value of an array as numpy, gathered from the other processes if need be.

    For an array spread over several processes this is a collective: every process must
    call it for the same arrays in the same order.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def process_flags(flag: bool) -> np.ndarray:
    """Every process's ``flag``, indexed by process (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return np.array([flag])
    return np.asarray(multihost_utils.process_allgather(np.asarray(flag))).reshape(-1)


def same_on_every_process(value: np.ndarray) -> bool:
    """Whether every process holds the same ``value`` (a collective: every process calls it)."""
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(value)))
    return bool((gathered == gathered[:1]).all())
