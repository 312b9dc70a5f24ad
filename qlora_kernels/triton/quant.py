"""Triton kernels for the four quantization ops, bit for bit what ``reference.py`` computes.

Each public function has the signature of its namesake in ``reference.py`` (``ops.py``
registers them as the CUDA implementation when the CUDA extension is absent). The same code
runs in the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which is how it is
tested without a GPU.

Numerics, matched to the reference step by step:

* absmax is the max of ``|x|`` taken on the float32 bit patterns as int32: for values with the
  sign cleared the integer order is the float order, and every NaN sorts above +inf, so a block
  holding a NaN gets a NaN absmax (``tl.max`` on floats may drop NaN; ``amax`` does not).
* ``1 / max(absmax, 1e-38)`` uses ``tl.math.div_rn``: a plain ``/`` is approximate on GPU.
* Positions are counted the way ``torch.bucketize`` (a lower bound) finds them: the number of
  thresholds ``t`` with ``!(t >= x)``, so NaN lands after every threshold.
* Kernels with a multiply feeding an add are launched with ``enable_fp_fusion=False``: Triton
  would otherwise contract them into one FMA (one rounding instead of the reference's two).
* bfloat16 inputs are widened by a bit shift (exact, subnormals included).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .. import codes, reference

# The divisor floor of reference.py. 1e-38 is a float32 subnormal, and a Python float below
# 2**-126 used in a kernel would be typed float64, so it enters as a float32 tl.full.
_ABSMAX_FLOOR = reference.ABSMAX_FLOOR

_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def _on_device(t: torch.Tensor):
    """Launches go to the current CUDA device: make it the tensor's (no-op for CPU tensors,
    which only the interpreter runs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _float_input(A: torch.Tensor) -> torch.Tensor:
    """Flat contiguous view; dtypes the kernels do not load directly go to float32 first,
    as the reference's ``.to(torch.float32)`` does."""
    flat = A.reshape(-1)
    if flat.dtype not in _FLOAT_INPUTS:
        flat = flat.to(torch.float32)
    return flat.contiguous()


@functools.lru_cache(maxsize=None)
def _order_int32(quant_type: str, device: str) -> torch.Tensor:
    """Position (rank of the value) -> 4-bit code, as int32 for an in-kernel gather."""
    return codes.order_tensor(quant_type, device).to(torch.int32)


