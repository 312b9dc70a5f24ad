"""Triton kernel of ``adamw_step``: the AdamW update of ``reference_optim.adamw_step`` in one
pass over param, grad and the two float32 moments (28 bytes an element for float32 params).

Same signature as the reference (``ops.py`` registers it for CUDA when the extension is
absent); runs in the Triton interpreter on CPU tensors for the tests. Divisions and the
square root are the IEEE-rounded ones (``div_rn``, ``sqrt_rn``): plain ``/`` and ``sqrt`` are
approximate on the GPU, and the result should stay within an ulp or two of the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference_optim import check_adamw_args
from .quant import _load_float32, _on_device

_BLOCK = 1024


@triton.jit
def _to_param_dtype(x, dtype: tl.constexpr):
    """float32 -> the param's dtype, rounding to nearest even. bfloat16 is rounded on the bits
    (the Triton interpreter's conversion truncates); a NaN stays a quiet NaN."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                  eps, neg_step_size, bc2_sqrt, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = _load_float32(p_ptr + offs, mask)
    g = _load_float32(g_ptr + offs, mask)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), bc2_sqrt) + eps
    p = p + neg_step_size * tl.math.div_rn(m, denom)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, _to_param_dtype(p, p_ptr.dtype.element_ty), mask=mask)


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               bias_correction1: float, bias_correction2: float) -> None:
    check_adamw_args(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                     bias_correction1, bias_correction2)
    n = param.numel()
    if n == 0:
        return
    with _on_device(param):
        _adamw_kernel[(triton.cdiv(n, _BLOCK),)](
            param, grad, exp_avg, exp_avg_sq, n,
            1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
            -(lr / bias_correction1), bias_correction2**0.5, BLOCK=_BLOCK, num_warps=4,
        )
