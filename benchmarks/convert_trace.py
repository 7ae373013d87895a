"""Wall-time trace of one `upcycle convert`, run in this process (issue 27): where the writer waits for computed
tensors, when the expert workers are busy or idle, and what the single-threaded start-up does.

Usage: python benchmarks/convert_trace.py [--json FILE] SRC OUT [convert flags...]

Wraps (in this process only; the conversion's bytes are not touched) the phases of `pipeline.convert` before the
weights (resolve, plan_for, ...), `pipeline.write_weights`, the writer's `put`/`put_range` (one interval per
tensor), `Ahead.get` (the writer asking for a computed tensor until it has it: its wait), `LayerFFNs._make` (a
worker making one tensor) and `Checkpoint.load` (a dense FFN tensor read), each an interval (thread, start, end) in
seconds since the process started; a sampler thread reads the process's CPU time every 50 ms. Prints a summary:
the start-up's phases, the writer's time per kind (waiting, writing computed tensors, kernel copies), the workers'
busy time, how long 0, 1 or 2 workers were busy during the weights, and the cores kept busy (CPU s / wall s) per
phase. The code imported is whatever PYTHONPATH gives.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402


def process_age() -> float:
    """Seconds since this process started (from /proc), at the moment of the call."""
    tick = os.sysconf("SC_CLK_TCK")
    stat = Path("/proc/self/stat").read_text()
    start = int(stat[stat.rindex(")") + 2 :].split()[19]) / tick
    return float(Path("/proc/uptime").read_text().split()[0]) - start


OFFSET = process_age() - (time.perf_counter() - T0)  # perf_counter() - T0 + OFFSET: seconds since the process began
EVENTS: list[tuple[str, str, float, float, str]] = []  # (kind, thread, start, end, what)
SAMPLES: list[tuple[float, float]] = []  # (t, process CPU s)
LOCK = threading.Lock()


def now() -> float:
    return time.perf_counter() - T0 + OFFSET


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def wrap(owner, name: str, kind: str, what=lambda *a, **k: "") -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        t = now()
        try:
            return fn(*args, **kwargs)
        finally:
            with LOCK:
                EVENTS.append((kind, threading.current_thread().name, t, now(), str(what(*args, **kwargs))))

    setattr(owner, name, traced)


def sampler(stop: threading.Event) -> None:
    while not stop.wait(0.05):
        SAMPLES.append((now(), cpu()))


def busy_profile(intervals: list[tuple[float, float]], lo: float, hi: float) -> dict[int, float]:
    """Seconds of [lo, hi) during which k of INTERVALS overlap, per k."""
    edges = sorted([(max(a, lo), 1) for a, b in intervals if b > lo and a < hi] +
                   [(min(b, hi), -1) for a, b in intervals if b > lo and a < hi])  # fmt: skip
    out: dict[int, float] = {}
    level, at = 0, lo
    for t, d in edges:
        out[level] = out.get(level, 0.0) + t - at
        level, at = level + d, t
    out[level] = out.get(level, 0.0) + hi - at
    return out


def cpu_between(lo: float, hi: float) -> float:
    inside = [c for t, c in SAMPLES if lo <= t <= hi]
    return inside[-1] - inside[0] if len(inside) > 1 else float("nan")


def main() -> None:
    args = sys.argv[1:]
    out_json = None
    if args[:1] == ["--json"]:
        out_json, args = Path(args[1]), args[2:]
    stop = threading.Event()
    SAMPLES.append((now(), cpu()))
    threading.Thread(target=sampler, args=(stop,), daemon=True).start()
    marks = {"script": now()}
    import torch  # noqa: F401

    marks["torch imported"] = now()
    from upcycle.convert import pipeline
    from upcycle.convert.execute import LayerFFNs
    from upcycle.convert.methods.ahead import Ahead
    from upcycle.convert.writer import ShardedWriter
    from upcycle.source import Checkpoint
    from upcycle_cli.main import main as cli

    marks["upcycle imported"] = now()
    for name in ("resolve", "expert_sources", "plan_for", "check_room", "write_weights", "write_config",
                 "copy_side_files", "make_recipe", "write_card_and_recipe"):  # fmt: skip
        if hasattr(pipeline, name):
            wrap(pipeline, name, "phase", lambda *a, name=name, **k: name)
    wrap(ShardedWriter, "put", "put", lambda self, name, *a, **k: name)
    wrap(ShardedWriter, "put_range", "put_range", lambda self, name, *a, **k: name)
    wrap(Ahead, "get", "get", lambda self, tensor, *a, **k: tensor[:3])
    wrap(LayerFFNs, "_make", "make", lambda self, key, out: key[:3])
    wrap(Checkpoint, "load", "load", lambda self, key, *a, **k: key)
    sys.argv = ["upcycle", "convert", *args]
    marks["convert"] = now()
    with contextlib.suppress(SystemExit):
        cli()
    marks["end"] = now()
    stop.set()
    SAMPLES.append((now(), cpu()))
    summary(marks, out_json)


def summary(marks: dict[str, float], out_json: Path | None) -> None:
    phases = {w: (a, b) for k, _, a, b, w in EVENTS if k == "phase"}
    ww = phases.get("write_weights", (marks["convert"], marks["end"]))
    print(f"process start -> script {marks['script']:.2f} s; torch imported {marks['torch imported']:.2f}; "
          f"upcycle imported {marks['upcycle imported']:.2f}; end {marks['end']:.2f}")  # fmt: skip
    for w, (a, b) in sorted(phases.items(), key=lambda x: x[1]):
        print(f"  {w:22s} {a:7.2f} -> {b:7.2f}  ({b - a:.2f} s, CPU {cpu_between(a, b):.2f} s)")
    print(f"before write_weights: {ww[0]:.2f} s (CPU {cpu_between(0, ww[0]):.2f} s from the first sample); "
          f"write_weights {ww[1] - ww[0]:.2f} s (CPU {cpu_between(*ww):.2f} s, "
          f"{cpu_between(*ww) / (ww[1] - ww[0]):.2f} cores busy); after {marks['end'] - ww[1]:.2f} s")  # fmt: skip
    gets = [(a, b) for k, _, a, b, _ in EVENTS if k == "get"]
    puts = [(a, b, w) for k, _, a, b, w in EVENTS if k == "put"]
    ranges = [(a, b) for k, _, a, b, _ in EVENTS if k == "put_range"]
    wait = sum(b - a for a, b in gets)
    long_waits = sorted((b - a for a, b in gets), reverse=True)[:5]
    print(f"writer: {len(gets)} computed tensors asked for, waited {wait:.2f} s in all "
          f"(longest {', '.join(f'{x * 1000:.0f}' for x in long_waits)} ms); "
          f"put (every produced tensor, waits included) {sum(b - a for a, b, _ in puts):.2f} s; "
          f"put_range (kernel copies) {sum(b - a for a, b in ranges):.2f} s over {len(ranges)}")  # fmt: skip
    first_get = min((a for a, _ in gets), default=None)
    if first_get is not None:
        print(f"  first computed tensor asked for at {first_get:.2f} s ({first_get - ww[0]:.2f} s into write_weights)")
    makes = [(t, a, b) for k, t, a, b, _ in EVENTS if k == "make"]
    loads = [(t, a, b) for k, t, a, b, _ in EVENTS if k == "load"]
    for t in sorted({t for t, _, _ in makes}):
        mine = [(a, b) for x, a, b in makes if x == t]
        print(f"worker {t}: {len(mine)} tensors, busy {sum(b - a for a, b in mine):.2f} s, "
              f"first start {min(a for a, _ in mine):.2f}, last end {max(b for _, b in mine):.2f}")  # fmt: skip
    print(f"dense FFN loads: {len(loads)}, {sum(b - a for _, a, b in loads):.2f} s, threads "
          f"{sorted({t for t, _, _ in loads})}")  # fmt: skip
    if makes:
        prof = busy_profile([(a, b) for _, a, b in makes], *ww)
        print("during write_weights, workers busy: " + ", ".join(f"{k}: {v:.2f} s" for k, v in sorted(prof.items())))
    if out_json is not None:
        out_json.write_text(json.dumps({"marks": marks, "events": EVENTS, "samples": SAMPLES}) + "\n")


if __name__ == "__main__":
    main()
