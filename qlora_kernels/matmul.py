"""``matmul_4bit``: ``x @ W.T (+ bias)`` with W stored in 4 bits, for inference.

Two paths, chosen by the number of rows M of x (all leading dims flattened):

* M <= ``fused_max_m()`` (decode: a few tokens; 64): the fused kernel (op ``matmul_4bit``),
  which reads each 4-bit weight byte once and decodes the codes and the (8-bit) absmax in
  registers (the Triton backend: M = 1 only on GPUs below compute capability 8.0 or with a
  triton older than 3.2). There the layer is bound by the bytes
  of W, and 4-bit W is a quarter of bf16's. On compute capability 9.0+ the CUDA kernels stream
  W into shared memory by the TMA first: at M <= 8 as contiguous 512-byte row pieces (the bulk
  kernel, ``QLORA_KERNELS_MM_BULK=0`` turns it off; the same sums in the same order as the
  register kernel run without K splits), at 9-64 (and 1-8 on the largest layers) as 2-D boxes
  of rows with x beside them, one copy of x for all the CTA's rows (the rows kernel,
  ``QLORA_KERNELS_MM_ROWS=0`` turns it off; its sums go over K in one order per warp, so its
  bits differ from the register kernel's, within the same error bound).
* larger M (prefill, training): there the layer is bound by arithmetic. With the CUDA extension
  the op ``gemm_4bit``: on compute capability 9.0 a wgmma GEMM that reads W in 4 bits and
  decodes it in registers (``csrc/gemm_4bit.cu``; K a multiple of 64, blocksize 64 or more,
  16-bit x; ``QLORA_KERNELS_GEMM=0`` turns it off), elsewhere the fast ``dequantize_4bit`` into
  a bf16/fp16 buffer, then cuBLAS. The Triton and torch backends always dequantize + cuBLAS.

The fused path needs a 16-bit x (bf16 or fp16) and K (W's row length) a multiple of 32, so
that every 16-byte load of packed W lies within one row and one absmax block. Other K, and
float32 x, take the dequantize path: every shape works, only the speed differs.
"""

from __future__ import annotations

import functools
import os

import torch

from . import ops
from .functional import FLOAT_DTYPES, _check_tensor, check_packed, dequantize_4bit
from .quant_state import QuantState

#: The fused kernel reads K in pieces of 32 elements (16 bytes of packed W).
FUSED_K_MULTIPLE = 32

_ENV_MAX_M = "QLORA_KERNELS_FUSED_MAX_M"
# Crossover measured on an H100 (benchmarks/bench_matmul_4bit.py): above this many rows the
# dequantize + cuBLAS path is faster than the fused kernel. The same holds for the Triton
# kernels (used when the CUDA extension is not built): up to 64 rows they beat Triton's
# dequantize + cuBLAS on every measured shape, by 1.06-2.8x (experiments/
# matmul_4bit_triton_dot_configs.json under benchmarks/results/NVIDIA-H100-80GB-HBM3/).
_DEFAULT_FUSED_MAX_M = 64


def fused_max_m() -> int:
    """The largest M that takes the fused kernel: 64, or ``QLORA_KERNELS_FUSED_MAX_M``."""
    value = os.environ.get(_ENV_MAX_M, "")
    if not value:
        return _DEFAULT_FUSED_MAX_M
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{_ENV_MAX_M}: expected an integer, got {value!r}") from None


@functools.lru_cache(maxsize=None)
def _has_16bit_mma(device_index: int) -> bool:
    # bf16/fp16 tensor-core MMAs (the CUDA kernels' m16n8k16, Triton's bf16 tl.dot) need
    # compute capability 8.0+.
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


@functools.lru_cache(maxsize=None)
def _triton_dot_kernel() -> bool:
    # Triton's M > 1 kernel needs tl.gather (triton 3.2+); older ones fuse one row only.
    from .triton.matmul import HAS_DOT_KERNEL

    return HAS_DOT_KERNEL


def uses_fused_kernel(x: torch.Tensor, state: QuantState) -> bool:
    """Whether ``matmul_4bit(x, packed, state)`` takes the fused kernel."""
    K = state.shape[-1]
    M = x.numel() // K if K else 0
    if x.is_cuda and ops.BACKEND != "torch":
        # The CUDA kernels and Triton's M > 1 kernel run on 16-bit MMAs (the latter also needs
        # tl.gather); Triton's M = 1 kernel runs on CUDA cores.
        on_mma = ops.BACKEND == "cuda" or M > 1
        if on_mma and not _has_16bit_mma(x.device.index if x.device.index is not None
                                          else torch.cuda.current_device()):
            return False
        if ops.BACKEND == "triton" and M > 1 and not _triton_dot_kernel():
            return False
    return (
        x.dtype in (torch.float16, torch.bfloat16)
        and K % FUSED_K_MULTIPLE == 0
        and 0 < M <= fused_max_m()
    )


