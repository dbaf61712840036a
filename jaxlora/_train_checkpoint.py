"""Resumable training state: `TrainCheckpointer` and `ResumeState`.

`TrainCheckpointer` keeps the last few complete training states (trainable params,
optimizer state, step, RNG key, data-pipeline state) with orbax's ``CheckpointManager``,
saving asynchronously. Orbax writes each step into a temporary directory and renames it
when complete, so an interrupted save is never mistaken for a complete one.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxlora import _config, _files, _io_errors, _train_state
from jaxlora._adapter_files import shape_differences
from jaxlora._tree import PyTree

_STATE, _META = "state", "meta"


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
        _train_state.check_save_args(
            step, rng, data_state, self._manager.latest_step(), self.directory
        )
        data_state = dict(data_state or {})
        try:
            json.dumps(data_state)
        except TypeError as e:
            raise ValueError(
                f"TrainCheckpointer.save: data_state must be JSON-serialisable ({e}); "
                "store plain ints, floats, strings, lists and dicts."
            ) from None
        trainable, _ = _train_state.trained_part(params)
        if not force and not self._manager.should_save(step):
            # Off the interval: neither gather the state (a collective on the key with
            # several processes) nor wait for the save in flight, so it overlaps training.
            return False
        key_data, impl = _train_state.rng_parts(rng)
        key_data = _train_state.global_rng(key_data, trainable)
        state = {"params": trainable, "opt_state": opt_state, "rng": key_data}
        meta = {
            "data_state": data_state,
            "rng_impl": impl,
            "scales": _train_state.scales(trainable),
        }
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
                    f"{_config.listing(damaged)}",
                    UserWarning,
                    stacklevel=2,
                )
            return resumed
        if damaged:
            raise ValueError(
                f"TrainCheckpointer: every checkpoint in {self.directory} is damaged:"
                f"{_config.listing(damaged)}\nStart afresh in a new directory (or restore "
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
        trainable, rebuild = _train_state.trained_part(params)
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
            "params": _train_state.abstract(trainable),
            "opt_state": _train_state.abstract(opt_state),
            "rng": jax.ShapeDtypeStruct(
                rng_shape, jnp.uint32, sharding=_train_state.rng_sharding(trainable)
            ),
        }
        differences = shape_differences(stored, abstract) or _train_state.scale_differences(
            meta.get("scales"), trainable
        )
        if differences:
            raise ValueError(
                f"TrainCheckpointer.restore: step {step} in {self.directory} does not fit the "
                f"params / opt_state given:{_config.listing(differences)}\nRestore with the "
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
