"""The Triton kernels (qlora_kernels/triton/quant.py) against the torch reference, bit for bit,
run by the Triton interpreter on CPU tensors.

Only for machines without a GPU (on a GPU the compiled kernels are tested elsewhere); needs
TRITON_INTERPRET=1 set before the kernels are imported (tests/conftest.py does that when no GPU
is present). The interpreter is slow, so the sizes are small except for one 4160 x 257 case.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("a GPU is present: the compiled Triton kernels are tested instead", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
pytest.importorskip("triton")
# inf * 0 in the edge cases is meant (it is what the reference computes); numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

from qlora_kernels import codes, reference as R  # noqa: E402
from qlora_kernels.triton import quant as T  # noqa: E402

BLOCKSIZES = (32, 64, 128, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 63, 64, 65, 4160 * 3 + 1)
NAN = float("nan")
INF = float("inf")


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal shape, dtype and bits; NaN equals NaN. bfloat16 may differ by 1 ulp: the
    interpreter truncates float32 -> bfloat16 where the GPU (and torch) round to nearest."""
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: got {got.dtype}{tuple(got.shape)}, want {want.dtype}{tuple(want.shape)}"
    )
    if not got.is_floating_point():
        bad = got != want
    else:
        nan = got.isnan() & want.isnan()
        if got.dtype == torch.bfloat16:
            diff = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
            bad = (diff > 1) & ~nan
        else:
            bits = {torch.float32: torch.int32, torch.float16: torch.int16}[got.dtype]
            bad = (got.view(bits) != want.view(bits)) & ~nan
        bad |= got.isnan() != want.isnan()
    if bool(bad.any()):
        i = bad.reshape(-1).nonzero()[:5].flatten()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} differ, first at {i.tolist()}: "
            f"got {got.reshape(-1)[i].tolist()}, want {want.reshape(-1)[i].tolist()}"
        )


def random_input(n: int, dtype: torch.dtype, blocksize: int, g: torch.Generator) -> torch.Tensor:
    """Fresh normal data at a random magnitude, with one all-zero block when there is room."""
    scale = 10.0 ** float(torch.empty(()).uniform_(-4, 2, generator=g))
    x = torch.randn(n, generator=g) * scale
    if n >= 2 * blocksize:
        x[blocksize : 2 * blocksize] = 0.0
    return x.to(dtype)


def check_all(A: torch.Tensor, blocksize: int, quant_type: str, out_dtypes=DTYPES) -> None:
    """quantize, 8-bit double quant of absmax, and both dequantize paths, against the reference."""
    n = A.numel()
    tag = f"n={n} bs={blocksize} {quant_type} {A.dtype}"
    packed, absmax = R.quantize_4bit(A, blocksize, quant_type)
    got_packed, got_absmax = T.quantize_4bit(A, blocksize, quant_type)
    assert_same(got_packed, packed, f"packed ({tag})")
    assert_same(got_absmax, absmax, f"absmax ({tag})")
    for dtype in out_dtypes:
        assert_same(
            T.dequantize_4bit(packed, absmax, blocksize, quant_type, n, dtype),
            R.dequantize_4bit(packed, absmax, blocksize, quant_type, n, dtype),
            f"dequantize -> {dtype} ({tag})",
        )

    code8 = codes.dynamic_map()
    offset = absmax.mean()
    q, nested = R.quantize_8bit(absmax, offset, code8, codes.NESTED_BLOCKSIZE)
    got_q, got_nested = T.quantize_8bit(absmax, offset, code8, codes.NESTED_BLOCKSIZE)
    assert_same(got_q, q, f"quantize_8bit q ({tag})")
    assert_same(got_nested, nested, f"quantize_8bit absmax ({tag})")
    assert_same(
        T.dequantize_8bit(q, nested, code8, offset, codes.NESTED_BLOCKSIZE),
        R.dequantize_8bit(q, nested, code8, offset, codes.NESTED_BLOCKSIZE),
        f"dequantize_8bit ({tag})",
    )
    for dtype in (torch.float32, torch.bfloat16):
        args = (blocksize, quant_type, n, dtype, nested, code8, offset, codes.NESTED_BLOCKSIZE)
        assert_same(
            T.dequantize_4bit(packed, q, *args), R.dequantize_4bit(packed, q, *args),
            f"fused double dequant -> {dtype} ({tag})",
        )


