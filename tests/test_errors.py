"""What users meet when the machine, not the input, gets in the way: file-system errors, signals, stale
temporary folders, and output that scripts read (`--json -`).

Every OSError becomes one line on stderr naming the file: exit 2 when the user can fix it, 3 when the
machine is at fault. Permission cases run the installed `upcycle` script in a child process that file
permissions really apply to (see `unprivileged`)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from upcycle.errors import describe_os_error
from upcycle_cli.main import run

UPCYCLE = Path(sys.executable).with_name("upcycle")


def leftovers(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-"))


def assert_clean(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert not leftovers(out), f"temporary folders left beside {out}: {leftovers(out)}"


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("error: ") and "Traceback" not in err, lines[0]
    return lines[0]


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


# --- the errno table ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, exit_code, hint",
    [
        (errno.EACCES, 2, "chmod"),
        (errno.ENOENT, 2, "check the path"),
        (errno.ENOTDIR, 2, "check the path"),
        (errno.EROFS, 2, "writable disk"),
        (errno.ENOSPC, 3, "free some space"),
        (errno.EDQUOT, 3, "free some space"),
        (errno.EIO, 3, "dmesg"),
        (errno.ETIMEDOUT, 3, "run again"),  # not in the table: the machine's fault, in the system's words
    ],
    ids=["EACCES", "ENOENT", "ENOTDIR", "EROFS", "ENOSPC", "EDQUOT", "EIO", "ETIMEDOUT"],
)
def test_every_errno_names_the_file_and_what_to_do(code, exit_code, hint):
    exc = OSError(code, os.strerror(code), "/data/models/shard.safetensors")
    got, message = describe_os_error(exc)
    assert got == exit_code
    assert message.startswith("/data/models/shard.safetensors: ")
    assert hint in message and "\n" not in message


# --- environment faults, in process -------------------------------------------------------------------------


class FillsUp:
    """Stands in for the `os` module of the shard writer: the disk is full once `room` bytes are written."""

    def __init__(self, room: int):
        self.room, self.hit = room, False

    def __getattr__(self, name):
        return getattr(os, name)

    def _spend(self, n: int) -> None:
        if n > self.room:
            self.hit = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as os.write raises it: no file name
        self.room -= n

    def write(self, fd, data):
        self._spend(len(data))
        return os.write(fd, data)

    def copy_file_range(self, src, dst, count, offset_src=None, offset_dst=None):
        self._spend(count)
        return os.copy_file_range(src, dst, count, offset_src, offset_dst)


def test_disk_full_midway_is_exit_3_and_leaves_nothing(capsys, monkeypatch, dense_store, out):
    from upcycle.convert import writer

    src = dense_store("llama")
    disk = FillsUp(room=200_000)  # the MoE needs about 870 KB; the free-space check sees the real disk
    monkeypatch.setattr(writer, "os", disk)
    capsys.readouterr()
    code = run(["convert", str(src), str(out)])
    cap = capsys.readouterr()
    assert disk.hit, "the writer never ran out of room"
    assert code == 3, cap.err
    line = one_error_line(cap.err)
    assert f"{out}: no space left on the device" in line and "free some space" in line
    assert_clean(out)


def test_read_only_midway_names_the_file_in_out(capsys, monkeypatch, dense_store, out):
    """An error on a file in the hidden temporary folder is reported under OUT's name."""
    from upcycle.convert.writer import INDEX_NAME, ShardedWriter

    def finish(self, total_parameters):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.folder / INDEX_NAME))

    monkeypatch.setattr(ShardedWriter, "finish", finish)
    capsys.readouterr()
    code = run(["convert", str(dense_store("llama")), str(out)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"error: {out / INDEX_NAME}: read-only file system; choose a path on a writable disk")
    assert_clean(out)


def test_io_error_reading_the_source_is_exit_3(capsys, monkeypatch, dense_store):
    import upcycle.source

    def read_header(file):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(file))

    monkeypatch.setattr(upcycle.source, "read_header", read_header)
    src = dense_store("llama")
    capsys.readouterr()
    assert run(["inspect", str(src)]) == 3
    line = one_error_line(capsys.readouterr().err)
    assert f"{src}/model-00001-of-" in line and "input/output error" in line


