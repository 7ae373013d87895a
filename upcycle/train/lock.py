"""One process per RUN_DIR: a lock file beside it (`.RUN_DIR.lock`), held with flock for the run's whole life.

The kernel drops an flock when its process dies, however it dies, so a lock left by a killed run is free to take;
the file still names that process, and taking it over says so. The file sits beside RUN_DIR, not in it, so that
--force (which moves RUN_DIR aside) and a second process agree on the same lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UpcycleError


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip()


@contextmanager
def run_lock(run_dir: Path, note: Callable[[str], None]) -> Iterator[None]:
    """Hold RUN_DIR's lock until the block ends; refuse (one line naming the holder, exit 2) while another process
    holds it. A folder whose parent does not exist yet takes no lock (setup refuses it with its own message)."""
    run_dir = Path(run_dir).absolute()
    if not run_dir.parent.is_dir():
        yield
        return
    path = lock_path(run_dir)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "unknown"
            os.close(fd)
            raise UpcycleError(
                f"{run_dir} is in use by another `upcycle train` (process {holder}); wait for it to end or stop it, "
                "then run again"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: take the new one
    try:
        previous = _holder(fd)
        if previous:
            note(f"took over the lock of {run_dir} left by process {previous}, which is no longer running")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still held, so no one takes a lock on a file that is going away
        os.close(fd)
