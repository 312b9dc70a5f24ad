"""Plain-torch implementation of every op: the ground truth the CUDA and Triton kernels are
tested against bit for bit, and the kernel that serves CPU tensors.

Arguments are assumed checked (``functional.py`` checks them); each function mirrors the op of
the same name in ``csrc/ops.cpp``. Everything is computed in float32 with one rounding per
operation, in the order the kernels use, so that results match to the bit:

* quantize: ``scaled = x * (1 / max(absmax, 1e-38))``; the code is the nearest table entry,
  decided by the float32 midpoints, a value exactly on a midpoint taking the lower entry.
  (FP4's table is unsorted: the entries are ranked by value, +0 before -0, see codes.py.)
* dequantize: ``table[code] * absmax`` in float32, then one rounding to the output dtype.
* double quant decode: ``absmax = code8[q] * nested_absmax + offset`` (a multiply, then an
  add: two roundings, never a fused multiply-add).
"""

from __future__ import annotations

import functools
import math

import torch

from . import codes

# The smallest absmax used as a divisor: an all-zero block then scales to exact zeros instead of
# 0 * inf = NaN (bitsandbytes clamps the same way).
ABSMAX_FLOOR = 1e-38


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks, as [blocks, blocksize]. Zeros never raise a max."""
    n = flat.numel()
    nblocks = -(-n // blocksize)
    return torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)


def _absmax_and_scaled(flat32: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _blocks(flat32, blocksize)
    absmax = blocks.abs().amax(dim=1)  # amax propagates NaN, so a NaN block has a NaN absmax
    inv = 1.0 / absmax.clamp(min=ABSMAX_FLOOR)
    return absmax, (blocks * inv[:, None]).reshape(-1)


def encode_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit codes (int64) of values already scaled into [-1, 1]."""
    dev = str(scaled.device)
    # bucketize(right=False) = number of thresholds strictly below x: ties take the lower entry
    position = torch.bucketize(scaled, codes.thresholds(quant_type, dev))
    return codes.order_tensor(quant_type, dev)[position]


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed uint8 [(n+1)//2, 1], absmax float32 [ceil(n / blocksize)]).

    Element 2j goes to the high nibble of byte j, element 2j+1 to the low one; the unused low
    nibble of an odd-sized tensor holds the code of 0.0 (what bitsandbytes writes there).
    """
    flat = A.reshape(-1).to(torch.float32)
    n = flat.numel()
    absmax, scaled = _absmax_and_scaled(flat, blocksize)
    nbytes = (n + 1) // 2
    q = encode_4bit(scaled[: 2 * nbytes], quant_type).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed.reshape(nbytes, 1), absmax


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes (int64) of the first ``numel`` elements."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel].long()


def dequantize_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, offset: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """float32 ``code[q] * absmax[i // blocksize] + offset``: two roundings, no FMA."""
    n = q.numel()
    values = code.to(torch.float32)[q.reshape(-1).long()]
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return (values * scale) + offset.to(torch.float32)


def quantize_8bit(
    A: torch.Tensor, offset: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of ``A - offset`` to the nearest entry of the ascending
    256-entry ``code`` -> (q uint8 [n], absmax float32 [ceil(n / blocksize)])."""
    x = A.reshape(-1).to(torch.float32) - offset.to(torch.float32)
    n = x.numel()
    absmax, scaled = _absmax_and_scaled(x, blocksize)
    q = torch.bucketize(scaled[:n], codes.midpoints(code))
    return q.to(torch.uint8), absmax


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
    """1-D tensor of ``numel`` values in ``dtype``. With ``nested_absmax`` given, ``absmax``
    holds the 8-bit double-quant codes and is decoded first."""
    if nested_absmax is not None:
        absmax = dequantize_8bit(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    values = codes.code_tensor(quant_type, str(packed.device))[unpack_4bit(packed, numel)]
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:numel]
    return (values * scale).to(dtype)


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
    """``x @ W.T (+ bias)`` for x ``[M, K]`` and the 4-bit W ``[N, K]``: W dequantized to
    float32, the product and the bias added in float32, one rounding to x's dtype at the end."""
    K = x.shape[-1]
    W = dequantize_4bit(packed, absmax, blocksize, quant_type, N * K, torch.float32,
                        nested_absmax, nested_code, offset, nested_blocksize).view(N, K)
    out = x.to(torch.float32) @ W.T
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def gemm_4bit(
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
    accumulate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias) (+ accumulate)`` for many rows of x (prefill, training): the same
    product as ``matmul_4bit``, plus ``accumulate`` ``[M, N]`` added in float32 before the one
    rounding to x's dtype."""
    out = matmul_4bit(x.to(torch.float32), packed, absmax, blocksize, quant_type, N, nested_absmax,
                      nested_code, offset, nested_blocksize, bias)
    if accumulate is not None:
        out = out + accumulate.to(torch.float32)
    return out.to(x.dtype)


def gemm_4bit_dx(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    N: int,
    K: int,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = codes.NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """``x @ W`` for x ``[M, N]`` and the 4-bit W ``[N, K]`` (the backward's ``dX = dY @ W``):
    float32 throughout, one rounding to x's dtype."""
    W = _weight_float32(packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset,
                        nested_blocksize)
    return (x.to(torch.float32) @ W).to(x.dtype)


def _weight_float32(packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset,
                    nested_blocksize) -> torch.Tensor:
    """W ``[N, K]`` in float32 (the many-row ops' reference operand)."""
    return dequantize_4bit(packed, absmax, blocksize, quant_type, N * K, torch.float32, nested_absmax,
                           nested_code, offset, nested_blocksize).view(N, K)


def check_gemm_4bit_add(out: torch.Tensor, x: torch.Tensor, N: int, K: int, transposed: bool) -> None:
    """gemm_4bit_add_'s argument checks (the reference and Triton versions): x ``[M, K]`` (``[M, N]``
    transposed), out ``[M, N]`` (``[M, K]``) in x's dtype, not overlapping x."""
    width, want = (N, K) if transposed else (K, N)
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"x: expected sizes [M, {width}], got {list(x.shape)}")
    if out.shape != (x.shape[0], want) or out.dtype != x.dtype:
        raise ValueError(f"out: expected sizes [{x.shape[0]}, {want}] and dtype {x.dtype}, got "
                         f"{list(out.shape)}, {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"out: expected device {x.device} (x's), got {out.device}")
    if _memory_ranges_overlap(out, x):
        raise ValueError("out: must not overlap x (it is written while x is read)")


def _memory_ranges_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges a and b span intersect (conservative for interleaved views)."""
    def span(t):
        extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
        return t.data_ptr(), t.data_ptr() + extent * t.element_size()
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def gemm_4bit_add_(
    out: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    N: int,
    K: int,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = codes.NESTED_BLOCKSIZE,
    transposed: bool = False,
) -> None:
    """``out += x @ W.T`` (x ``[M, K]``), or with ``transposed`` ``out += x @ W`` (x ``[M, N]``), in
    place, W the 4-bit ``[N, K]``: float32 throughout, one rounding to out's dtype."""
    check_gemm_4bit_add(out, x, N, K, transposed)
    W = _weight_float32(packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset,
                        nested_blocksize)
    product = x.to(torch.float32) @ (W if transposed else W.T)
    out.copy_((out.to(torch.float32) + product).to(out.dtype))


def check_gemm_4bit_lora(x: torch.Tensor, N: int, xa: torch.Tensor, B: torch.Tensor, scale: float,
                         bias: torch.Tensor | None) -> None:
    """gemm_4bit_lora's argument checks (the reference and Triton versions): xa ``[M, r]`` and B
    ``[N, r]`` in x's dtype and on its device, a finite scale, a bias ``[N]``."""
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [M, K], got sizes {list(x.shape)}")
    if xa.dim() != 2 or xa.shape[0] != x.shape[0]:
        raise ValueError(f"xa: expected sizes [{x.shape[0]}, r], got {list(xa.shape)}")
    if B.dim() != 2 or tuple(B.shape) != (N, xa.shape[1]):
        raise ValueError(f"B: expected sizes [{N}, {xa.shape[1]}], got {list(B.shape)}")
    for name, t in (("xa", xa), ("B", B), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: expected dtype {x.dtype} (x's), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's), got {t.device}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias: expected sizes [{N}], got {list(bias.shape)}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")


def gemm_4bit_lora(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    N: int,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    nested_blocksize: int,
    xa: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + scale * xa @ B.T (+ bias)``, the LoRA layer's forward after its down-projection
    xa ``[M, r]`` (B ``[N, r]``): float32 throughout, one rounding to x's dtype."""
    check_gemm_4bit_lora(x, N, xa, B, scale, bias)
    out = matmul_4bit(x.to(torch.float32), packed, absmax, blocksize, quant_type, N, nested_absmax, nested_code,
                      offset, nested_blocksize, bias)
    return (out + scale * (xa.to(torch.float32) @ B.to(torch.float32).T)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Dropout with a mask regenerated from a seed (LoRA's dropout on x, never stored).
#
# Element i of the flattened tensor keeps its value when the 16-bit random number
# ``(philox4x32_10(counter=(g_lo, g_hi, 0, 0), key=(seed_lo, seed_hi))[j] >> 16 h) & 0xffff``,
# g = i // 8, j = (i // 2) % 4, h = i % 2 (each 32-bit output serves two elements, low half
# first), is >= ``dropout_threshold(p)``; kept values are scaled by ``dropout_scale(p)``
# (float32). One Philox call thus decides 8 elements: the kernels that fuse the dropout into a
# matmul are bound by Philox's arithmetic, and 16 bits give P(drop) to 2^-16. The CUDA
# kernel (cuRAND's Philox), the Triton kernel (tl.randint4x) and this reference compute the same
# function, so the three backends draw identical masks and are tested against each other bit
# for bit.

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key increments (Weyl sequence)
_MASK32 = 0xFFFFFFFF


def dropout_threshold(p: float) -> int:
    """floor(p * 2^16): a 16-bit random number below it drops its element (P(drop) =
    floor(p * 2^16) / 2^16, p to 2^-16; a p below 2^-16 drops nothing, and kept values are still
    scaled by 1 / (1 - p), by at most 1 + 1.5e-5)."""
    return min(int(p * 65536.0), 0xFFFF)


@functools.lru_cache(maxsize=None)
def dropout_scale(p: float) -> float:
    """1 / (1 - p) rounded to float32, the factor kept values are multiplied by (cached: every
    dropout launch asks for it, and a training run uses one or two p)."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for the constant a and uint32 values b held in int64:
    a is split in 16-bit halves so that no partial product overflows int64."""
    p1 = b * (a >> 16)
    p0 = b * (a & 0xFFFF)
    hi = (p1 + (p0 >> 16)) >> 16
    lo = (((p1 & 0xFFFF) << 16) + p0) & _MASK32
    return hi, lo


def philox4x32_10(counter_lo: torch.Tensor, counter_hi: torch.Tensor, seed: int) -> torch.Tensor:
    """Philox4x32-10 (Salmon et al., SC'11) of the counters (lo, hi, 0, 0) under the 64-bit key
    ``seed``: int64 tensor [n, 4] of uint32 values (cuRAND's curand_Philox4x32_10)."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & _MASK32, seed >> 32
    c0, c1 = counter_lo, counter_hi
    c2 = c3 = torch.zeros_like(counter_lo)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W[0]) & _MASK32
        k1 = (k1 + _PHILOX_W[1]) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=1)


def dropout_keep(numel: int, seed: int, p: float, device) -> torch.Tensor:
    """The bool keep-mask of ``numel`` elements (flat) for ``seed`` and ``p``."""
    groups = torch.arange(-(-numel // 8), dtype=torch.int64, device=device)
    r = philox4x32_10(groups & _MASK32, groups >> 32, seed)  # [groups, 4]
    halves = torch.stack([r & 0xFFFF, r >> 16], dim=2).reshape(-1)[:numel]  # 8 g + 2 j + h
    return halves >= dropout_threshold(p)


def _dropout_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 arithmetic (one rounding to the output dtype), as the kernels; float64 stays float64
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_device_seed(device_seed: torch.Tensor | None, like: torch.Tensor, like_name: str) -> None:
    """``device_seed`` of the dropout ops: None, or an int64 tensor of one element on the
    device of ``like`` (the reference and the Triton kernels check it alike)."""
    if device_seed is None:
        return
    if device_seed.dtype != torch.int64 or device_seed.numel() != 1:
        raise ValueError(f"device_seed: expected an int64 tensor of one element, got {device_seed.dtype} "
                         f"of shape {list(device_seed.shape)}")
    if device_seed.device != like.device:
        raise ValueError(f"device_seed: expected a tensor on {like.device} (the device of {like_name}), "
                         f"got {device_seed.device}")


def _seed_of(seed: int, device_seed: torch.Tensor | None) -> int:
    """The seed in force: ``device_seed``'s value when given (the kernels read it at run
    time), else ``seed``."""
    return seed if device_seed is None else int(device_seed.reshape(()))


def dropout_forward(x: torch.Tensor, seed: int, p: float, device_seed: torch.Tensor | None = None) -> torch.Tensor:
    """``x * keep / (1 - p)``: kept elements ``x * dropout_scale(p)`` (in float32), dropped +0.
    The seed is ``device_seed``'s value when given, else ``seed``."""
    check_device_seed(device_seed, x, "x")
    seed = _seed_of(seed, device_seed)
    keep = dropout_keep(x.numel(), seed, p, x.device).view(x.shape)
    xc = x.to(_dropout_compute_dtype(x.dtype))
    return torch.where(keep, xc * dropout_scale(p), 0.0).to(x.dtype)


def dropout_backward_add(out: torch.Tensor, grad: torch.Tensor, seed: int, p: float,
                         device_seed: torch.Tensor | None = None) -> None:
    """``out += grad * keep / (1 - p)`` in place, with the mask ``dropout_forward`` drew for
    ``seed``: a multiply, then an add (two roundings, no FMA), then one rounding to out's dtype."""
    check_device_seed(device_seed, out, "out")
    seed = _seed_of(seed, device_seed)
    keep = dropout_keep(grad.numel(), seed, p, grad.device).view(grad.shape)
    cdt = _dropout_compute_dtype(out.dtype)
    add = torch.where(keep, grad.to(cdt) * dropout_scale(p), 0.0)
    out.copy_((out.to(cdt) + add).to(out.dtype))


def check_thin_matmul(first_name: str, first: torch.Tensor, second_name: str, second: torch.Tensor,
                      first_dim: int, second_dim: int, what: str) -> None:
    """The operands of the fused dropout matmuls (``dropout_linear``, ``matmul_dropout``,
    ``dropout_grad_weight``): two 2-D tensors of one dtype and device whose dims ``first_dim``
    and ``second_dim`` agree (``what`` names that size)."""
    for name, t in ((first_name, first), (second_name, second)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {list(t.shape)}")
    if second.dtype != first.dtype:
        raise ValueError(f"{second_name}: expected the dtype of {first_name} ({first.dtype}), got {second.dtype}")
    if second.device != first.device:
        raise ValueError(f"{second_name}: expected a tensor on {first.device} (the device of {first_name}), "
                         f"got one on {second.device}")
    if second.shape[second_dim] != first.shape[first_dim]:
        raise ValueError(f"{second_name}: expected dim {second_dim} to be {first.shape[first_dim]} ({what} of "
                         f"{first_name}), got shape {list(second.shape)}")


def _dispatched_dropout_forward(x, seed, p, device_seed):
    """The dropout op as the dispatcher runs it for x's device. The compositions below stand in
    for kernels an extension may lack (one built from older sources): drawing their mask with
    the installed dropout_forward keeps it the mask of every other dropout call of the process."""
    return torch.ops.qlora_kernels.dropout_forward.default(x, seed, p, device_seed)


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, seed: int, p: float,
                   device_seed: torch.Tensor | None = None) -> torch.Tensor:
    """``dropout_forward(x) @ weight.T``: x ``[M, K]``, weight ``[r, K]`` -> ``[M, r]``, the LoRA
    down-projection of the dropped-out x (the CUDA kernel fuses the two: the same mask and
    roundings, float32 sums in another order)."""
    check_thin_matmul("x", x, "weight", weight, 1, 1, "K")
    return _dispatched_dropout_forward(x, seed, p, device_seed) @ weight.T


def matmul_dropout(a: torch.Tensor, b: torch.Tensor, seed: int, p: float,
                   device_seed: torch.Tensor | None = None) -> torch.Tensor:
    """``dropout_forward(a @ b)``: a ``[M, r]``, b ``[r, K]`` -> ``[M, K]``, the LoRA term of dX
    through the dropout (the product rounded to a's dtype, then masked and scaled, as the
    unfused ops; the CUDA kernel fuses them)."""
    check_thin_matmul("a", a, "b", b, 1, 0, "r")
    return _dispatched_dropout_forward(a @ b, seed, p, device_seed)


def dropout_grad_weight(g: torch.Tensor, x: torch.Tensor, seed: int, p: float,
                        device_seed: torch.Tensor | None = None) -> torch.Tensor:
    """``g.T @ dropout_forward(x)``: g ``[M, r]``, x ``[M, K]`` -> ``[r, K]``, the weight gradient
    of ``dropout_linear`` (the LoRA branch's dA; the CUDA kernel fuses the mask into the sum
    over the tokens: the same mask and roundings, float32 sums in another order)."""
    check_thin_matmul("g", g, "x", x, 0, 0, "M")
    return g.T @ _dispatched_dropout_forward(x, seed, p, device_seed)


def grouped(matmul):
    """``matmul_4bit_grouped`` (several weights times the same x) from a single-weight
    ``matmul_4bit``: one call per weight. The reference and Triton backends run it this way;
    the CUDA kernel runs all weights in one launch."""

    def matmul_4bit_grouped(x, packed, absmax, blocksize, quant_type, N, nested_absmax, nested_code, offset,
                            nested_blocksize, bias):
        count = len(packed)
        if not 1 <= count <= 4:
            raise ValueError(f"packed: expected 1 to 4 weights, got {count}")
        if len(absmax) != count or len(N) != count or (bias and len(bias) != count):
            raise ValueError(f"packed, absmax, N, bias: expected one per weight, got {count}, {len(absmax)}, "
                             f"{len(N)}, {len(bias)}")
        nested = nested_absmax is not None
        if (offset is not None) != nested or (nested_code is not None) != nested:
            raise ValueError("nested_absmax, nested_code, offset: expected all three (double quant) or none")
        if nested and (len(nested_absmax) != count or len(offset) != count):
            raise ValueError("nested_absmax, offset: expected one per weight")
        return [matmul(x, packed[i], absmax[i], blocksize, quant_type, N[i],
                       nested_absmax[i] if nested else None, nested_code, offset[i] if nested else None,
                       nested_blocksize, bias[i] if bias else None)
                for i in range(count)]

    return matmul_4bit_grouped


matmul_4bit_grouped = grouped(matmul_4bit)