# --- permissions, as a user they apply to ------------------------------------------------------------------

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_root_file_powers() -> None:
    """preexec_fn: root keeps its uid but loses the two capabilities that let it ignore file permissions.

    Switching to `nobody` is not possible here: the Python interpreter lives under /root (mode 700), so
    nobody could not even start it. Without these capabilities root is held to the owner bits of its files
    like any user, and the test files are root's."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture(scope="module")
def unprivileged(tmp_path_factory):
    """unprivileged(*args) -> CompletedProcess of the `upcycle` script, run so that permissions apply.

    HOME and every cache point at a folder it cannot write, so nothing relies on writing there."""
    if not UPCYCLE.is_file():
        pytest.skip(f"the console script {UPCYCLE} is not installed (pip install -e .)")
    root = os.geteuid() == 0
    preexec = _drop_root_file_powers if root else None
    home = tmp_path_factory.mktemp("readonly-home")
    locked = home / "locked.txt"
    locked.write_text("secret")
    locked.chmod(0o000)
    home.chmod(0o555)
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "HF_HUB_CACHE")}
    env |= {"HOME": str(home), "UPCYCLE_CACHE": str(home / "cache"), "HF_HOME": str(home / "hf")}
    env |= {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    probe = subprocess.run(
        [sys.executable, "-c", f"open({str(locked)!r}).read()"], preexec_fn=preexec, capture_output=True, text=True
    )
    if probe.returncode == 0:
        pytest.skip("file permissions cannot be made to apply here (running as root without CAP_SETPCAP?)")

    def call(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(UPCYCLE), *map(str, args)], env=env, preexec_fn=preexec, capture_output=True, text=True, timeout=300
        )

    yield call
    home.chmod(0o755)


def _shard(src: Path) -> Path:
    return sorted(src.glob("model-*.safetensors"))[0]


def _lock(path: Path) -> Path:
    if path.is_dir():
        path.chmod(0o555)
    else:
        path.chmod(0o000)
    return path


# (command, what is locked) -> the file the error must name
PERMISSION_CASES = {
    "convert-shard": lambda src, moe, out: (["convert", src, out], _lock(_shard(src))),
    "convert-config": lambda src, moe, out: (["convert", src, out], _lock(src / "config.json")),
    "convert-tokenizer": lambda src, moe, out: (["convert", src, out], _lock(src / "tokenizer.json")),
    "convert-out-parent": lambda src, moe, out: (["convert", src, out], _lock(out.parent)),
    "verify-shard": lambda src, moe, out: (["verify", src, moe, "--no-record"], _lock(_shard(src))),
    "verify-tokenizer": lambda src, moe, out: (
        ["verify", src, moe, "--no-record", "--text", src / "generation_config.json"],
        _lock(src / "tokenizer.json"),
    ),
    "inspect-config": lambda src, moe, out: (["inspect", src], _lock(src / "config.json")),
    "inspect-shard": lambda src, moe, out: (["inspect", moe], _lock(_shard(moe))),
    "push-shard": lambda src, moe, out: (["push", moe, "me/moe", "--dry-run"], _lock(_shard(moe))),
}


@pytest.fixture(scope="module")
def converted(dense_store, tmp_path_factory) -> Path:
    moe = tmp_path_factory.mktemp("converted") / "moe"
    assert run(["convert", str(dense_store("llama")), str(moe), "--experts", "4"]) == 0
    return moe


@pytest.mark.parametrize("case", PERMISSION_CASES)
def test_permission_denied_is_one_line_exit_2(unprivileged, dense, converted, tmp_path, case):
    src = dense("llama")
    moe = tmp_path / "moe"
    shutil.copytree(converted, moe)
    (tmp_path / "target").mkdir()
    out = tmp_path / "target" / "out"
    args, locked = PERMISSION_CASES[case](src, moe, out)
    try:
        result = unprivileged(*args)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2, (result.returncode, result.stderr)
    line = one_error_line(result.stderr)
    assert str(locked) in line, f"{locked} is not named in {line!r}"
    if locked.is_dir():
        assert "is not writable" in line and "choose another OUT" in line
    else:
        assert "permission denied" in line and "chmod" in line
    assert_clean(out)


# --- stale temporary folders ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale(out: Path, pid: int, host: str | None = None) -> Path:
    host = host or socket.gethostname()
    folder = out.parent / f".{out.name}.tmp-{pid}@{host}-abc_1234"
    folder.mkdir()
    (folder / "model-00001-of-00001.safetensors").write_bytes(b"half a shard")
    return folder


def test_a_stale_temporary_folder_is_removed_with_a_note(capsys, dense_store, out):
    stale = _stale(out, _dead_pid())
    capsys.readouterr()
    assert run(["convert", str(dense_store("llama")), str(out)]) == 0
    err = capsys.readouterr().err
    assert not stale.exists()
    assert f"note: removed a stale temporary folder {stale} left by a killed run" in err
    assert not leftovers(out) and (out / "config.json").is_file()


def test_temporary_folders_of_live_runs_and_other_hosts_are_kept(capsys, dense_store, out):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = _stale(out, sleeper.pid)
        elsewhere = _stale(out, _dead_pid(), host="another-host.example")
        capsys.readouterr()
        assert run(["convert", str(dense_store("llama")), str(out)]) == 0
        err = capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert live.is_dir() and elsewhere.is_dir()
    assert (live / "model-00001-of-00001.safetensors").read_bytes() == b"half a shard"
    assert "stale" not in err
    assert leftovers(out) == sorted([live, elsewhere])


# --- signals -------------------------------------------------------------------------------------------------

SLOW_CONVERT = """
    import sys
    import time

    from upcycle.convert.writer import ShardedWriter

    original = ShardedWriter.put_range

    def put_range(self, *args, **kwargs):
        placed = original(self, *args, **kwargs)
        time.sleep(0.3)
        return placed

    ShardedWriter.put_range = put_range

    from upcycle_cli.main import run

    sys.exit(run(["convert", sys.argv[1], sys.argv[2]]))