def _nested_args(state: QuantState) -> tuple:
    if not state.nested:
        return (None, None, None, 256)
    return (state.state2.absmax.contiguous(), state.state2.code.to(torch.float32).contiguous(),
            state.offset.reshape(()).to(torch.float32), state.state2.blocksize)


def _needs_copy(x: torch.Tensor) -> bool:
    """Whether x must be copied for the fused kernel: its 16-byte loads need a contiguous x
    starting on 16 bytes (a view may not). Under torch.compile neither data_ptr() nor
    storage_offset() can be traced (fullgraph fails), so x is always copied there: a fresh
    buffer is aligned, and inductor fuses the copy into the op that produced x."""
    if torch.compiler.is_compiling():
        return True
    return not x.is_contiguous() or x.data_ptr() % 16 != 0


def check_x_and_weight(x: torch.Tensor, packed: torch.Tensor, state: QuantState, dtypes) -> tuple[int, int]:
    """Checks x ``[..., K]`` against the 4-bit weight ``[N, K]`` (dtype in ``dtypes``, same
    device); returns ``(N, K)``. Shared by every op that multiplies x by a 4-bit weight."""
    check_packed(packed, state)
    _check_tensor("x", x, dtypes)
    if len(state.shape) != 2:
        raise ValueError(f"state.shape: expected a 2-D weight [N, K], got {tuple(state.shape)}")
    N, K = state.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x: expected shape [..., {K}] (W is [{N}, {K}]), got {tuple(x.shape)}")
    if x.device != packed.device:
        raise ValueError(f"x: expected a tensor on {packed.device} (the device of the weight), got {x.device}")
    return N, K