@pytest.mark.parametrize("quant_type", codes.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, blocksize, quant_type, rng):
    for n in SIZES:
        check_all(random_input(n, dtype, blocksize, rng), blocksize, quant_type)


def test_large_awkward_shape(rng):
    """K=4160, N=257: many programs, a partial last block, nested decode across 256-blocks."""
    A = random_input(4160 * 257, torch.bfloat16, 64, rng)
    check_all(A, 64, "nf4", out_dtypes=(torch.bfloat16,))


@pytest.mark.parametrize("quant_type", codes.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", (32, 4096))
def test_edge_values(blocksize, quant_type):
    """Exact ties on every threshold, +-0, tiny values around FP4's +0/-0 threshold,
    subnormals (the 1e-38 floor), an all-zero block, inf and NaN blocks, an odd size."""
    thr = codes.thresholds(quant_type)
    bs = blocksize
    ties = torch.cat([torch.tensor([1.0, -0.0, 0.0, 1e-30, -1e-30]), thr, -thr])
    blocks = [
        ties,  # absmax 1.0: scaled == x, so the thresholds themselves are exact ties
        torch.full((bs,), 1e-40),  # subnormal absmax: divides by the floor
        torch.tensor([3e-39, -2e-39, 1e-45]),
        torch.zeros(bs),
        torch.tensor([1.0, INF, -2.0]),
        torch.tensor([-INF, 0.5]),
        torch.tensor([0.25, NAN, -1.0]),
    ]
    rows = [torch.nn.functional.pad(b[:bs], (0, bs - min(bs, b.numel()))) for b in blocks]
    x = torch.cat(rows + [torch.tensor([0.5, NAN, 0.1])])  # odd size, NaN in the last block
    for dtype in (torch.float32, torch.bfloat16):
        check_all(x.to(dtype), bs, quant_type, out_dtypes=(torch.float32,))


def test_quantize_8bit_ties_and_other_code_sizes(rng):
    """Values exactly on the 8-bit midpoints, and ascending codes that are not 256 long."""
    for size in (256, 255, 16, 2):
        code = torch.sort(torch.randn(size, generator=rng)).values.clamp(-1, 1)
        code[0], code[-1] = -1.0, 1.0
        mid = codes.midpoints(code)
        x = torch.cat([mid, torch.randn(1000, generator=rng), torch.tensor([NAN, INF, 1.0])])
        offset = torch.tensor(0.125)
        for bs in (256, 32):
            q, absmax = R.quantize_8bit(x, offset, code, bs)
            got_q, got_absmax = T.quantize_8bit(x, offset, code, bs)
            assert_same(got_q, q, f"q (code of {size}, bs={bs})")
            assert_same(got_absmax, absmax, f"absmax (code of {size}, bs={bs})")
    # zero offset: the midpoints themselves are exact ties (block absmax 1.0)
    code = codes.dynamic_map()
    x = torch.cat([codes.midpoints(code), torch.tensor([1.0])])
    zero = torch.zeros(())
    assert_same(T.quantize_8bit(x, zero, code, 256)[0], R.quantize_8bit(x, zero, code, 256)[0], "8-bit ties")


def test_empty():
    A = torch.empty(0)
    for got, want in zip(T.quantize_4bit(A, 64, "nf4"), R.quantize_4bit(A, 64, "nf4")):
        assert got.shape == want.shape and got.dtype == want.dtype
    assert T.dequantize_4bit(torch.empty((0, 1), dtype=torch.uint8), torch.empty(0), 64, "nf4", 0,
                             torch.bfloat16).shape == (0,)


def test_sizes_around_tiles(rng):
    """Sizes on and just past the tile edges of both kernels (1024 / 4096 elements, 1 KiB of
    packed bytes) with every combination of odd / even."""
    for n, bs in itertools.product((2047, 2048, 2049, 4095, 4097), (64, 2048)):
        check_all(random_input(n, torch.float32, bs, rng), bs, "fp4", out_dtypes=(torch.float32,))