"""


def test_sigterm_midway_is_exit_143_and_leaves_nothing(dense_store, tmp_path, out):
    """A polite kill cleans up like Ctrl-C (130, tested in process in test_bad_input.py) but exits 143."""
    script = tmp_path / "slow_convert.py"
    script.write_text(textwrap.dedent(SLOW_CONVERT))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(dense_store("llama")), str(out)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not leftovers(out):
            assert proc.poll() is None, f"convert ended (exit {proc.returncode}) before writing"
            assert time.monotonic() < deadline, "no temporary folder appeared beside OUT within 60 s"
            time.sleep(0.02)
        time.sleep(0.5)  # some tensors are in the temporary folder now
        assert proc.poll() is None, "convert finished before the signal; slow it down further"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, stderr
    assert stderr.splitlines() == ["terminated; nothing was written"]
    assert stdout == ""
    assert_clean(out)


# --- machine-readable output ---------------------------------------------------------------------------------


def _json_only(capsys, argv: list) -> tuple[dict, str]:
    """Run with `--json -`: stdout must be exactly one JSON document; returns it and stderr."""
    capsys.readouterr()
    code = run([str(a) for a in argv] + ["--json", "-"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return json.loads(cap.out), cap.err


def test_json_to_stdout_is_only_json(capsys, dense_store, converted, tmp_path):
    src = dense_store("llama")
    info, err = _json_only(capsys, ["inspect", converted])
    assert info["kind"] == "moe" and info["experts"] == 4 and f"inspect {converted}" in err

    plan, err = _json_only(capsys, ["convert", src, tmp_path / "dry", "--dry-run", "--every", "2"])
    assert plan["moe_layers"] == [1, 3] and len(plan["ops"]) > 0 and "Plan (dry run" in err
    assert not (tmp_path / "dry").exists()

    summary, err = _json_only(capsys, ["convert", src, tmp_path / "moe", "--experts", "4"])
    assert summary["experts"] == 4 and (tmp_path / "moe" / "config.json").is_file() and "Wrote" in err

    report, err = _json_only(capsys, ["verify", src, tmp_path / "moe", "--no-record"])
    assert report["passed"] and report["max_abs_diff"] <= 1e-5 and "PASS" in err

    listing, err = _json_only(capsys, ["push", tmp_path / "moe", "me/moe", "--dry-run"])
    assert listing["dry_run"] and {f["path"] for f in listing["files"]} >= {"config.json", "upcycle.json"}
    assert "Would upload" in err


def test_inspect_json_pipes_into_json_tool(converted):
    inspect = subprocess.Popen([str(UPCYCLE), "inspect", str(converted), "--json", "-"], stdout=subprocess.PIPE)
    tool = subprocess.run([sys.executable, "-m", "json.tool"], stdin=inspect.stdout, capture_output=True, text=True)
    inspect.stdout.close()
    assert inspect.wait(timeout=120) == 0 and tool.returncode == 0, tool.stderr
    assert json.loads(tool.stdout)["moe_layers"] == [0, 1, 2, 3]


# --- what people read ----------------------------------------------------------------------------------------


def test_no_printed_line_ends_in_spaces(capsys, dense_store, converted, tmp_path):
    src = str(dense_store("llama"))
    commands = [
        ["convert", src, str(tmp_path / "moe"), "--every", "2"],
        ["convert", src, str(tmp_path / "plan"), "--dry-run"],
        ["verify", src, str(tmp_path / "moe")],
        ["inspect", str(converted)],
        ["push", str(converted), "me/moe", "--dry-run"],
    ]
    for argv in commands:
        capsys.readouterr()
        assert run(argv) == 0, argv
        cap = capsys.readouterr()
        lines = (cap.out + cap.err).splitlines()
        assert len(lines) > 3, (argv, lines)
        padded = [line for line in lines if line != line.rstrip()]
        assert not padded, (argv, padded)


@pytest.mark.parametrize(
    "command, usage",
    [("convert", "SRC [OUT]"), ("verify", "DENSE MOE"), ("inspect", "[PATH]"), ("push", "DIR REPO_ID")],
)
def test_help_shows_plain_argument_names(capsys, command, usage):
    assert run([command, "--help"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"Usage: upcycle {command} [OPTIONS] {usage}"


def test_a_qwen2_moe_conversion_and_verify_print_no_torch_warning(capsys, dense_store, out):
    src = str(dense_store("llama"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert run(["convert", src, str(out), "--every", "2"]) == 0
        assert run(["verify", src, str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    zero = [str(w.message) for w in seen if "zero-element" in str(w.message)]
    assert not zero, zero
    assert "zero-element" not in capsys.readouterr().err
