"""Each thread's CPU time (user, system) of one `upcycle convert`, run in this process (issue 27).

Usage: python benchmarks/convert_thread_cpu.py SRC OUT [convert flags...]

Runs `upcycle convert SRC OUT FLAGS` through the CLI in this process, then prints the user and system time of every
thread still alive (/proc/self/task: the main thread is the writer) and the whole process's (getrusage, which also
counts threads that have ended: the expert workers, the source hashing). A CPU-time profile, so it can be taken on
a loaded machine, where wall times cannot; the code imported is whatever PYTHONPATH gives.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from pathlib import Path


def main() -> None:
    from upcycle_cli.main import main as cli

    sys.argv = ["upcycle", "convert", *sys.argv[1:]]
    with contextlib.suppress(SystemExit):
        cli()
    tick = os.sysconf("SC_CLK_TCK")
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        user, system = int(fields[11]) / tick, int(fields[12]) / tick
        if user or system:
            main_thread = " (main: the writer)" if int(tid) == os.getpid() else ""
            print(f"thread {tid}{main_thread}: user {user:.2f} s, system {system:.2f} s", file=sys.stderr)
    r = resource.getrusage(resource.RUSAGE_SELF)
    print(f"process: user {r.ru_utime:.2f} s, system {r.ru_stime:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
