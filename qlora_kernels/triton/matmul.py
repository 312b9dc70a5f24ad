"""Triton implementation of ``matmul_4bit``: ``x @ W.T (+ bias)`` with W ``[N, K]`` in
bitsandbytes' packed 4-bit layout, fused (W is decoded in registers, never written out).

Same signature as ``reference.matmul_4bit`` (``ops.py`` registers it for CUDA tensors when the
CUDA extension is absent); runs in the Triton interpreter on CPU tensors for the tests.

How the work is laid out, for decode batches (M = 1..64 rows of x):

* The packed bytes are read as ``[BLOCK_N, G, 16]`` tiles: G groups of 16 bytes (32 weights)
  per row of W, one 16-byte load each. K % 32 == 0 makes every group lie inside one row and
  one absmax block (a row starts at a multiple of 32 elements, blocks are multiples of 32), so
  the scale is fetched (and, with double quant, decoded) once per group, not per weight.
* The high nibble of byte j is element 2j, the low one 2j+1. Rather than interleaving the
  decoded weights, x is read de-interleaved (even and odd columns), which costs nothing: x is
  a few KB and sits in L1/L2.
* M == 1: a dot-product form (products summed within each 32-weight group, then scaled).
  M > 1: ``tl.dot`` with W as the left operand (``[BLOCK_N, K] @ [K, BLOCK_M]``, the token dim
  padded to 16), so each decoded weight serves every row of x on the tensor cores.
* Split-K: a layer with N = 4096 has only 4096 / BLOCK_N row tiles, too few to keep 132 SMs
  streaming. K is split so the grid holds about ``_CTAS_PER_SM`` programs per SM. Partial sums
  go to a float32 workspace ``[SPLIT, M, N]`` and a second small kernel adds them up (plus the
  bias) and rounds once to x's dtype. Why two passes rather than ``tl.atomic_add``: the sum
  order is fixed, so results are bit-for-bit repeatable (a CUDA-graph replay equals eager);
  there is no memset launch (atomics need a zeroed buffer, and a conversion pass anyway for a
  16-bit output), so it is two launches either way; and the workspace (at most a few MB) stays
  in L2. With one split the matmul kernel writes the output itself.

Block sizes come from a small heuristic (``_config``), not autotuning: autotuning is slow on
first call and would benchmark during CUDA-graph capture.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import codes, reference
from .quant import _on_device, kernel_absmax_args

#: Bytes per group (one 16-byte load), i.e. 32 weights; K must be a multiple of GROUP_K.
GROUP_BYTES = 16
GROUP_K = 2 * GROUP_BYTES
#: Target grid size: enough resident programs per SM to keep loads in flight (each program
#: has only one or two 16-byte loads per thread outstanding per iteration).
_CTAS_PER_SM = 8
#: A split covers at least this many K tiles, so its prologue and epilogue stay amortized.
_MIN_TILES_PER_SPLIT = 4
#: SMs assumed for CPU tensors (the interpreter), an H100's, so tests exercise split-K.
_DEFAULT_SMS = 132


@triton.jit
def _matmul_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, table_ptr, nested_ptr, code8_ptr, offset_ptr, bias_ptr,
    out_ptr, ws_ptr,
    M, N, K, k_per_split,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    BLOCK_K: tl.constexpr = GROUPS * 32
    HALF_K: tl.constexpr = GROUPS * 16

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N read row N-1 (valid memory) instead of masking: the loads stay unmasked
    # along N and the extra results are never stored.
    n_safe = tl.minimum(n, N - 1).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    x_row = x_ptr + m.to(tl.int64) * K

    g = tl.arange(0, GROUPS)
    t = tl.arange(0, 16)
    row_bytes = n_safe * (K // 2)
    row_elems = n_safe * K
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)

    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        j = tl.arange(0, HALF_K)
    else:
        acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)

    for k0 in range(k_begin, k_end, BLOCK_K):
        gk = k0 + g * 32                      # first element (column) of each group
        g_mask = gk < k_end                   # whole groups only: k_end is a multiple of 32
        byte = row_bytes[:, None, None] + (gk // 2)[None, :, None] + t[None, None, :]
        # evict_first: every weight byte is read once; keep L2 for x and the workspace.
        b = tl.load(packed_ptr + byte, mask=g_mask[None, :, None], other=0,
                    eviction_policy="evict_first").to(tl.int32)
        # The 64-byte code table stays in L1: one gather per nibble.
        hi = tl.load(table_ptr + (b >> 4))
        lo = tl.load(table_ptr + (b & 0xF))

        # One absmax per (row, group): the group's first element names its block.
        blk = (row_elems[:, None] + gk[None, :]) // BLOCKSIZE
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=g_mask[None, :], other=0).to(tl.int32)
            c2 = tl.load(nested_ptr + blk // NESTED_BLOCKSIZE, mask=g_mask[None, :], other=0.0)
            scale = tl.load(code8_ptr + q) * c2 + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=g_mask[None, :], other=0.0)
        # Masked groups get scale 0 (and x 0), so they add exact zeros.
        scale = tl.where(g_mask[None, :], scale, 0.0)

        if USE_DOT:
            # W scaled in float32, rounded once to x's 16-bit type for the tensor cores.
            w_hi = tl.reshape(hi * scale[:, :, None], (BLOCK_N, HALF_K)).to(x_ptr.dtype.element_ty)
            w_lo = tl.reshape(lo * scale[:, :, None], (BLOCK_N, HALF_K)).to(x_ptr.dtype.element_ty)
            col = k0 + 2 * j                   # the even columns of this K tile
            xm = m_mask[None, :] & (col < k_end)[:, None]
            x_even = tl.load(x_row[None, :] + col[:, None], mask=xm, other=0.0)
            x_odd = tl.load(x_row[None, :] + (col + 1)[:, None], mask=xm, other=0.0)
            if DOT_IN_FP32:
                # The interpreter's bfloat16 tl.dot is wrong (triton 3.x): same roundings of
                # W and x, products in exact float32 instead.
                acc = tl.dot(w_hi.to(tl.float32), x_even.to(tl.float32), acc, input_precision="ieee")
                acc = tl.dot(w_lo.to(tl.float32), x_odd.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w_hi, x_even, acc)
                acc = tl.dot(w_lo, x_odd, acc)
        else:
            col = gk[:, None] + 2 * t[None, :]
            xm = g_mask[:, None]
            x_even = tl.load(x_ptr + pid_m * K + col, mask=xm, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + pid_m * K + col + 1, mask=xm, other=0.0).to(tl.float32)
            # Sum the 32 products of each group first (in registers: a thread holds a whole
            # 16-byte group), then apply the group's scale once.
            dots = tl.sum(hi * x_even[None, :, :] + lo * x_odd[None, :, :], axis=2)
            acc += dots * scale

    if USE_DOT:
        result = acc
    else:
        result = tl.sum(acc, axis=1)[:, None]
    n_mask = n < N
    mask = n_mask[:, None] & m_mask[None, :]
    idx = m.to(tl.int64)[None, :] * N + n[:, None]
    if SPLIT:
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + idx, result, mask=mask)
    else:
        if HAS_BIAS:
            result += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + idx, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_splits_kernel(ws_ptr, bias_ptr, out_ptr, MN, N, SPLITS: tl.constexpr,
                          HAS_BIAS: tl.constexpr, TILE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = i < MN
    total = tl.zeros((TILE,), dtype=tl.float32)
    # Fixed order over the splits: the same bits on every run.
    for s in tl.static_range(SPLITS):
        total += tl.load(ws_ptr + s * MN + i, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + i % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, total.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    groups: int       # 16-byte groups per row per K tile: BLOCK_K = 32 * groups
    split: int
    k_per_split: int
    num_warps: int
    num_stages: int

    @property
    def use_dot(self) -> bool:
        return self.block_m > 1


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _config(M: int, N: int, K: int, device: torch.device) -> Config:
    """Block sizes for one call, from the shape alone (no autotuning).

    M == 1: 16 rows x 256 columns per K tile (2 KB of W, one 16-byte load per thread with 4
    warps); 72 registers on sm_90, so ~7 programs fit per SM. M > 1: 32 rows x 64 columns, the
    tokens padded to a power of two >= 16 (at most 64 per program), 3 pipeline stages. Wider
    K tiles put the de-interleaved x pointers over the register budget (ptxas on sm_90: 167
    registers at 128 columns, 255 and spills at 64 tokens; 72-96 at 64 columns).
    """
    if M == 1:
        block_m, block_n, groups, num_warps, num_stages = 1, 16, 8, 4, 1
    else:
        block_m = min(64, max(16, triton.next_power_of_2(M)))
        block_n, groups, num_warps, num_stages = 32, 2, 4, 3
    block_k = 32 * groups
    k_tiles = triton.cdiv(K, block_k)
    programs = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    target = _CTAS_PER_SM * _sm_count(device)
    split = max(1, min(triton.cdiv(target, programs), k_tiles // _MIN_TILES_PER_SPLIT))
    k_per_split = triton.cdiv(k_tiles, split) * block_k
    split = triton.cdiv(K, k_per_split)   # rounding may leave fewer (never empty) splits
    return Config(block_m, block_n, groups, split, k_per_split, num_warps, num_stages)


def _check(x: torch.Tensor, packed: torch.Tensor, N: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x: expected dtype bfloat16 or float16 (the fused kernel), got {x.dtype}")
    K = x.shape[1]
    if K % GROUP_K:
        raise ValueError(
            f"K: the fused kernel needs K (x.shape[1]) to be a multiple of {GROUP_K}, got {K}; "
            "qlora_kernels.matmul_4bit takes the dequantize path for such shapes")
    if packed.numel() * 2 < N * K:
        raise ValueError(f"packed: has {packed.numel()} bytes, W [{N}, {K}] needs {N * K // 2}")


def matmul_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    N: int,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = codes.NESTED_BLOCKSIZE,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x ``[M, K]`` (bf16/fp16, K % 32 == 0) and the 4-bit W
    ``[N, K]``; float32 accumulation, bias added in float32, one rounding to x's dtype."""
    _check(x, packed, N)
    M, K = x.shape
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.expand(M, N)) if bias is not None else out.zero_()
    x = x.contiguous()
    packed = packed.reshape(-1).contiguous()
    nested = nested_absmax is not None
    absmax, nested_absmax, nested_code, offset = kernel_absmax_args(absmax, nested_absmax, nested_code, offset)
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else out

    cfg = _config(M, N, K, x.device)
    split = cfg.split > 1
    ws = torch.empty((cfg.split, M, N), dtype=torch.float32, device=x.device) if split else out
    grid = (triton.cdiv(N, cfg.block_n), cfg.split, triton.cdiv(M, cfg.block_m))
    with _on_device(x):
        _matmul_4bit_kernel[grid](
            x, packed, absmax, codes.code_tensor(quant_type, str(x.device)),
            nested_absmax, nested_code, offset, bias_arg, out, ws,
            M, N, K, cfg.k_per_split,
            BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
            HAS_BIAS=has_bias, SPLIT=split,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUPS=cfg.groups, USE_DOT=cfg.use_dot,
            DOT_IN_FP32=not x.is_cuda,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if split:
            tile = 1024
            _reduce_splits_kernel[(triton.cdiv(M * N, tile),)](
                ws, bias_arg, out, M * N, N,
                SPLITS=cfg.split, HAS_BIAS=has_bias, TILE=tile, num_warps=4,
            )
    return out


# several weights times the same x: one Triton launch per weight
matmul_4bit_grouped = reference.grouped(matmul_4bit)
