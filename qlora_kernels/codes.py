"""The code tables of the bitsandbytes 4-bit format, and the decision thresholds derived from them.

The values live once, in ``codes.json`` (a copy of the project's format card); everything else
here is derived, in float32, exactly as every kernel derives it: the threshold between two
neighbouring codes is ``(lo + hi) * 0.5`` computed in float32 (exact: halving loses nothing).
"""

from __future__ import annotations

import functools
import json
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(_HERE, "codes.json")) as _f:
    _TABLES = json.load(_f)

#: The 16 NF4 values, index = 4-bit code (sorted ascending).
NF4 = tuple(float(v) for v in _TABLES["nf4"])
#: The 16 FP4 values, index = 4-bit code (bit 3 is the sign; not sorted).
FP4 = tuple(float(v) for v in _TABLES["fp4"])
#: bitsandbytes' signed dynamic 8-bit map (256 values, sorted ascending), used for double quant.
DYNAMIC_SIGNED_256 = tuple(float(v) for v in _TABLES["dynamic_signed_256"])

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: bitsandbytes always double-quantizes absmax in blocks of 256.
NESTED_BLOCKSIZE = 256



def sorted_order(quant_type: str) -> tuple[int, ...]:
    """The 4-bit codes of ``quant_type`` in ascending order of value, +0 before -0 (a stable
    sort). Quantizing picks a position in this order, then stores the code at that position:
    identity for NF4; for FP4 (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)."""
    values = table(quant_type)
    return tuple(sorted(range(16), key=lambda i: values[i]))


def table(quant_type: str) -> tuple[float, ...]:
    if quant_type == "nf4":
        return NF4
    if quant_type == "fp4":
        return FP4
    raise ValueError(f"quant_type: expected one of {QUANT_TYPES}, got {quant_type!r}")


@functools.lru_cache(maxsize=None)
def code_tensor(quant_type: str, device: str = "cpu") -> torch.Tensor:
    """The 16-entry float32 table of ``quant_type`` (bitsandbytes' ``quant_map``)."""
    return torch.tensor(table(quant_type), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def dynamic_map(device: str = "cpu") -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True)`` as a float32 tensor."""
    return torch.tensor(DYNAMIC_SIGNED_256, dtype=torch.float32, device=device)


def midpoints(sorted_values: torch.Tensor) -> torch.Tensor:
    """Float32 decision thresholds between neighbouring entries of an ascending table."""
    v = sorted_values.to(torch.float32)
    return (v[:-1] + v[1:]) * 0.5


@functools.lru_cache(maxsize=None)
def thresholds(quant_type: str, device: str = "cpu") -> torch.Tensor:
    """The 15 float32 decision thresholds of ``quant_type``: a scaled value x lands at position
    ``count(x > t)`` of :func:`sorted_order` (so a value exactly on a midpoint takes the lower
    entry: bitsandbytes' rule). For FP4 the threshold between +0 and -0 is 0: tiny positive
    values store -0 and tiny negative ones +0, as bitsandbytes writes them."""
    order = list(sorted_order(quant_type))
    return midpoints(code_tensor(quant_type, device)[order])


@functools.lru_cache(maxsize=None)
def order_tensor(quant_type: str, device: str = "cpu") -> torch.Tensor:
    return torch.tensor(sorted_order(quant_type), dtype=torch.int64, device=device)
