"""Triton implementation of ``matmul_4bit``: ``x @ W.T (+ bias)`` with W ``[N, K]`` in
bitsandbytes' packed 4-bit layout, fused (W is decoded in registers, never written out).

Same signature as ``reference.matmul_4bit`` (``ops.py`` registers it for CUDA tensors when the
CUDA extension is absent); runs in the Triton interpreter on CPU tensors for the tests.

How the work is laid out, for decode batches (M = 1..64 rows of x):

* W is read in groups of 16 bytes (32 weights) per row, one 16-byte load each. K % 32 == 0
  makes every group lie inside one row and one absmax block (a row starts at a multiple of 32
  elements, blocks are multiples of 32), so the scale is fetched (and, with double quant,
  decoded) once per group, not per weight.
* M == 1 (``_matvec_4bit_kernel``): a dot-product form, products summed within each group,
  then scaled. The high nibble of byte j is element 2j, the low one 2j+1: rather than
  interleaving the decoded weights, x is read de-interleaved (even and odd columns), which
  costs nothing: x is a few KB and sits in L1/L2.
* M > 1 (``_matmul_4bit_dot_kernel``): ``tl.dot`` with W as the left operand (``[BLOCK_N, 32]
  @ [32, BLOCK_M]``, the token dim padded to 16), so each decoded weight serves every row of x
  on the tensor cores. Three choices made it 11-17x faster than a first version that scaled
  each weight before the dot and decoded nibbles one gather each (H100, 8192x22016 at 16
  tokens: 1911 -> 112 us, bf16 ``F.linear`` 133 us; 4096x4096 at 4 tokens: 192 -> 17 us):
  - a byte decodes to its two codes with one lookup in a 256-entry table of 16-bit pairs,
    held by the program and read with ``tl.gather``; ``tl.join`` puts the pair in order;
  - the codes go into the dot unscaled (rounded once to x's type), and the group's absmax
    scales the dot's float32 result: one FMA per output instead of a multiply per weight (a group
    lies in one absmax block, so the scale is one value per row of the dot);
  - the packed bytes are loaded as 16-byte vectors of 4 words.
  ``tl.gather`` needs triton >= 3.2.
* Split-K: a layer with N = 4096 has only 4096 / BLOCK_N row tiles, too few to keep 132 SMs
  streaming. K is split so the grid holds a few programs per SM (``_config``). Partial sums
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
from .quant import _on_device, block_scale, kernel_absmax_args
from .quant import dequantize_4bit as _dequantize_4bit  # aliased: ops.py maps op names to module attributes

#: Bytes per group (one 16-byte load), i.e. 32 weights; K must be a multiple of GROUP_K.
GROUP_BYTES = 16
GROUP_K = 2 * GROUP_BYTES
#: A split covers at least this many K tiles, so its prologue and epilogue stay amortized.
_MIN_TILES_PER_SPLIT = 4
#: SMs assumed for CPU tensors (the interpreter), an H100's, so tests exercise split-K.
_DEFAULT_SMS = 132


@triton.jit
def _matvec_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, table_ptr, nested_ptr, code8_ptr, offset_ptr, bias_ptr,
    out_ptr, ws_ptr,
    N, K, k_per_split,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
):
    """M == 1: ``BLOCK_N`` outputs per program, as dot products."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BLOCK_K: tl.constexpr = GROUPS * 32

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N read row N-1 (valid memory) instead of masking: the loads stay unmasked
    # along N and the extra results are never stored.
    n_safe = tl.minimum(n, N - 1).to(tl.int64)
    g = tl.arange(0, GROUPS)
    t = tl.arange(0, 16)
    row_bytes = n_safe * (K // 2)
    row_elems = n_safe * K
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)

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
        # (block_scale's body, written out: called, it compiles for sm_90 to the same instructions
        # in another schedule, which has not been timed on a GPU)
        blk = (row_elems[:, None] + gk[None, :]) // BLOCKSIZE
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=g_mask[None, :], other=0).to(tl.int32)
            c2 = tl.load(nested_ptr + blk // NESTED_BLOCKSIZE, mask=g_mask[None, :], other=0.0)
            scale = tl.load(code8_ptr + q) * c2 + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=g_mask[None, :], other=0.0)
        # Masked groups get scale 0 (and x 0), so they add exact zeros.
        scale = tl.where(g_mask[None, :], scale, 0.0)

        col = gk[:, None] + 2 * t[None, :]
        x_even = tl.load(x_ptr + col, mask=g_mask[:, None], other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + col + 1, mask=g_mask[:, None], other=0.0).to(tl.float32)
        # Sum the 32 products of each group first (in registers: a thread holds a whole
        # 16-byte group), then apply the group's scale once.
        dots = tl.sum(hi * x_even[None, :, :] + lo * x_odd[None, :, :], axis=2)
        acc += dots * scale

    result = tl.sum(acc, axis=1)
    n_mask = n < N
    if SPLIT:
        tl.store(ws_ptr + pid_k.to(tl.int64) * N + n, result, mask=n_mask)
    else:
        if HAS_BIAS:
            result += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + n, result.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _matmul_4bit_dot_kernel(
    x_ptr, words_ptr, absmax_ptr, pair_ptr, nested_ptr, code8_ptr, offset_ptr, bias_ptr,
    out_ptr, ws_ptr,
    M, N, K, k_per_split,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """M > 1: ``[BLOCK_N, BLOCK_M]`` of out^T per program, one tl.dot per 32-column group."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_safe = tl.minimum(n, N - 1).to(tl.int64)   # rows past N read row N - 1, never stored
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    x_row = x_ptr + m.to(tl.int64) * K
    row_words = n_safe * (K // 8)                # a row is K / 8 32-bit words (K % 32 == 0)
    row_elems = n_safe * K
    word = tl.arange(0, 4)                       # a group's 4 words
    byte_shift = 8 * tl.arange(0, 4)             # a word's 4 bytes, little-endian
    e = tl.arange(0, 32)                         # a group's 32 elements
    # Byte -> its two codes as one int32 (x's 16-bit type, element 2j in the low half). Held by
    # the program and read with tl.gather (shared memory): a global gather per byte instead
    # cost two 64-bit address instructions and a cp.async each (H100: 8192x22016 at 16 tokens
    # 125 -> 110 us).
    pair_table = tl.load(pair_ptr + tl.arange(0, 256))
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_begin, k_end, 32 * GROUPS):
        for g in tl.static_range(GROUPS):
            gk = k0 + 32 * g
            ok = gk < k_end                      # whole groups: k_end is a multiple of 32
            # A row's group is 4 words on a 16-byte boundary: one vector load. evict_first:
            # every weight byte is read once; keep L2 for x and the workspace.
            group_words = tl.multiple_of(row_words + gk // 8, 4)
            words = tl.load(words_ptr + group_words[:, None] + word[None, :], mask=ok, other=0,
                            eviction_policy="evict_first")
            b = tl.reshape((words[:, :, None] >> byte_shift[None, None, :]) & 0xFF, (BLOCK_N * 16,))
            pair = tl.reshape(tl.gather(pair_table, b, 0), (BLOCK_N, 16))
            even = (pair & 0xFFFF).to(tl.uint16).to(x_ptr.dtype.element_ty, bitcast=True)
            odd = (pair >> 16).to(tl.uint16).to(x_ptr.dtype.element_ty, bitcast=True)
            w = tl.reshape(tl.join(even, odd), (BLOCK_N, 32))   # the group's codes, in order
            xg = tl.load(x_row[None, :] + (gk + e)[:, None], mask=m_mask[None, :] & ok, other=0.0)
            if DOT_IN_FP32:
                # The interpreter's bfloat16 tl.dot is wrong (triton 3.x): same values, float32.
                d = tl.dot(w.to(tl.float32), xg.to(tl.float32), input_precision="ieee")
            else:
                d = tl.dot(w, xg)
            # The group's absmax, applied to the dot's float32 result (x = 0 past K_end).
            blk = (row_elems + gk) // BLOCKSIZE
            scale = block_scale(absmax_ptr, nested_ptr, code8_ptr, offset_ptr, blk, ok, NESTED, NESTED_BLOCKSIZE)
            acc += d * scale[:, None]

    n_mask = n < N
    mask = n_mask[:, None] & m_mask[None, :]
    idx = m.to(tl.int64)[None, :] * N + n[:, None]
    if SPLIT:
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + idx, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)


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
    warps); 72 registers on sm_90, so ~7 programs fit per SM; K split for ~16 programs per SM
    (3-7% faster than 8 on an H100 from 8192x8192 up; a variant with 16-byte word loads and
    a 256-entry pair table ran 1.2-1.6x slower: experiments/matmul_4bit_triton_m1.json).
    M > 1: 128 rows x 64 columns (two dots of 32) per K tile, the tokens padded to a power of
    two >= 16 (at most 64 per program), 4 warps (one warpgroup: two wgmma M tiles on sm_90), 3
    stages, K split for ~4 programs per SM. Chosen on an H100 from 54 configurations (64, 128,
    256 rows; 1, 2, 4 groups; 2, 3 stages; three decoders), then against nine finalists at 1-64
    tokens on six LLaMA shapes: within 10% of the best on 36 of 42 cases, the misses being
    4096x4096 at 64 tokens (1.18x) and 22016x8192 at 1-8 tokens (1.10-1.14x). Source:
    benchmarks/results/NVIDIA-H100-80GB-HBM3/experiments/matmul_4bit_triton_dot_configs.json.
    """
    if M == 1:
        block_m, block_n, groups, num_warps, num_stages, per_sm = 1, 16, 8, 4, 1, 16
    else:
        block_m = min(64, max(16, triton.next_power_of_2(M)))
        block_n, groups, num_warps, num_stages, per_sm = 128, 2, 4, 3, 4
    block_k = 32 * groups
    k_tiles = triton.cdiv(K, block_k)
    programs = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    target = per_sm * _sm_count(device)
    split = max(1, min(triton.cdiv(target, programs), k_tiles // _MIN_TILES_PER_SPLIT))
    k_per_split = triton.cdiv(k_tiles, split) * block_k
    split = triton.cdiv(K, k_per_split)   # rounding may leave fewer (never empty) splits
    return Config(block_m, block_n, groups, split, k_per_split, num_warps, num_stages)


#: Whether this triton has ``tl.gather`` (3.2 and up), which the M > 1 kernel needs; without it
#: the Triton backend fuses one row only (``qlora_kernels.matmul.uses_fused_kernel``).
HAS_DOT_KERNEL = hasattr(tl, "gather")

# The kernels' code tables on each device, made on first use. Made on the host and copied, so
# not under CUDA-graph capture (a pageable copy is not capturable): the first call of each
# (format, dtype, device) has to come before, as any warm-up call does.
_TABLES: dict = {}


def _tables(quant_type: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the 16 codes as float32, the 256-entry pair table) on ``device``. Pair table entry b
    holds byte b's two codes in x's 16-bit type as one int32: element 2j (the high nibble) in
    the low half, element 2j + 1 in the high half (the order tl.join puts them in)."""
    key = (quant_type, dtype, str(device))
    if key not in _TABLES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"matmul_4bit (Triton): the first call for {quant_type} with {dtype} x on {device} is under "
                "CUDA-graph capture, where its code tables cannot be copied to the device; call it once "
                "before capturing (a warm-up call)")
        bits = codes.code_tensor(quant_type).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
        b = torch.arange(256)
        pairs = (bits[b >> 4] | (bits[b & 15] << 16)).to(device)
        _TABLES[key] = (codes.code_tensor(quant_type, str(device)), pairs)
    return _TABLES[key]


def _as_words(packed: torch.Tensor, words: int) -> torch.Tensor:
    """The first ``words`` 32-bit words of the packed bytes (a copy only where the bytes do not
    start on a 16-byte boundary, which the kernel's vector loads want, or where the view to
    int32 needs it)."""
    packed = packed[: 4 * words]
    if packed.data_ptr() % 16 or packed.storage_offset() % 4:
        packed = packed.clone()
    return packed.view(torch.int32)


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
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed: expected dtype uint8 (two 4-bit codes a byte), got {packed.dtype}")
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
    common = dict(BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
                  HAS_BIAS=has_bias, SPLIT=split, BLOCK_N=cfg.block_n, GROUPS=cfg.groups,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    code, pairs = _tables(quant_type, x.dtype, x.device)
    with _on_device(x):
        if cfg.use_dot:
            _matmul_4bit_dot_kernel[grid](
                x, _as_words(packed, N * K // 8), absmax, pairs,
                nested_absmax, nested_code, offset, bias_arg, out, ws, M, N, K, cfg.k_per_split,
                BLOCK_M=cfg.block_m, DOT_IN_FP32=not x.is_cuda, **common)
        else:
            _matvec_4bit_kernel[grid](
                x, packed, absmax, code,
                nested_absmax, nested_code, offset, bias_arg, out, ws, N, K, cfg.k_per_split, **common)
        if split:
            tile = 1024
            _reduce_splits_kernel[(triton.cdiv(M * N, tile),)](
                ws, bias_arg, out, M * N, N,
                SPLITS=cfg.split, HAS_BIAS=has_bias, TILE=tile, num_warps=4,
            )
    return out


# several weights times the same x: one Triton launch per weight
matmul_4bit_grouped = reference.grouped(matmul_4bit)


def _weight(packed, absmax, blocksize, quant_type, N, K, dtype, nested_absmax, nested_code, offset,
            nested_blocksize) -> torch.Tensor:
    """W ``[N, K]`` in ``dtype`` by the Triton dequantize kernel: the many-row ops below then run
    cuBLAS on it."""
    return _dequantize_4bit(packed, absmax, blocksize, quant_type, N * K, dtype, nested_absmax, nested_code, offset,
                            nested_blocksize).view(N, K)


def gemm_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, N: int,
              nested_absmax: torch.Tensor | None = None, nested_code: torch.Tensor | None = None,
              offset: torch.Tensor | None = None, nested_blocksize: int = codes.NESTED_BLOCKSIZE,
              bias: torch.Tensor | None = None, accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """The op ``gemm_4bit`` on the Triton backend: W dequantized by the Triton kernel into x's
    dtype, then cuBLAS (``accumulate`` as its beta = 1 input). At many rows the GEMM's arithmetic
    bounds the layer, and Triton's 4-bit dot kernel was 2-3.5x slower than this there
    (experiments/matmul_4bit_triton_dot_prefill_rejected.json)."""
    K = x.shape[-1]
    W = _weight(packed, absmax, blocksize, quant_type, N, K, x.dtype, nested_absmax, nested_code, offset,
                nested_blocksize)
    if accumulate is None:  # the bias in cuBLAS' epilogue, as F.linear adds it
        return torch.nn.functional.linear(x, W, bias)
    out = torch.addmm(accumulate, x, W.T)
    return out.add_(bias) if bias is not None else out


def gemm_4bit_dx(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                 N: int, K: int, nested_absmax: torch.Tensor | None = None, nested_code: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None, nested_blocksize: int = codes.NESTED_BLOCKSIZE) -> torch.Tensor:
    """The op ``gemm_4bit_dx`` (``x @ W``) on the Triton backend: dequantize, then cuBLAS."""
    return x @ _weight(packed, absmax, blocksize, quant_type, N, K, x.dtype, nested_absmax, nested_code, offset,
                       nested_blocksize)


def gemm_4bit_add_(out: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                   quant_type: str, N: int, K: int, nested_absmax: torch.Tensor | None = None,
                   nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                   nested_blocksize: int = codes.NESTED_BLOCKSIZE, transposed: bool = False) -> None:
    """The op ``gemm_4bit_add_`` (``out += x @ W.T``, or ``x @ W`` transposed) on the Triton backend:
    dequantize, then cuBLAS with beta = 1 in place."""
    reference.check_gemm_4bit_add(out, x, N, K, transposed)
    W = _weight(packed, absmax, blocksize, quant_type, N, K, x.dtype, nested_absmax, nested_code, offset,
                nested_blocksize)
    out.addmm_(x, W if transposed else W.T)


def gemm_4bit_lora(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                   N: int, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                   offset: torch.Tensor | None, nested_blocksize: int, xa: torch.Tensor, B: torch.Tensor,
                   scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op ``gemm_4bit_lora`` (``x @ W.T + scale * xa @ B.T (+ bias)``) on the Triton backend: the
    LoRA term (and bias) first, then dequantize and cuBLAS with beta = 1 onto it in place."""
    reference.check_gemm_4bit_lora(x, N, xa, B, scale, bias)
    W = _weight(packed, absmax, blocksize, quant_type, N, x.shape[1], x.dtype, nested_absmax, nested_code, offset,
                nested_blocksize)
    if bias is not None:
        out = torch.addmm(bias, xa, B.T, alpha=scale)
    else:  # beta = 0: the uninitialized output is ignored
        out = torch.empty((x.shape[0], N), dtype=x.dtype, device=x.device).addmm_(xa, B.T, beta=0, alpha=scale)
    return out.addmm_(x, W.T)
