"""Replacing a saved directory so that a complete copy is always on disk.

A save is written into a private staging directory next to its target and only then
renamed into place; the previous version is moved aside first and deleted last. Killed
at any point, the target is either the old complete directory or the new complete one
(or, between the two renames, absent, with both complete copies in the staging
directory, which `missing_hint` points to). The next successful save to the target
deletes the staging directories a killed save left.

With several JAX processes (``jax.distributed``) every process saves to the same path
on a filesystem they share: process 0 makes the staging directory and tells the others
its name, every process writes its part, and process 0 alone installs the result while
the others wait for it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np

from jaxlora import _io_errors
from jaxlora._distributed import from_primary, is_primary, process_flags

_STAGING = ".staging-"
_PREVIOUS = "previous"
_TOKEN_BYTES = 8


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _staging_path(target: Path, token: np.ndarray) -> Path:
    return target.parent / f".{target.name}{_STAGING}{token.tobytes().hex()}"


def _make_staging(target: Path) -> Path:
    """A new empty staging directory for ``target``, made by process 0, named alike on all."""
    token = np.zeros(_TOKEN_BYTES, np.uint8)
    if is_primary():
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            token = np.frombuffer(secrets.token_bytes(_TOKEN_BYTES), np.uint8)
            try:
                _staging_path(target, token).mkdir(mode=0o700)
                break
            except FileExistsError:
                continue
    return _staging_path(target, from_primary(token))


def _remove_stale_staging(target: Path) -> None:
    """Deletes the staging directories of ``target`` that interrupted saves left behind.

    Called once a save is installed, so their copies (`missing_hint`) are out of date.
    Only one save to a target may run at a time: another one's staging goes too.
    """
    for stale in target.parent.glob(f".{target.name}{_STAGING}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _install(new: Path, target: Path, staging: Path) -> None:
    if not new.is_dir():
        raise RuntimeError(f"internal error: nothing was written to {new}")
    previous = staging / _PREVIOUS
    if target.exists():
        os.rename(target, previous)
    try:
        os.rename(new, target)
    except BaseException:
        if previous.is_dir():  # put the old version back before the staging dir is deleted
            os.rename(previous, target)
        raise
    _fsync_dir(target.parent)


def _raise(who: str, target: Path, e: BaseException) -> NoReturn:
    """Raises ``e``, as one clear `OSError` if it comes from the OS (disk full, ...)."""
    clear = _io_errors.write_error(who, target, e, "What was there is unchanged.")
    if clear is None:
        raise e
    raise clear from e


@contextlib.contextmanager
def replacing(target: str | os.PathLike, *, who: str) -> Iterator[Path]:
    """Yields a path to write the new version of ``target`` to; installs it on success.

    With several JAX processes, every process must enter it with the same ``target``
    (on a shared filesystem) and run the block: each process writes its shards into the
    yielded path (orbax's multi-process save does), or only process 0 writes (plain
    files; check `_distributed.is_primary`). The processes then agree whether every block
    succeeded: if one raised, it re-raises and the others raise an error naming it, with
    ``target`` untouched (rather than waiting for it at a barrier). Otherwise process 0
    installs the new version; no process leaves before it is in place, and if installing
    fails every process raises. Once installed, the staging directories that earlier
    interrupted saves to ``target`` left are deleted.

    Args:
      target: the directory to create or replace.
      who: the saving function, for the message of an OS failure (disk full, no
        permission, ...), which is raised as one clear `OSError` naming ``target``.

    Yields:
      A path that does not exist yet, on the same filesystem as ``target``, the same on
      every process. The block must create it as a directory only once it is complete
      (write elsewhere, then rename; orbax does so). If the block raises, ``target`` is
      left untouched and the partial write is deleted.
    """
    target = Path(target).absolute()
    try:
        staging = _make_staging(target)
    except Exception as e:
        _raise(who, target, e)
    new = staging / target.name
    error = None
    try:
        yield new
    except Exception as e:  # agreed on below, so no process waits for one that gave up
        error = e
    except BaseException:  # interrupted: no collective, just leave nothing half-written
        if is_primary():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    failed = [i for i, ok in enumerate(process_flags(error is None)) if not ok]
    if failed:
        if is_primary():
            shutil.rmtree(staging, ignore_errors=True)
        if error is not None:
            _raise(who, target, error)
        raise RuntimeError(
            f"process(es) {failed} failed to write their part of {target}, which is left as "
            "it was; see their error."
        )
    failure = None
    if is_primary():
        try:
            _install(new, target, staging)
        except BaseException as e:
            failure = e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if failure is None:
            _remove_stale_staging(target)
    if from_primary(np.int32(failure is not None)):  # also waits for process 0 to finish
        if failure is not None:
            _raise(who, target, failure)
        raise RuntimeError(
            f"process 0 could not install the new version of {target}; see its error."
        )


def check_parent(target: str | os.PathLike, *, who: str) -> None:
    """Raises a clear error if ``target`` cannot be created because an ancestor is a file.

    Args:
      target: the directory about to be written.
      who: the calling function, for the message.
    """
    target = Path(target).absolute()
    for ancestor in target.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise NotADirectoryError(
                    f"{who}: cannot write {target}: {ancestor} is a file, not a directory. "
                    "Choose a path whose parents are directories (or can be created)."
                )
            return


def missing_hint(target: str | os.PathLike) -> str:
    """Where the complete copies are if a save to ``target`` was interrupted, or ``""``."""
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return ""
    copies = [
        copy
        for staging in sorted(target.parent.glob(f".{target.name}{_STAGING}*"))
        for copy in (staging / _PREVIOUS, staging / target.name)
        if copy.is_dir()
    ]
    if not copies:
        return ""
    return (
        f" A save to it was interrupted and left these complete copies: "
        f"{', '.join(map(str, copies))} ('{_PREVIOUS}' is the version before that save). "
        f"Move the one you want to {target}."
    )