def _quant_tile(n: int, blocksize: int) -> tuple[int, int]:
    """(elements per program, num_warps) for the quantize kernels: whole quant blocks per
    program, 4096 elements once the tensor is large enough to fill the GPU with such tiles,
    1024 below that so small tensors still spread over many SMs. About 16 elements a thread."""
    tile = max(blocksize, 4096 if n >= 1 << 22 else 1024)
    return tile, max(2, min(8, tile // 512))


@triton.jit
def _load_float32(ptr, mask):
    """Loads float32 / float16 / bfloat16 values as float32 (0.0 where masked). bfloat16 is the
    top half of a float32, so it is widened by shifting its bits: exact for every value, where
    the Triton interpreter's bfloat16 conversion flushes subnormals."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptr, mask=mask, other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _abs_bits(x):
    """``|x|`` of float32 ``x`` as int32 bit patterns, ordered as the values (NaN above inf)."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _absmax_and_inv(max_bits, FLOOR: tl.constexpr):
    """absmax from the per-block max of :func:`_abs_bits`, and the IEEE reciprocal of the
    floored absmax."""
    absmax = max_bits.to(tl.float32, bitcast=True)
    floor = tl.full([], FLOOR, tl.float32)
    # `absmax < floor` is false for NaN, so NaN passes through as torch's clamp lets it.
    m = tl.where(absmax < floor, floor, absmax)
    return absmax, tl.math.div_rn(1.0, m)


@triton.jit
def _quantize_4bit_kernel(
    a_ptr, packed_ptr, absmax_ptr, thr_ptr, order_ptr,
    n, nbytes, nblocks,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, IDENTITY_ORDER: tl.constexpr,
    FLOOR: tl.constexpr,
):
    # A [ROWS, BLOCKSIZE] tile of ROWS whole quant blocks, loaded 2-D so each thread reads a
    # 16-byte run; the byte pairs are split off only at the end.
    HALF: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = _load_float32(a_ptr + elem, elem < n)

    absmax, inv = _absmax_and_inv(tl.max(_abs_bits(x), axis=1), FLOOR)
    tl.store(absmax_ptr + blk, absmax, mask=blk < nblocks)

    # Padding elements (the low nibble of an odd-sized tensor) scale 0.0 like the reference's
    # zero padding, so they store the code of 0.0 (or of NaN when the block's absmax is NaN).
    scaled = x * inv[:, None]
    pos = tl.zeros(scaled.shape, dtype=tl.int32)
    for i in tl.static_range(15):
        pos += (scaled > tl.load(thr_ptr + i)).to(tl.int32)
    pos = tl.where(scaled != scaled, 15, pos)
    if IDENTITY_ORDER:
        code = pos
    else:
        code = tl.load(order_ptr + pos)
    hi, lo = tl.split(tl.reshape(code, [ROWS, HALF, 2]))
    byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]
    tl.store(packed_ptr + byte, ((hi << 4) | lo).to(tl.uint8), mask=byte < nbytes)


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed uint8 [(n+1)//2, 1], absmax float32 [ceil(n / blocksize)])."""
    flat = _float_input(A)
    n = flat.numel()
    nbytes = (n + 1) // 2
    nblocks = triton.cdiv(n, blocksize)
    packed = torch.empty((nbytes, 1), dtype=torch.uint8, device=flat.device)
    absmax = torch.empty((nblocks,), dtype=torch.float32, device=flat.device)
    if n == 0:
        return packed, absmax
    dev = str(flat.device)
    tile, num_warps = _quant_tile(n, blocksize)
    rows = tile // blocksize
    with _on_device(flat):
        _quantize_4bit_kernel[(triton.cdiv(nblocks, rows),)](
            flat, packed, absmax, codes.thresholds(quant_type, dev), _order_int32(quant_type, dev),
            n, nbytes, nblocks,
            BLOCKSIZE=blocksize, ROWS=rows, IDENTITY_ORDER=codes.sorted_order(quant_type) == tuple(range(16)),
            FLOOR=_ABSMAX_FLOOR, num_warps=num_warps,
        )
    return packed, absmax


@triton.jit
def block_scale(absmax_ptr, nested_ptr, code8_ptr, offset_ptr, blk, mask,
                NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """The absmax of blocks ``blk`` (masked ones: 0, or with double quant the offset): the
    float32 value, or double quant decoded in place, code8[q] * nested_absmax + offset (two
    roundings where the launch disables FMA contraction). No float32 absmax is ever written."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(nested_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return tl.load(code8_ptr + q) * c2 + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, absmax_ptr, table_ptr, out_ptr, nested_ptr, code8_ptr, offset_ptr,
    numel, nbytes, nblocks,
    HALF: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
):
    # ROWS * COLS contiguous packed bytes per program, in rows of COLS bytes whose 2 * COLS
    # outputs are one 16-byte store. COLS <= HALF (the bytes of a quant block), so a row lies
    # in one quant block and its absmax is fetched (or decoded) once per row. Rows this narrow
    # keep the byte load, the interleave and the store in one register layout: with wider rows
    # Triton routes the interleaved values through shared memory to re-split them for the store.
    start = tl.program_id(0).to(tl.int64) * (ROWS * COLS)
    row = start + tl.arange(0, ROWS) * COLS
    byte = row[:, None] + tl.arange(0, COLS)[None, :]
    # evict_first: the weights are read once and should not push activations out of L2.
    b = tl.load(packed_ptr + byte, mask=byte < nbytes, other=0, eviction_policy="evict_first")
    b = b.to(tl.int32)
    # One gather per value from the 64-byte table (an L1 hit, one address range per warp),
    # where a select tree would cost 15 selects per value.
    hi = tl.load(table_ptr + (b >> 4))
    lo = tl.load(table_ptr + (b & 0xF))

    blk = row // HALF
    in_range = blk < nblocks
    scale = block_scale(absmax_ptr, nested_ptr, code8_ptr, offset_ptr, blk, in_range, NESTED, NESTED_BLOCKSIZE)

    # High nibble = element 2j: interleaving (hi, lo) gives the output order, and the whole
    # [ROWS, 2 * COLS] tile is one contiguous run of outputs (vectorized stores).
    vals = tl.interleave(hi * scale[:, None], lo * scale[:, None])
    elem = 2 * row[:, None] + tl.arange(0, 2 * COLS)[None, :]
    tl.store(out_ptr + elem, vals.to(out_ptr.dtype.element_ty), mask=elem < numel)


def _dequant_tile(nbytes: int) -> tuple[int, int]:
    """(packed bytes per program, num_warps): 16 bytes (32 outputs) a thread in 4 KiB tiles
    once there are >= 1024 of them; 1 KiB tiles for smaller tensors, to use all SMs."""
    if nbytes >= 1 << 22:
        return 4096, 8
    return 1024, 4


def kernel_absmax_args(absmax, nested_absmax, nested_code, offset):
    """The absmax arguments of a 4-bit kernel, flat and contiguous: with double quant the uint8
    codes, the float32 nested absmax, code map and offset; without, the float32 absmax, its
    pointer also filling the three nested slots (never read: NESTED is a compile-time False)."""
    if nested_absmax is None:
        absmax = absmax.reshape(-1).to(torch.float32).contiguous()
        return absmax, absmax, absmax, absmax
    # the offset stays a device pointer, never .item(): no host sync, and torch.compile and
    # CUDA graphs can take the callers
    return (absmax.reshape(-1).contiguous(), nested_absmax.reshape(-1).to(torch.float32).contiguous(),
            nested_code.reshape(-1).to(torch.float32).contiguous(), offset.reshape(-1).to(torch.float32))


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    numel: int,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = codes.NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """1-D tensor of ``numel`` values in ``dtype``; with ``nested_absmax`` the uint8 ``absmax``
    codes are decoded inside the same kernel."""
    out = torch.empty((numel,), dtype=dtype, device=packed.device)
    if numel == 0:
        return out
    nbytes = (numel + 1) // 2
    nblocks = triton.cdiv(numel, blocksize)
    packed = packed.reshape(-1).contiguous()
    nested = nested_absmax is not None
    absmax, nested_absmax, nested_code, offset = kernel_absmax_args(absmax, nested_absmax, nested_code, offset)
    tile, num_warps = _dequant_tile(nbytes)
    # One row of bytes -> 16 bytes of output: 4 bytes for 2-byte dtypes, 2 for float32.
    cols = 16 // (2 * out.element_size())
    with _on_device(packed):
        _dequantize_4bit_kernel[(triton.cdiv(nbytes, tile),)](
            packed, absmax, codes.code_tensor(quant_type, str(packed.device)), out,
            nested_absmax, nested_code, offset,
            numel, nbytes, nblocks,
            HALF=blocksize // 2, ROWS=tile // cols, COLS=cols,
            NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
            num_warps=num_warps, enable_fp_fusion=False,
        )
    return out


@triton.jit
def _quantize_8bit_kernel(
    a_ptr, offset_ptr, mid_ptr, q_ptr, absmax_ptr,
    n, nblocks, nmid,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    FLOOR: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    mask = elem < n
    a = _load_float32(a_ptr + elem, mask)
    # Padding is 0.0 after the subtraction (the reference pads A - offset), not -offset.
    x = tl.where(mask, a - tl.load(offset_ptr), 0.0)

    absmax, inv = _absmax_and_inv(tl.max(_abs_bits(x), axis=1), FLOOR)
    tl.store(absmax_ptr + blk, absmax, mask=blk < nblocks)

    # Branch-free lower bound over the ascending midpoints, one bit of the position per step
    # (8 gathers for the 255 midpoints of a 256-entry code instead of 255 compares). Entries
    # past the end act as +inf; NaN passes every test and is clamped to nmid, as bucketize.
    scaled = x * inv[:, None]
    pos = tl.zeros(scaled.shape, dtype=tl.int32)
    for s in tl.static_range(SEARCH_STEPS):
        step = 1 << (SEARCH_STEPS - 1 - s)
        idx = pos + (step - 1)
        t = tl.load(mid_ptr + idx, mask=idx < nmid, other=float("inf"))
        pos += tl.where(t >= scaled, 0, step)
    pos = tl.minimum(pos, nmid)
    tl.store(q_ptr + elem, pos.to(tl.uint8), mask=mask)


def quantize_8bit(
    A: torch.Tensor, offset: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise nearest-code 8-bit quantization of ``A - offset`` ->
    (q uint8 [n], absmax float32 [ceil(n / blocksize)])."""
    flat = _float_input(A)
    n = flat.numel()
    nblocks = triton.cdiv(n, blocksize)
    q = torch.empty((n,), dtype=torch.uint8, device=flat.device)
    absmax = torch.empty((nblocks,), dtype=torch.float32, device=flat.device)
    if n == 0:
        return q, absmax
    mid = codes.midpoints(code.reshape(-1)).contiguous()
    nmid = mid.numel()
    tile, num_warps = _quant_tile(n, blocksize)
    rows = tile // blocksize
    with _on_device(flat):
        _quantize_8bit_kernel[(triton.cdiv(nblocks, rows),)](
            flat, offset.reshape(-1).to(torch.float32), mid, q, absmax,
            n, nblocks, nmid,
            BLOCKSIZE=blocksize, ROWS=rows, SEARCH_STEPS=max(1, nmid.bit_length()),
            FLOOR=_ABSMAX_FLOOR, num_warps=num_warps, enable_fp_fusion=False,
        )
    return q, absmax


@triton.jit
def _dequantize_8bit_kernel(
    q_ptr, absmax_ptr, code_ptr, offset_ptr, out_ptr, n,
    BLOCKSIZE: tl.constexpr, TILE: tl.constexpr,
):
    elem = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = elem < n
    q = tl.load(q_ptr + elem, mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + elem // BLOCKSIZE, mask=mask, other=0.0)
    # A multiply, then an add: the launch disables FMA contraction to keep both roundings.
    tl.store(out_ptr + elem, tl.load(code_ptr + q) * scale + tl.load(offset_ptr), mask=mask)


def dequantize_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, offset: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """float32 ``code[q] * absmax[i // blocksize] + offset``, two roundings."""
    q = q.reshape(-1).contiguous()
    n = q.numel()
    out = torch.empty((n,), dtype=torch.float32, device=q.device)
    if n == 0:
        return out
    tile = 1024
    with _on_device(q):
        _dequantize_8bit_kernel[(triton.cdiv(n, tile),)](
            q, absmax.reshape(-1).to(torch.float32).contiguous(),
            code.reshape(-1).to(torch.float32).contiguous(), offset.reshape(-1).to(torch.float32),
            out, n,
            BLOCKSIZE=blocksize, TILE=tile, num_warps=4, enable_fp_fusion=False,
        )
    return out
