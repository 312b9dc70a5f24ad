"""Plain-torch AdamW update: the op ``adamw_step`` on CPU tensors, and the ground truth its CUDA
and Triton kernels are tested against.

It is ``torch.optim.AdamW``'s single-tensor update (``foreach=False``), operation for
operation, on float32 state; a float16/bfloat16 param is widened to float32, updated, and
rounded back once:

    p = p * (1 - lr * weight_decay)                   decoupled weight decay
    m = m.lerp(g, 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    p = p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)

where ``bc1 = 1 - beta1**step`` and ``bc2 = 1 - beta2**step`` come from the caller (the
optimizer), so the op itself needs no step counter and no host sync.
"""

from __future__ import annotations

import torch

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_adamw_args(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                     bias_correction1, bias_correction2) -> None:
    """The argument checks of the CUDA host code, for the Python implementations: same numel,
    device, contiguity, dtypes; the scalars in range."""
    for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != param.device:
            raise ValueError(f"{name}: expected a tensor on {param.device} (the device of param), got one on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got sizes {list(t.shape)} with strides {list(t.stride())}")
        if t.numel() != param.numel():
            raise ValueError(f"{name}: expected {param.numel()} elements (as param), got {t.numel()}")
    for name, t in (("param", param), ("grad", grad)):
        if t.dtype not in _PARAM_DTYPES:
            raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name}: expected dtype float32, got {t.dtype}")
    if not (0.0 < bias_correction1 <= 1.0):
        raise ValueError(f"bias_correction1: expected a value in (0, 1], got {bias_correction1}")
    if not (0.0 < bias_correction2 <= 1.0):
        raise ValueError(f"bias_correction2: expected a value in (0, 1], got {bias_correction2}")


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               bias_correction1: float, bias_correction2: float) -> None:
    """One AdamW update of ``param``, ``exp_avg`` and ``exp_avg_sq`` in place."""
    check_adamw_args(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                     bias_correction1, bias_correction2)
    p = param if param.dtype == torch.float32 else param.to(torch.float32)
    g = grad.to(torch.float32)
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
    if p is not param:
        param.copy_(p)
