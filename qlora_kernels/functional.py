"""The user-facing quantize / dequantize API: argument checks, double quantization, and the
calls into the registered ops (which dispatch to CUDA, Triton or the torch reference)."""

from __future__ import annotations

import math

import torch

from . import codes, ops
from .quant_state import QuantState

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name: str, t, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        expected = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: expected dtype {expected}, got {str(t.dtype).removeprefix('torch.')}")


def _check_format(quant_type: str, blocksize: int) -> None:
    if quant_type not in codes.QUANT_TYPES:
        raise ValueError(f"quant_type: expected one of {codes.QUANT_TYPES}, got {quant_type!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in codes.BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of {codes.BLOCKSIZES}, got {blocksize!r}")


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def _raise_non_finite(W: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> None:
    """Names the first NaN / Inf element of W (only runs once a bad absmax was seen)."""
    block = int(torch.nonzero(~torch.isfinite(absmax))[0, 0])
    flat = W.reshape(-1)
    chunk = flat[block * blocksize : (block + 1) * blocksize]
    first = block * blocksize + int(torch.nonzero(~torch.isfinite(chunk))[0, 0])
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), W.shape)) if W.dim() else ()
    bad_count = int((~torch.isfinite(absmax)).sum())
    raise ValueError(
        f"W: contains {flat[first].item()} at index {where} (flat {first}; {bad_count} of "
        f"{absmax.numel()} blocks have NaN/Inf); 4-bit quantization needs finite values. "
        "Pass check_finite=False to skip this check."
    )


def quantize_4bit(
    W: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    check_finite: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """Quantizes ``W`` (float32, float16 or bfloat16, any shape) to 4 bits, blockwise.

    Returns ``(packed, state)``: ``packed`` is uint8 of shape ``((W.numel() + 1) // 2, 1)``
    with element 2j in the high nibble of byte j; ``state`` is a :class:`QuantState` holding
    the per-block absmax (double-quantized to 8 bits when ``double_quant``), bit for bit what
    ``bitsandbytes.functional.quantize_4bit(W, blocksize, compress_statistics=double_quant,
    quant_type=quant_type)`` produces.

    ``check_finite`` rejects NaN/Inf in W with a ValueError naming the first bad element; it
    costs one host sync (skipped inside ``torch.compile``, where it cannot raise).
    A non-contiguous W is copied first.
    """
    _check_tensor("W", W, FLOAT_DTYPES)
    _check_format(quant_type, blocksize)
    W_contiguous = W.contiguous()
    n = W.numel()
    device = W.device
    code = codes.code_tensor(quant_type, str(device))
    if n == 0:
        packed = torch.empty((0, 1), dtype=torch.uint8, device=device)
        absmax = torch.empty((0,), dtype=torch.float32, device=device)
    else:
        packed, absmax = ops.quantize_4bit(W_contiguous, blocksize, quant_type)
        if check_finite and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(absmax).all()):
                _raise_non_finite(W, absmax, blocksize)
    if not double_quant:
        state = QuantState(absmax, W.shape, code, blocksize, quant_type, W.dtype)
        return packed, state
    nested_code = codes.dynamic_map(str(device))
    if n == 0:
        offset = torch.zeros((), dtype=torch.float32, device=device)
        q, nested_absmax = absmax.to(torch.uint8), absmax.clone()
    else:
        offset = absmax.mean()
        q, nested_absmax = ops.quantize_8bit(absmax, offset, nested_code, codes.NESTED_BLOCKSIZE)
    state2 = QuantState(nested_absmax, None, nested_code, codes.NESTED_BLOCKSIZE, None, torch.float32)
    state = QuantState(q, W.shape, code, blocksize, quant_type, W.dtype, offset=offset, state2=state2)
    return packed, state


def check_packed(packed: torch.Tensor, state: QuantState) -> None:
    """Checks that ``packed`` and ``state`` describe one 4-bit tensor; raises ValueError."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a qlora_kernels.QuantState, got {type(state).__name__}")
    _check_tensor("packed", packed, (torch.uint8,))
    _check_format(state.quant_type, state.blocksize)
    if state.shape is None:
        raise ValueError("state.shape: is None; the state does not say what shape to restore")
    n = state.numel
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed: has {packed.numel()} bytes, but state.shape {tuple(state.shape)} "
            f"({n} elements) needs {(n + 1) // 2}"
        )
    nblocks = -(-n // state.blocksize)
    if state.absmax.numel() != nblocks:
        raise ValueError(
            f"state.absmax: has {state.absmax.numel()} entries, but {n} elements in blocks of "
            f"{state.blocksize} need {nblocks}"
        )
    if state.nested:
        _check_tensor("state.absmax", state.absmax, (torch.uint8,))
        _check_tensor("state.state2.absmax", state.state2.absmax, (torch.float32,))
        if state.state2.blocksize not in codes.BLOCKSIZES:
            raise ValueError(f"state.state2.blocksize: expected one of {codes.BLOCKSIZES}, got {state.state2.blocksize}")
        n2 = -(-nblocks // state.state2.blocksize)
        if state.state2.absmax.numel() != n2:
            raise ValueError(
                f"state.state2.absmax: has {state.state2.absmax.numel()} entries, but {nblocks} "
                f"codes in blocks of {state.state2.blocksize} need {n2}"
            )
        if state.state2.code is None or state.state2.code.numel() != 256:
            raise ValueError("state.state2.code: expected the 256-entry 8-bit map")
        if state.offset is None or state.offset.numel() != 1:
            raise ValueError("state.offset: expected a one-element float32 tensor with double quant")
        _check_same_device(
            packed=packed, absmax=state.absmax, nested_absmax=state.state2.absmax,
            nested_code=state.state2.code, offset=state.offset,
        )
    else:
        _check_tensor("state.absmax", state.absmax, (torch.float32,))
        _check_same_device(packed=packed, absmax=state.absmax)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor ``packed`` encodes: shape ``state.shape``, dtype ``dtype or state.dtype``.

    With double quant the 8-bit absmax is decoded inside the same kernel (no float32 absmax
    tensor is written)."""
    check_packed(packed, state)
    dtype = state.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    n = state.numel
    if n == 0:
        return torch.empty(state.shape, dtype=dtype, device=packed.device)
    if state.nested:
        out = ops.dequantize_4bit(
            packed.contiguous(), state.absmax.contiguous(), state.blocksize, state.quant_type, n, dtype,
            state.state2.absmax.contiguous(), state.state2.code.to(torch.float32).contiguous(),
            state.offset.reshape(()).to(torch.float32), state.state2.blocksize,
        )
    else:
        out = ops.dequantize_4bit(packed.contiguous(), state.absmax.contiguous(), state.blocksize,
                                  state.quant_type, n, dtype)
    return out.view(state.shape)


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 per-block absmax of ``state`` (decoding double quant when nested)."""
    if not state.nested:
        return state.absmax
    return ops.dequantize_8bit(state.absmax, state.state2.absmax, state.state2.code,
                               state.offset.reshape(()), state.state2.blocksize)


def bits_per_weight(state: QuantState) -> float:
    """Storage cost of the format in bits per weight (4.127 for NF4 + double quant, bs 64)."""
    n = state.numel
    total = 4 * 2 * ((n + 1) // 2) + 8 * state.absmax.element_size() * state.absmax.numel()
    if state.nested:
        total += 32 * state.state2.absmax.numel() + 32
    return total / n if n else math.nan
