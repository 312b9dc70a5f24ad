"""Triton kernels of the two dropout ops (LoRA's dropout on x, the mask regenerated from a
seed), bit for bit what ``reference.dropout_forward`` / ``dropout_backward_add`` compute.

The mask of element i is the 16-bit half ``i % 2`` (low first) of Philox4x32-10 output
``(i // 2) % 4`` of counter ``i // 8`` under the key ``seed`` (``tl.randint4x``: the counter
layout (lo, hi, 0, 0) and the rounds are cuRAND's), compared with ``floor(p * 2^16)`` as
integers: one Philox call yields the randoms of 8 consecutive elements, and the integer compare
needs no float conversion. Kernels with a
multiply feeding an add are launched with ``enable_fp_fusion=False`` (two roundings, as the
reference). Any input is flattened: the mask depends only on the flat index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .quant import _on_device

# Philox groups per program: 8 elements each, so 4096 elements (8 KiB of bf16) per program.
_GROUPS = 512
_WARPS = 4


@triton.jit
def _keep_mask(seed, pid, threshold, GROUPS: tl.constexpr, SEED_IN_MEMORY: tl.constexpr):
    """The keep flags of the program's 8 * GROUPS elements, in element order. ``seed`` is the
    seed, or (SEED_IN_MEMORY) a pointer to it: loaded when the kernel runs, so a CUDA graph
    replays with the value the tensor holds then."""
    if SEED_IN_MEMORY:
        key = tl.load(seed)
    else:
        key = seed
    g = pid * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(key, g)
    # [GROUPS, 2, 2] with [g, a, b] = r_{2a + b}, then its 16-bit halves: [GROUPS, 2, 2, 2] with
    # [g, a, b, h] = half h of r_{2a + b}. Flattened, element 8g + 2j + h gets half h of output j.
    r = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    r = tl.join(r & 0xFFFF, r >> 16)
    r = tl.reshape(r, (8 * GROUPS,), can_reorder=False)
    # uint32 -> int64 zero-extends, so the compare is the unsigned one of the CUDA kernel.
    return r.to(tl.int64) >= threshold


@triton.jit
def _dropout_forward_kernel(x_ptr, out_ptr, n, seed, threshold, scale, GROUPS: tl.constexpr,
                            SEED_IN_MEMORY: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * (8 * GROUPS) + tl.arange(0, 8 * GROUPS)
    in_range = offs < n
    keep = _keep_mask(seed, pid, threshold, GROUPS, SEED_IN_MEMORY)
    x = tl.load(x_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    y = tl.where(keep, x * scale, 0.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _dropout_backward_add_kernel(out_ptr, grad_ptr, n, seed, threshold, scale, GROUPS: tl.constexpr,
                                 SEED_IN_MEMORY: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * (8 * GROUPS) + tl.arange(0, 8 * GROUPS)
    in_range = offs < n
    keep = _keep_mask(seed, pid, threshold, GROUPS, SEED_IN_MEMORY)
    g = tl.load(grad_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    o = tl.load(out_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    y = o + tl.where(keep, g * scale, 0.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=in_range)


def _launch(kernel, first: torch.Tensor, second: torch.Tensor, n: int, seed: int, p: float,
            device_seed: torch.Tensor | None) -> None:
    with _on_device(first):
        kernel[(triton.cdiv(n, 8 * _GROUPS),)](
            first, second, n, seed if device_seed is None else device_seed, reference.dropout_threshold(p),
            reference.dropout_scale(p), GROUPS=_GROUPS, SEED_IN_MEMORY=device_seed is not None,
            num_warps=_WARPS, enable_fp_fusion=False,
        )


def dropout_forward(x: torch.Tensor, seed: int, p: float, device_seed: torch.Tensor | None = None) -> torch.Tensor:
    """``x * keep / (1 - p)`` (see ``reference.dropout_forward``)."""
    reference.check_device_seed(device_seed, x, "x")
    xc = x.contiguous()
    out = torch.empty_like(xc)
    if xc.numel():
        _launch(_dropout_forward_kernel, xc, out, xc.numel(), seed, p, device_seed)
    return out


def dropout_backward_add(out: torch.Tensor, grad: torch.Tensor, seed: int, p: float,
                         device_seed: torch.Tensor | None = None) -> None:
    """``out += grad * keep / (1 - p)`` in place (see ``reference.dropout_backward_add``)."""
    reference.check_device_seed(device_seed, out, "out")
    if not out.numel():
        return
    target = out if out.is_contiguous() else out.contiguous()
    _launch(_dropout_backward_add_kernel, target, grad.contiguous(), out.numel(), seed, p, device_seed)
    if target is not out:
        out.copy_(target)


# The LoRA branch's dropout matmuls: the composed ops of the reference (the installed dropout op,
# the Triton kernel when Triton is the backend, then cuBLAS); only the CUDA extension fuses them.
dropout_linear = reference.dropout_linear
matmul_dropout = reference.matmul_dropout
dropout_grad_weight = reference.dropout_grad_weight
