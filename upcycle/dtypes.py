"""The dtype vocabulary of the bottom floor: safetensors dtype names, their sizes and their torch names.

Safetensors names ("BF16") are what plans, headers and the writer speak; torch names ("bfloat16") are what
`--dtype` and configs say. torch is imported lazily (`torch_dtype`), so planning stays import-light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
TORCH_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}
FLOAT_DTYPES = set(ST_TO_TORCH)
# Casts that keep every value: each value of the source dtype is also a value of the wider one.
LOSSLESS = {("BF16", "F32"), ("F16", "F32")}
DTYPE_MAX = {"F16": 65504.0, "BF16": 3.3895313892515355e38, "F32": 3.4028234663852886e38}  # largest finite


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype of a floating safetensors dtype name ("BF16" -> torch.bfloat16)."""
    import torch

    return getattr(torch, ST_TO_TORCH[st_dtype])


def lossy(src: str, dst: str) -> bool:
    """Does casting `src` values to `dst` possibly change some (a downcast, or between 16-bit formats)?"""
    return src != dst and (src, dst) not in LOSSLESS