def _checked_bias(bias: torch.Tensor | None, N: int, x: torch.Tensor) -> torch.Tensor | None:
    """``bias`` checked against an output of N features on x's device, in x's dtype."""
    if bias is None:
        return None
    _check_tensor("bias", bias, FLOAT_DTYPES)
    if bias.shape != (N,):
        raise ValueError(f"bias: expected shape [{N}], got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias: expected a tensor on {x.device}, got {bias.device}")
    return bias.to(x.dtype)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` where ``(packed, state)`` hold W ``[N, K]`` in 4 bits.

    ``x``: ``[..., K]`` in bfloat16, float16 or float32; ``bias``: ``[N]`` or None. Returns
    ``[..., N]`` in x's dtype, accumulated in float32. Any quant type, blocksize and double
    quant; any K (see the module doc for which shapes take the fused kernel).
    """
    N, K = check_x_and_weight(x, packed, state, FLOAT_DTYPES)
    bias = _checked_bias(bias, N, x)
    lead = x.shape[:-1]
    if x.numel() == 0 or N == 0:
        return torch.nn.functional.linear(x, x.new_zeros((N, K)), bias)
    if not uses_fused_kernel(x, state):
        if ops.BACKEND == "cuda" and x.is_cuda:
            out = ops.gemm_4bit(x.reshape(-1, K).contiguous(), packed.contiguous(), state.absmax.contiguous(),
                                state.blocksize, state.quant_type, N, *_nested_args(state), bias)
            return out.view(*lead, N)
        return torch.nn.functional.linear(x, dequantize_4bit(packed, state, dtype=x.dtype), bias)
    x2 = x.reshape(-1, K)
    if _needs_copy(x2):
        x2 = x2.clone(memory_format=torch.contiguous_format)
    out = ops.matmul_4bit(x2, packed.contiguous(), state.absmax.contiguous(), state.blocksize,
                          state.quant_type, N, *_nested_args(state), bias)
    return out.view(*lead, N)



# Gradients through the frozen 4-bit weight: dX = dY @ W (W dequantized for the backward only,
# never saved), and the bias gradient when the bias trains. W itself gets none.
def _setup_context(ctx, inputs, output):
    x, packed, absmax, blocksize, quant_type, N, nested_absmax, nested_code, offset, nested_blocksize, bias = inputs
    ctx.format = (blocksize, quant_type, N, x.shape[-1], x.dtype, nested_blocksize)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)


def _backward(ctx, grad):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    blocksize, quant_type, N, K, dtype, nested_blocksize = ctx.format
    dx = None
    if ctx.needs_input_grad[0]:
        if grad.is_cuda and ops.BACKEND == "cuda":
            dx = ops.gemm_4bit_dx(grad.to(dtype).contiguous(), packed, absmax, blocksize, quant_type, N, K,
                                  nested_absmax, nested_code, offset, nested_blocksize)
        else:
            W = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, N * K, dtype, nested_absmax,
                                    nested_code, offset, nested_blocksize).view(N, K)
            dx = grad.to(dtype) @ W
    dbias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[10] else None
    return dx, None, None, None, None, None, None, None, None, None, dbias


torch.library.register_autograd("qlora_kernels::matmul_4bit", _backward, setup_context=_setup_context)


# gemm_4bit: the same gradients, plus accumulate's (the output gradient itself).
def _gemm_setup_context(ctx, inputs, output):
    _setup_context(ctx, inputs[:11], output)
    ctx.has_accumulate = inputs[11] is not None


def _gemm_backward(ctx, grad):
    daccumulate = grad if ctx.has_accumulate and ctx.needs_input_grad[11] else None
    return (*_backward(ctx, grad), daccumulate)


torch.library.register_autograd("qlora_kernels::gemm_4bit", _gemm_backward, setup_context=_gemm_setup_context)


# gemm_4bit_dx (out = x @ W, which the backward above calls): d x = grad @ W.T, through gemm_4bit,
# so that a second derivative (create_graph=True) flows through the first backward's dX.
def _dx_setup_context(ctx, inputs, output):
    x, packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset, nested_blocksize = inputs
    ctx.format = (blocksize, quant_type, N, x.dtype, nested_blocksize)
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)


def _dx_backward(ctx, grad):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    blocksize, quant_type, N, dtype, nested_blocksize = ctx.format
    dx = None
    if ctx.needs_input_grad[0]:
        dx = ops.gemm_4bit(grad.to(dtype).contiguous(), packed, absmax, blocksize, quant_type, N, nested_absmax,
                           nested_code, offset, nested_blocksize, None, None)
    return (dx,) + (None,) * 10


torch.library.register_autograd("qlora_kernels::gemm_4bit_dx", _dx_backward, setup_context=_dx_setup_context)


#: The most weights one grouped launch takes (the CUDA kernel's WeightSet).
MAX_GROUP = 4


def same_format(states: list[QuantState]) -> bool:
    """Whether 4-bit weights can share one grouped launch: the same K, quant type, blocksize and
    double-quant layout (the 8-bit code map itself is compared by the caller, once)."""
    first = states[0]
    return all(
        len(s.shape) == 2 and s.shape[-1] == first.shape[-1] and s.quant_type == first.quant_type
        and s.blocksize == first.blocksize and s.nested == first.nested
        and (not s.nested or s.state2.blocksize == first.state2.blocksize)
        for s in states)


def same_code_maps(states: list[QuantState]) -> bool:
    """Whether double-quantized weights share one 8-bit code map (the grouped kernel reads the
    first one's); compares the tensors (a device sync on the GPU), so callers check it once."""
    first = states[0]
    return not first.nested or all(
        s.state2.code is first.state2.code
        or torch.equal(s.state2.code.cpu(), first.state2.code.cpu()) for s in states)


def matmul_4bit_group(x: torch.Tensor, weights: list[tuple[torch.Tensor, QuantState]],
                      biases: list[torch.Tensor | None] | None = None,
                      checked: bool = False) -> list[torch.Tensor]:
    """``[matmul_4bit(x, packed_i, state_i, bias_i) for each weight]``, in one kernel launch when
    it can be: the CUDA extension, an x that takes the fused kernel, no gradient needed, at most
    ``MAX_GROUP`` weights of one format (:func:`same_format`) and one double-quant code map
    (:func:`same_code_maps`; ``checked=True`` says the caller verified both once, as
    :class:`qlora_kernels.nn.ProjectionGroup` does, and skips them on every call). Decode runs
    q, k and v (or gate and up) this way: one launch, one ramp-up and one tail instead of three.
    Otherwise one ``matmul_4bit`` per weight; the results are the same, bit for bit."""
    biases = list(biases) if biases is not None else [None] * len(weights)
    if len(biases) != len(weights):
        raise ValueError(f"biases: expected one (or None) per weight ({len(weights)}), got {len(biases)}")
    states = [s for _, s in weights]
    one_launch = (
        ops.BACKEND == "cuda" and x.is_cuda and 1 <= len(weights) <= MAX_GROUP
        and uses_fused_kernel(x, states[0])
        and not (torch.is_grad_enabled() and (x.requires_grad or any(b is not None and b.requires_grad
                                                                      for b in biases)))
        and (checked or (same_format(states) and same_code_maps(states))))
    if not one_launch:
        return [matmul_4bit(x, p, s, b) for (p, s), b in zip(weights, biases)]
    Ns = []
    for i, ((packed, state), bias) in enumerate(zip(weights, biases)):
        N, K = check_x_and_weight(x, packed, state, FLOAT_DTYPES)
        biases[i] = _checked_bias(bias, N, x)
        Ns.append(N)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if _needs_copy(x2):
        x2 = x2.clone(memory_format=torch.contiguous_format)
    first = states[0]
    nested = [_nested_args(s) for s in states]
    outs = ops.matmul_4bit_grouped(
        x2, [p.contiguous() for p, _ in weights], [s.absmax.contiguous() for s in states], first.blocksize,
        first.quant_type, Ns, [n[0] for n in nested] if first.nested else None,
        nested[0][1] if first.nested else None, [n[2] for n in nested] if first.nested else None,
        nested[0][3], biases)
    return [o.view(*lead, n) for o, n in zip(outs, Ns)]
