"""`upcycle inspect`: what a dense or MoE checkpoint holds, read from its config and headers only.

For a Hub id it asks the Hub for the safetensors headers (huggingface_hub's get_safetensors_metadata), so
inspecting a 140 GB model downloads a few kilobytes; in offline mode it reads the local cache.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..arch import families, target_for_model_type
from ..errors import UpcycleError
from ..source import EMBEDDED, Checkpoint, TensorInfo, looks_like_repo_id, resolve

EXPERT_KEY = re.compile(r"\.layers\.(\d+)\..*\.experts\.(\d+)\.")
FUSED_EXPERT_KEY = re.compile(r"\.layers\.(\d+)\..*\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)$")
LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


def _remote(repo_id: str, revision: str | None) -> tuple[dict[str, Any], dict[str, TensorInfo], int] | None:
    """Config and tensor index of a Hub repo from its safetensors headers alone (no weights downloaded).

    None when the Hub cannot be asked (offline mode): the local cache is used instead."""
    from huggingface_hub import constants, get_safetensors_metadata, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except RepositoryNotFoundError:
        raise UpcycleError(f"{repo_id} was not found on the Hub (private? log in with `hf auth login`)") from None
    except NotASafetensorsRepoError:
        raise UpcycleError(f"{repo_id} has no safetensors weights on the Hub") from None
    except (HfHubHTTPError, OSError) as exc:
        raise UpcycleError(f"could not read {repo_id} from the Hub: {str(exc).splitlines()[0]}") from None
    tensors = {}
    for filename, file_meta in meta.files_metadata.items():
        for name, t in file_meta.tensors.items():
            start, end = t.data_offsets
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), Path(filename), start, end - start)
    return config, tensors, len(meta.files_metadata)


def inspect(path: str, revision: str | None = None) -> dict[str, Any]:
    remote = None
    if not Path(path).expanduser().exists() and path not in EMBEDDED and looks_like_repo_id(path):
        remote = _remote(path, revision)
    if remote is None:
        ckpt = Checkpoint.open(resolve(path, revision).folder)
        remote = (ckpt.config, ckpt.tensors, len(ckpt.files))
    cfg, tensors, n_files = remote
    model_type = cfg.get("model_type")
    target = target_for_model_type(model_type)
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
        elif (m := FUSED_EXPERT_KEY.search(name)) and info.shape:
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
