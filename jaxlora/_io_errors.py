"""Failed reads and writes as one clear error: the path, the cause and the fix.

Orbax and tensorstore report an operating-system failure as a raw `OSError` from deep
inside a save, or as a `ValueError` whose text holds the OS error code
(``[os_error_code='28']``) and the whole tensorstore spec (a kilobyte of JSON);
safetensors raises its own error type naming ``(os error 27)``. These
helpers find the OS error behind either and say it in a line or two; the original
stays the ``__cause__``.
"""

from __future__ import annotations

import errno
import os
import re

# tensorstore writes [os_error_code='28'], safetensors (os error 27)
_OS_CODE = re.compile(r"os_error_code='?(\d+)|\(os error (\d+)\)")
# tensorstore's trailing annotations, e.g. [tensorstore_spec='{...}'] [source_location='...']
_ANNOTATION = re.compile(r"\s*\[\w+='(?:[^'\\]|\\.)*'\]")
_BRIEF_CHARS = 400

_FULL = ("the disk is full", "Free space there, or save elsewhere.")
_DENIED = (
    "permission denied",
    "Save to a directory you can write to, or change its permissions.",
)
# errno -> (the cause, the fix)
_CAUSES = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: ("the disk quota is exceeded", "Free space in your quota, or save elsewhere."),
    errno.EFBIG: (
        "a file would exceed the largest file size allowed",
        "Raise the process's file size limit (`ulimit -f`) or save to another filesystem.",
    ),
    errno.EACCES: _DENIED,
    errno.EPERM: _DENIED,
    errno.EROFS: ("the filesystem is read-only", "Save to a writable filesystem."),
    errno.ENAMETOOLONG: ("a file name is too long", "Choose a shorter path."),
}


def os_errno(e: BaseException) -> int | None:
    """The OS error code behind ``e`` (an `OSError`'s, or one tensorstore quotes), or None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        if match := _OS_CODE.search(str(e)):
            return int(match.group(1) or match.group(2))
        e = e.__cause__ or e.__context__
    return None


def brief(e: BaseException) -> str:
    """``"Type: first line"`` of ``e``, without tensorstore's spec, at most a few hundred chars."""
    lines = _ANNOTATION.sub("", str(e)).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= _BRIEF_CHARS else text[: _BRIEF_CHARS - 3] + "..."


def write_error(who: str, path: str | os.PathLike, e: BaseException, kept: str) -> OSError | None:
    """A clear `OSError` for a write to ``path`` that failed with ``e``, or None if ``e``
    comes from no OS failure this knows (then re-raise ``e`` as it is).

    Args:
      who: the function that wrote, for the message.
      path: what it was writing.
      e: the error it got.
      kept: what is left as it was, e.g. ``"Nothing there was changed."``.

    Returns:
      The `OSError` subclass of the code (`PermissionError`, ...) with ``errno`` set.
    """
    code = os_errno(e)
    if code not in _CAUSES:
        return None
    cause, fix = _CAUSES[code]
    kind = type(OSError(code, os.strerror(code)))  # OSError picks the subclass of the code
    error = kind(f"{who}: cannot write {path}: {cause} ({os.strerror(code)}). {kept} {fix}")
    error.errno = code
    return error
