"""`upcycle inspect`: what a dense or MoE checkpoint holds, read from its config and headers only.

For a Hub id it asks the Hub for the safetensors headers (huggingface_hub's get_safetensors_metadata), so
inspecting a 140 GB model downloads a few kilobytes; in offline mode it reads the local cache. A GGUF file
is read with the `gguf` package's reader: its metadata and tensor table, never its (quantised) weights.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..arch import Target, families, target_for_config
from ..errors import UpcycleError
from ..source import (
    EMBEDDED,
    Checkpoint,
    TensorInfo,
    embedded_gguf,
    looks_like_repo_id,
    network_errors,
    quiet_hub,
    resolve,
)

EXPERT_KEY = re.compile(r"\.(?:layers|h)\.(\d+)\..*\.experts\.(\d+)\.")  # h: GPT-2 (--target generic)
FUSED_EXPERT_KEY = re.compile(r"\.layers\.(\d+)\..*\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)$")
LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


def _fused_key(target: Target | None, name: str) -> re.Match | None:
    """A key of the target class's own fused expert layout on disk (GraniteMoe's input_linear/output_linear)."""
    for template in target.fused if target else ():
        pattern = re.escape(template).replace(re.escape("{layer}"), r"(\d+)")
        if m := re.fullmatch(pattern, name):
            return m
    return None


def _remote(repo_id: str, revision: str | None) -> tuple[dict[str, Any], dict[str, TensorInfo], int] | None:
    """Config and tensor index of a Hub repo from its safetensors headers alone (no weights downloaded).

    None when the Hub cannot be asked (offline mode, or no network): the local cache is used instead."""
    from huggingface_hub import constants, get_safetensors_metadata, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        with quiet_hub():
            # The headers first: one request without retries, so an unreachable Hub fails at once
            # (hf_hub_download retries a failed request for about 20 s before it gives up).
            meta = get_safetensors_metadata(repo_id, revision=revision)
            config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
    except RepositoryNotFoundError:
        raise UpcycleError(f"{repo_id} was not found on the Hub (private? log in with `hf auth login`)") from None
    except NotASafetensorsRepoError:
        raise UpcycleError(f"{repo_id} has no safetensors weights on the Hub") from None
    except HfHubHTTPError as exc:
        raise UpcycleError(f"could not read {repo_id} from the Hub: {str(exc).splitlines()[0]}") from None
    except network_errors():
        return None
    tensors = {}
    for filename, file_meta in meta.files_metadata.items():
        for name, t in file_meta.tensors.items():
            start, end = t.data_offsets
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), Path(filename), start, end - start)
    return config, tensors, len(meta.files_metadata)


def _gguf_file(path: str) -> Path | None:
    if path in EMBEDDED and not Path(path).exists():
        return embedded_gguf(path)
    file = Path(path).expanduser()
    return file if file.is_file() and file.suffix == ".gguf" else None


def inspect(path: str, revision: str | None = None) -> dict[str, Any]:
    gguf = _gguf_file(path)
    if gguf is not None:
        return inspect_gguf(path, gguf)
    remote = None
    is_hub = not Path(path).expanduser().exists() and path not in EMBEDDED and looks_like_repo_id(path)
    if is_hub:
        remote = _remote(path, revision)
    if remote is None:
        # offline, or the Hub did not answer: the local cache only, without asking the Hub again
        ckpt = Checkpoint.open(resolve(path, revision, local_only=is_hub).folder)
        remote = (ckpt.config, ckpt.tensors, len(ckpt.files))
    cfg, tensors, n_files = remote
    model_type = cfg.get("model_type")
    target = target_for_config(cfg)
    dense_family = next((f.name for f in families().values() if model_type in f.model_types), None)

    per_expert: dict[int, int] = defaultdict(int)  # layer -> parameters of one expert
    experts_seen: dict[int, set[int]] = defaultdict(set)
    total, by_dtype = 0, defaultdict(int)
    for name, info in tensors.items():
        n = math.prod(info.shape)
        total += n
        by_dtype[info.dtype] += info.nbytes
        if m := EXPERT_KEY.search(name):
            layer, e = int(m.group(1)), int(m.group(2))
            experts_seen[layer].add(e)
            if e == 0:
                per_expert[layer] += n
        elif ((m := FUSED_EXPERT_KEY.search(name)) or (m := _fused_key(target, name))) and info.shape:
            layer = int(m.group(1))
            experts_seen[layer].update(range(info.shape[0]))
            per_expert[layer] += n // info.shape[0]
    num_layers = int(cfg.get("num_hidden_layers") or 0)
    moe_layers = sorted(experts_seen)
    experts = max((len(v) for v in experts_seen.values()), default=0)
    top_k = cfg.get("num_experts_per_tok") if moe_layers else None
    active = total - sum((len(experts_seen[layer]) - (top_k or 0)) * per_expert[layer] for layer in moe_layers)
    return {
        "path": path,
        "model_type": model_type,
        "architecture": (cfg.get("architectures") or [None])[0],
        "kind": "moe" if moe_layers else "dense",
        "family": target.name if target and moe_layers else dense_family,
        "upcycle_supports": dense_family is not None,
        "layers": num_layers,
        "moe_layers": moe_layers,
        "experts": experts,
        "top_k": top_k,
        "total_params": total,
        "active_params": active,
        "bytes_by_dtype": dict(sorted(by_dtype.items())),
        "bytes": sum(by_dtype.values()),
        "files": n_files,
    }


def inspect_gguf(path: str, file: Path) -> dict[str, Any]:
    """The same summary for a GGUF file, from its metadata and tensor table (nothing dequantised or written).

    Shapes are given in PyTorch order (GGUF lists the fastest-moving dimension first). Expert tensors of an
    MoE GGUF (`*_exps`) hold all experts of a layer, experts first.
    """
    from gguf import GGUFReader, LlamaFileType
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        reader = GGUFReader(file)
    except Exception as exc:  # the reader raises ValueError, KeyError, struct errors... on a damaged file
        raise UpcycleError(f"{file.name} is not a readable GGUF file: {exc}".splitlines()[0]) from None

    def field(key: str) -> Any:
        found = reader.fields.get(key)
        return found.contents() if found is not None else None

    arch = field("general.architecture")
    experts, top_k = field(f"{arch}.expert_count") or 0, field(f"{arch}.expert_used_count")
    total, idle, by_type, tensors = 0, 0, defaultdict(int), []
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        n = int(t.n_elements)
        total += n
        by_type[t.tensor_type.name] += int(t.n_bytes)
        tensors.append({"name": t.name, "shape": shape, "type": t.tensor_type.name})
        if experts and "_exps" in t.name:
            idle += n // experts * (experts - (top_k or experts))
    num_layers = int(field(f"{arch}.block_count") or 0)
    file_type = field("general.file_type")
    model_type = arch
    return {
        "path": path,
        "format": "gguf",
        "model_type": model_type,
        "architecture": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, arch),
        "kind": "moe" if experts else "dense",
        "family": next((f.name for f in families().values() if model_type in f.model_types), None),
        "upcycle_supports": any(model_type in f.model_types for f in families().values()),
        "layers": num_layers,
        "hidden_size": field(f"{arch}.embedding_length"),
        "moe_layers": list(range(num_layers)) if experts else [],
        "experts": experts,
        "top_k": top_k,
        "total_params": total,
        "active_params": total - idle,
        "bytes_by_dtype": dict(sorted(by_type.items())),
        "bytes": sum(by_type.values()),
        "file_bytes": file.stat().st_size,
        "file_type": LlamaFileType(file_type).name if file_type is not None else None,
        "quantization": sorted(by_type),
        "files": 1,
        "tensors": tensors,
    }
