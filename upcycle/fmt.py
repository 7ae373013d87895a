"""Numbers for people: parameter counts, byte sizes, rates. The one place each format is written.

count(135_000_000) == "135.00M"      parameters (the plan, inspect, the model card)
human_bytes(2_500_000) == "2.50 MB"  files and checkpoints, decimal units as disks are sold
gib(3 * 2**30) == "3.00 GiB"         memory, binary units as GPUs report it
si(12_345.0) == "12.3K"              rates in a progress line (tokens/s)
"""

from __future__ import annotations


def count(n: int) -> str:
    """A parameter count: 2 decimals and B/M/K, or the plain number under a thousand."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    """A size on disk in decimal units (GB, MB, KB), or bytes under a kilobyte."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def gib(n: int) -> str:
    """A memory size in binary units: GiB from one GiB up, MiB below."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def si(x: float) -> str:
    """A rate with one decimal and M/K, or a whole number under a thousand."""
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.0f}"
