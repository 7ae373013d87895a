"""What the user is told when something fails, and with which exit code.

The library raises UpcycleError for bad input (exit 2). Operating-system errors are not caught where they
happen: the CLI turns every OSError into one line with `describe_os_error`, which is the one place that
decides whether the user can fix it (exit 2) or the machine is at fault (exit 3).
"""

from __future__ import annotations

import errno
import os

EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3


class UpcycleError(Exception):
    """A problem with the user's input, stated in one line with what to do about it."""

    exit_code = EXIT_BAD_INPUT


class NoForm(UpcycleError):
    """The target asked for (or tried by --target auto) cannot hold the request exactly, or a --serve engine
    cannot load it: --target auto goes on to the next target, an explicit --target is refused with this line."""


_ACCESS = "give your user access to it (chmod, chown) or choose another path"
_CHECK = "check the path"
_SPACE = "free some space on that disk or write somewhere else (another OUT), then run again"

# errno -> (exit code, what happened, what to do)
OS_ERRORS: dict[int, tuple[int, str, str]] = {
    errno.EACCES: (EXIT_BAD_INPUT, "permission denied", _ACCESS),
    errno.EPERM: (EXIT_BAD_INPUT, "operation not permitted", _ACCESS),
    errno.ENOENT: (EXIT_BAD_INPUT, "no such file or folder", _CHECK),
    errno.ENOTDIR: (EXIT_BAD_INPUT, "a part of this path is not a folder", _CHECK),
    errno.EISDIR: (EXIT_BAD_INPUT, "is a folder where a file was expected", _CHECK),
    errno.EEXIST: (EXIT_BAD_INPUT, "already exists", "remove it or choose another path"),
    errno.ENOTEMPTY: (EXIT_BAD_INPUT, "the folder is not empty", "remove it or choose another path"),
    errno.EROFS: (EXIT_BAD_INPUT, "read-only file system", "choose a path on a writable disk"),
    errno.ENAMETOOLONG: (EXIT_BAD_INPUT, "file name too long", "choose a shorter path"),
    errno.ELOOP: (EXIT_BAD_INPUT, "too many levels of symbolic links", "check the links in this path"),
    errno.EFBIG: (EXIT_BAD_INPUT, "file too large for this file system", "pass a smaller --max-shard-size"),
    errno.ENOSPC: (EXIT_ENVIRONMENT, "no space left on the device", _SPACE),
    errno.EDQUOT: (EXIT_ENVIRONMENT, "disk quota exceeded", _SPACE),
    errno.EIO: (
        EXIT_ENVIRONMENT,
        "input/output error",
        "the disk or network file system failed; check it (dmesg) and run again",
    ),
    errno.ENOMEM: (EXIT_ENVIRONMENT, "out of memory", "close other programs and run again"),
    errno.EMFILE: (EXIT_ENVIRONMENT, "too many open files", "raise the limit (ulimit -n) and run again"),
    errno.ENFILE: (EXIT_ENVIRONMENT, "too many open files on this system", "run again when the system is less busy"),
    errno.ESTALE: (EXIT_ENVIRONMENT, "stale network file handle", "remount the network file system and run again"),
}
_UNKNOWN = "check the disk and the path, then run again"


def describe_os_error(exc: OSError) -> tuple[int, str]:
    """(exit code, one line naming the file, what happened and what to do) for any OSError."""
    if exc.errno is None:  # raised by a library with its own message, usually about what it was given
        text = str(exc).strip().splitlines()
        return EXIT_BAD_INPUT, text[0] if text else type(exc).__name__
    code, what, hint = OS_ERRORS.get(exc.errno, (EXIT_ENVIRONMENT, (exc.strerror or "").lower(), _UNKNOWN))
    names = [os.fsdecode(n) if isinstance(n, bytes) else str(n) for n in (exc.filename, exc.filename2) if n is not None]
    where = " -> ".join(dict.fromkeys(names))  # a rename names two files, sometimes the same one
    return code, f"{where}: {what}; {hint}" if where else f"{what}; {hint}"
