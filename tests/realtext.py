"""Real English text for tests: the Jargon File from Debian's `jargon-text` package (public domain).

Fetched once with apt-get (the only registries these machines reach are package registries) and kept in a
persistent cache outside the repository, so the text is never committed and the suite stays offline after the
first run.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "jargon-text"
MEMBER = "usr/share/doc/jargon-text/jargon.txt.gz"
MIN_BYTES = 1_500_000  # the 4.4.7 text is 1.68 MB; anything much smaller is a broken fetch


class RealTextUnavailable(Exception):
    """apt-get could not provide the package (no apt, no network, no permission): the tests that need it skip."""


def cache_root(upcycle_cache: str | None) -> Path:
    """$UPCYCLE_CACHE/realtext when set (CI points it into the clone), else ~/.cache/upcycle/realtext."""
    if upcycle_cache:
        return Path(upcycle_cache) / "realtext"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "upcycle" / "realtext"


def jargon_file(root: Path) -> Path:
    """Path of the Jargon File as plain UTF-8 text (1.6 M characters), fetched into ROOT on first use."""
    target = root / "jargon.txt"
    if target.is_file() and target.stat().st_size >= MIN_BYTES:
        return target
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RealTextUnavailable(f"{tool} is not available to fetch Debian's {PACKAGE}")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        work = Path(tmp)
        deb = _download(work)
        _run(["dpkg-deb", "-x", str(deb), str(work / "x")], "dpkg-deb -x")
        text = work / "jargon.txt"
        with gzip.open(work / "x" / MEMBER) as src, open(text, "wb") as dst:
            shutil.copyfileobj(src, dst)
        if text.stat().st_size < MIN_BYTES:
            raise RealTextUnavailable(f"{PACKAGE} gave only {text.stat().st_size} bytes of text")
        os.replace(text, target)  # atomic: a concurrent or killed fetch never leaves half a file under the name
    return target


def _download(work: Path) -> Path:
    """apt-get download; if the package lists are missing or stale, `apt-get update -qq` once and try again."""
    try:
        _run(["apt-get", "download", PACKAGE], "apt-get download", cwd=work)
    except RealTextUnavailable:
        try:
            _run(["apt-get", "update", "-qq"], "apt-get update", timeout=300)
        except RealTextUnavailable as exc:
            raise RealTextUnavailable(f"apt-get download {PACKAGE} failed, and so did {exc}") from None
        _run(["apt-get", "download", PACKAGE], "apt-get download (after apt-get update)", cwd=work)
    debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise RealTextUnavailable(f"apt-get download {PACKAGE} wrote no .deb file")
    return debs[-1]


def _run(cmd: list[str], what: str, cwd: Path | None = None, timeout: int = 120) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RealTextUnavailable(f"{what}: {exc}") from None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise RealTextUnavailable(f"{what} exited {proc.returncode}: {lines[-1] if lines else 'no output'}")
