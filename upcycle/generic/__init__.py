"""upcycle's generic MoE wrapper, for dense families that no native transformers MoE class holds exactly.

The two modules beside this file are the wrapper's configuration and modeling code. They import only torch and
transformers, because `write_code` copies them into every `--target generic` checkpoint: with `auto_map` in its
config.json, `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it where upcycle is not
installed. upcycle itself registers the same classes in-process (`register`), so its own commands load such a
folder without trust_remote_code: the code is upcycle's own, not code downloaded with the model.

Nothing here imports transformers at import time: `register` does, when a generic model is first met.
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

MODEL_TYPE = "upcycle_moe"
ARCHITECTURE = "UpcycleMoeForCausalLM"
ROUTER_BIAS = "e_score_correction_bias"  # the router's selection bias (config.router_bias), as in modeling_upcycle_moe
CODE_FILES = ("configuration_upcycle_moe.py", "modeling_upcycle_moe.py")  # as in modeling_upcycle_moe.py
AUTO_MAP = {
    "AutoConfig": "configuration_upcycle_moe.UpcycleMoeConfig",
    "AutoModelForCausalLM": "modeling_upcycle_moe.UpcycleMoeForCausalLM",
}
WHY_REMOTE_CODE = (
    "transformers does not ship that class: the folder carries its code (configuration_upcycle_moe.py, "
    "modeling_upcycle_moe.py), and other programs load it with "
    "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True); upcycle's own commands need no flag"
)


@cache
def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know model type upcycle_moe in this process (once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_upcycle_moe import UpcycleMoeConfig
    from .modeling_upcycle_moe import UpcycleMoeForCausalLM

    AutoConfig.register(MODEL_TYPE, UpcycleMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(UpcycleMoeConfig, UpcycleMoeForCausalLM, exist_ok=True)


def write_code(folder: Path) -> None:
    """Copy the wrapper's configuration and modeling files into a checkpoint folder."""
    here = Path(__file__).parent
    for name in CODE_FILES:
        shutil.copyfile(here / name, Path(folder) / name)


__all__ = [
    "ARCHITECTURE",
    "AUTO_MAP",
    "CODE_FILES",
    "MODEL_TYPE",
    "ROUTER_BIAS",
    "WHY_REMOTE_CODE",
    "register",
    "write_code",
]
