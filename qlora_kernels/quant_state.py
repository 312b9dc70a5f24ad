"""QuantState: everything needed to dequantize a 4-bit tensor, with bitsandbytes' field names
and exactly its state-dict layout, so a 4-bit layer saved by either library loads in the other.

State-dict entries of a 4-bit weight ``p.weight`` (``as_dict(packed=True)``, keys relative to
``p.weight.``): ``absmax`` (float32, or uint8 codes with double quant), ``quant_map``, with
double quant ``nested_absmax`` and ``nested_quant_map``, and
``quant_state.bitsandbytes__nf4`` (or ``__fp4``): UTF-8 JSON in a uint8 tensor holding
quant_type, blocksize, dtype, shape and, when nested, nested_blocksize, nested_dtype,
nested_offset.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from . import codes

_PACKED_KEY_PREFIX = "quant_state.bitsandbytes__"
_VALID_KEYS = {
    "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_type", "blocksize",
    "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"quant state {key}: {name!r} is not a torch dtype")
    return dtype


class QuantState:
    """Quantization state of one 4-bit tensor.

    ``absmax`` is float32 per block, or with double quant (``nested``) the uint8 codes of
    ``absmax - offset``; then ``state2`` holds their float32 ``absmax`` per 256 codes and the
    8-bit ``code`` map, and ``offset`` is the float32 mean that was subtracted.
    """

    def __init__(
        self,
        absmax: torch.Tensor,
        shape=None,
        code: torch.Tensor | None = None,
        blocksize: int = 64,
        quant_type: str | None = "nf4",
        dtype: torch.dtype = torch.float32,
        offset: torch.Tensor | None = None,
        state2: "QuantState | None" = None,
    ):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.blocksize = int(blocksize)
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device) -> "QuantState":
        """Moves the state's tensors to ``device`` in place, like bitsandbytes; returns self."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes writes it. ``packed=True`` gives tensors only (what goes
        into a state dict / safetensors file): the non-tensor items travel as JSON in the
        ``quant_state.bitsandbytes__<quant_type>`` uint8 tensor."""
        # Insertion order and json.dumps defaults match bitsandbytes, so the JSON bytes match.
        qs = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            qs.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    # a copy, so safetensors never sees two names for one storage
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": float(self.offset.item()),
                }
            )
        if not packed:
            return qs
        tensors = {k: v for k, v in qs.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in qs.items() if not isinstance(v, torch.Tensor)}
        blob = json.dumps(others).encode("utf-8")
        tensors[_PACKED_KEY_PREFIX + self.quant_type] = torch.tensor(list(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device="cpu") -> "QuantState":
        """Builds a state from ``as_dict()`` output, packed or not, keys possibly prefixed
        (``"model.layers.0.q_proj.weight.absmax"``); the inverse of ``as_dict``."""
        qs_dict = dict(qs_dict)
        blob_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if not blob_keys and "quant_type" not in qs_dict:
            raise ValueError(
                "qs_dict: expected a packed quant state (a 'quant_state.bitsandbytes__nf4' or "
                f"'__fp4' entry) or unpacked items with 'quant_type'; got keys {sorted(qs_dict)}"
            )
        if blob_keys:
            if len(blob_keys) != 1 or blob_keys[0].rsplit(".", 1)[-1] not in (
                "bitsandbytes__nf4", "bitsandbytes__fp4"
            ):
                raise ValueError(f"qs_dict: expected one bitsandbytes__nf4/fp4 entry, got {blob_keys}")
            blob = qs_dict.pop(blob_keys[0])
            try:
                qs_dict.update(json.loads(bytes(blob.cpu().tolist()).decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"qs_dict[{blob_keys[0]!r}]: not UTF-8 JSON ({err})") from err
        qs = {k.rsplit(".", 1)[-1]: v for k, v in qs_dict.items()}
        unknown = set(qs) - _VALID_KEYS
        if unknown:
            raise ValueError(f"qs_dict: unknown quant state keys {sorted(unknown)}")
        missing = {"absmax", "quant_type", "blocksize", "dtype", "shape"} - set(qs)
        if missing:
            raise ValueError(f"qs_dict: missing quant state keys {sorted(missing)}")

        if "nested_absmax" in qs:
            offset = torch.tensor(float(qs["nested_offset"]), dtype=torch.float32, device=device)
            nested_code = qs.get("nested_quant_map")
            state2 = cls(
                absmax=qs["nested_absmax"].to(device),
                blocksize=qs["nested_blocksize"],
                code=(nested_code if nested_code is not None else codes.dynamic_map()).to(device),
                dtype=_dtype_from_name(qs.get("nested_dtype", "float32"), "nested_dtype"),
                quant_type=None,
            )
        else:
            offset, state2 = None, None
        code = qs.get("quant_map")
        return cls(
            absmax=qs["absmax"].to(device),
            shape=qs["shape"],
            code=(code if code is not None else codes.code_tensor(qs["quant_type"])).to(device),
            blocksize=qs["blocksize"],
            quant_type=qs["quant_type"],
            dtype=_dtype_from_name(qs["dtype"], "dtype"),
            offset=offset,
            state2=state2,
        )

    def __repr__(self) -> str:
        nested = f", nested(blocksize={self.state2.blocksize})" if self.nested else ""
        return (
            f"QuantState({self.quant_type}, shape={tuple(self.shape or ())}, dtype={self.dtype}, "
            f"blocksize={self.blocksize}{nested}, device={self.device})"
        )
