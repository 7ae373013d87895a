"""Atomic output folders: build beside the target, rename into place only when complete.

The temporary folder is named `.OUT.tmp-<pid>@<host>-<random>`, so a later run can tell a folder left by a
killed run (its process gone) from one that a running conversion is still filling.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UpcycleError

log = logging.getLogger("upcycle")

_OWNER = re.compile(r"(?P<pid>\d+)@(?P<host>.+)-[^-]+")  # <pid>@<host>-<mkdtemp's random part, no dash>


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UpcycleError(f"{out} already exists; choose another OUT or pass --force to replace it")
    if not out.parent.exists():
        raise UpcycleError(f"the folder {out.parent} does not exist; create it first")
    if not out.parent.is_dir():
        raise UpcycleError(f"{out.parent} is a file, not a folder; choose another OUT")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UpcycleError(
            f"{out.parent} is not writable (permission denied or a read-only disk); "
            "choose another OUT or get write access to that folder"
        )


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^\w.-]", "_", socket.gethostname()) or "localhost"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it just belongs to someone else
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary folders beside `out` whose run was killed; returns those removed.

    A folder is stale only when it was made on this host and its process no longer exists. Folders of
    live processes, of other hosts (a shared network disk) and of unknown origin are left alone.
    """
    prefix = f".{out.name}.tmp-"
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed  # the write that follows reports the problem with the folder
    host = _host()
    for path in siblings:
        if not path.name.startswith(prefix) or not path.is_dir() or path.is_symlink():
            continue
        owner = _OWNER.fullmatch(path.name[len(prefix) :])
        if owner is None or owner["host"] != host or _alive(int(owner["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
            log.info("removed a stale temporary folder %s left by a killed run (process %s)", path, owner["pid"])
    return removed


def _name_the_target(exc: OSError, tmp: Path, out: Path) -> None:
    """Point an error at OUT rather than at the hidden temporary folder, which is gone by now.

    A failed write on an open file (a full disk) carries no file name at all: it is then OUT's."""
    base = Path(os.path.abspath(tmp))
    for attr in ("filename", "filename2"):
        name = getattr(exc, attr)
        if isinstance(name, str | os.PathLike) and (path := Path(os.path.abspath(name))).is_relative_to(base):
            setattr(exc, attr, str(out / path.relative_to(base)))
    if exc.filename is None:
        exc.filename = str(out)


def fsync_folder(path: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then each folder, so that what a rename publishes is on disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(Path(folder))


@contextmanager
def staged_folder(out: Path, force: bool, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure it is removed.

    The one staged-folder tool: convert's OUT, train's final/ and checkpoints, the token cache's entries.
    keep_existing: `out` is a cache entry that any process may build: when another process published it first
    (a lost race), ours is dropped and theirs kept, rather than refused or replaced.
    """
    out = Path(out)
    if not keep_existing:
        check_target(out, force)
    remove_stale(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}@{_host()}-", dir=out.parent))
    except OSError as exc:
        exc.filename, exc.filename2 = str(out.parent), None  # the random name means nothing to the user
        raise
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; OUT gets the usual mode
        yield tmp
        fsync_tree(tmp)
        if keep_existing and out.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_folder(out.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            _name_the_target(exc, tmp, out)
        raise
