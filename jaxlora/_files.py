"""Replacing a saved directory so that a complete copy is always on disk.

A save is written into a private staging directory next to its target and only then
renamed into place; the previous version is moved aside first and deleted last. Killed
at any point, the target is either the old complete directory or the new complete one
(or, between the two renames, absent, with both complete copies in the staging
directory, which `missing_hint` points to).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_STAGING = ".staging-"
_PREVIOUS = "previous"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a path to write the new version of ``target`` to; installs it on success.

    Args:
      target: the directory to create or replace.

    Yields:
      A path that does not exist yet, on the same filesystem as ``target``. The block
      must create it as a directory only once it is complete (write elsewhere, then
      rename; orbax does so). If the block raises, ``target`` is left untouched and the
      partial write is deleted.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_STAGING}", dir=target.parent))
    new = staging / target.name
    try:
        yield new
        if not new.is_dir():
            raise RuntimeError(f"internal error: nothing was written to {new}")
        if target.exists():
            os.rename(target, staging / _PREVIOUS)
        os.rename(new, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
