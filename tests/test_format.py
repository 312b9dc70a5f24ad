"""The format itself, on the plain-torch reference: hand-computed cases of every rule in
DESIGN.md (codes, midpoint ties, nibble order, partial blocks, double-quant decode)."""

import json
import os
import struct

import pytest
import torch

from qlora_kernels import codes, reference

SHARED_CODES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "format", "codes.json")


def f32_next(x: float, up: bool) -> float:
    if x == 0.0:
        return 1e-45 if up else -1e-45  # the smallest subnormals
    bits = struct.unpack("<i", struct.pack("<f", x))[0]
    bits += 1 if (up == (x >= 0)) else -1
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def quantize_block_of(values, blocksize=64, quant_type="nf4"):
    """Quantizes one block holding 1.0 (so absmax = 1 and scaled = x) followed by values."""
    A = torch.zeros(blocksize)
    A[0] = 1.0
    A[1 : 1 + len(values)] = torch.tensor(values, dtype=torch.float32)
    packed, absmax = reference.quantize_4bit(A, blocksize, quant_type)
    return reference.unpack_4bit(packed, blocksize)[1 : 1 + len(values)].tolist(), absmax


@pytest.mark.skipif(not os.path.exists(SHARED_CODES), reason="../shared not beside the checkout")
def test_bundled_tables_equal_the_format_card():
    with open(SHARED_CODES) as f:
        assert json.load(f) == json.load(open(os.path.join(os.path.dirname(codes.__file__), "codes.json")))


def test_tables():
    assert codes.NF4[0] == -1.0 and codes.NF4[7] == 0.0 and codes.NF4[15] == 1.0
    assert list(codes.NF4) == sorted(codes.NF4)
    assert [v * 12 for v in codes.FP4[:8]] == pytest.approx([0, 0.0625, 8, 12, 4, 6, 2, 3])
    assert codes.FP4[8:] == tuple(-v for v in codes.FP4[:8])
    assert len(codes.DYNAMIC_SIGNED_256) == 256 and codes.DYNAMIC_SIGNED_256[-1] == 1.0
    assert list(codes.DYNAMIC_SIGNED_256) == sorted(codes.DYNAMIC_SIGNED_256)
    assert codes.sorted_order("fp4") == (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_code_encodes_to_itself(quant_type):
    table = codes.table(quant_type)
    got, absmax = quantize_block_of(list(table), quant_type=quant_type)
    expected = list(range(16))
    if quant_type == "fp4":
        expected[8] = 0  # -0.0 is not < 0: it stores as +0
    assert got == expected
    assert absmax.tolist() == [1.0]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_midpoint_ties_take_the_lower_value(quant_type):
    table = codes.table(quant_type)
    order = codes.sorted_order(quant_type)
    thresholds = codes.thresholds(quant_type).tolist()
    for pos, t in enumerate(thresholds):
        lower, upper = order[pos], order[pos + 1]
        got, _ = quantize_block_of([t, f32_next(t, up=True), f32_next(t, up=False)], quant_type=quant_type)
        assert got == [lower, upper, lower], (pos, t)
        assert table[lower] <= table[upper]
    # the NF4 midpoint between codes 14 and 15, worked by hand
    if quant_type == "nf4":
        assert thresholds[14] == struct.unpack("<f", struct.pack("<I", 0x3F5C89DA))[0]


def test_nibble_order_and_odd_padding():
    # codes 15, 0, 7 -> bytes 0xF0, 0x77 (odd n: the unused low nibble holds the code of 0.0)
    packed, absmax = reference.quantize_4bit(torch.tensor([2.0, -2.0, 0.0]), 64, "nf4")
    assert packed.shape == (2, 1) and packed.dtype == torch.uint8
    assert packed.flatten().tolist() == [0xF0, 0x77]
    assert absmax.tolist() == [2.0]
    packed, _ = reference.quantize_4bit(torch.tensor([3.0]), 64, "fp4")
    assert packed.flatten().tolist() == [0x30]  # +1.0 is FP4 code 3, padding 0.0 is code 0


def test_partial_last_block_has_its_own_absmax():
    A = torch.cat([torch.full((64,), 0.5), torch.tensor([-4.0, 1.0])])
    packed, absmax = reference.quantize_4bit(A, 64, "nf4")
    assert absmax.tolist() == [0.5, 4.0]
    q = reference.unpack_4bit(packed, 66)
    assert q[:64].tolist() == [15] * 64
    # -4/4 = -1 -> code 0; 1/4 = 0.25 lies between 0.2035 and 0.2920 -> code 10
    assert q[64:].tolist() == [0, 10]
    out = reference.dequantize_4bit(packed, absmax, 64, "nf4", 66, torch.float32)
    assert out[64:].tolist() == [-4.0, codes.NF4[10] * 4.0]


def test_all_zero_block_dequantizes_to_zeros():
    A = torch.cat([torch.zeros(64), torch.tensor([1.0, -0.5])])
    packed, absmax = reference.quantize_4bit(A, 64, "nf4")
    assert absmax[0].item() == 0.0
    assert reference.unpack_4bit(packed, 64).tolist() == [7] * 64
    out = reference.dequantize_4bit(packed, absmax, 64, "nf4", 66, torch.bfloat16)
    assert torch.equal(out[:64], torch.zeros(64, dtype=torch.bfloat16))


def test_nan_block_gets_nan_absmax():
    A = torch.ones(130)
    A[70] = float("nan")
    _, absmax = reference.quantize_4bit(A, 64, "nf4")
    assert absmax[0] == 1.0 and absmax[1].isnan() and absmax[2] == 1.0


def test_dequantize_by_hand():
    # byte 0x0F: element 0 -> code 0 (-1.0), element 1 -> code 15 (1.0); absmax 3 and 0.5
    packed = torch.tensor([[0x0F], [0x78]], dtype=torch.uint8)
    out = reference.dequantize_4bit(packed, torch.tensor([3.0, 0.5]), 32, "nf4", 3, torch.float32)
    # elements 0..2 are all in block 0 (blocksize 32)
    assert out.tolist() == [-3.0, 3.0, 0.0]
    out = reference.dequantize_4bit(packed, torch.tensor([3.0]), 32, "fp4", 4, torch.float32)
    assert out.tolist() == [0.0, -3.0 * 0.25, 3.0 * 0.25, 0.0]


def test_double_quant_decode_by_hand():
    code8 = codes.dynamic_map()
    q = torch.tensor([255, 0, 127, 200], dtype=torch.uint8)
    nested_absmax = torch.tensor([2.0, 0.25])  # blocks of 2 codes in this hand example
    offset = torch.tensor(0.125)
    got = reference.dequantize_8bit(q, nested_absmax, code8, offset, 2)
    c = code8.tolist()
    f = lambda v: struct.unpack("<f", struct.pack("<f", v))[0]  # noqa: E731
    expected = [f(f(c[255] * 2.0) + 0.125), f(f(c[0] * 2.0) + 0.125),
                f(f(c[127] * 0.25) + 0.125), f(f(c[200] * 0.25) + 0.125)]
    assert got.tolist() == expected
    assert got[0].item() == 2.125


def test_quantize_8bit_is_nearest_code(rng):
    A = torch.randn(1000, generator=rng) * 0.01 + 0.3
    offset = A.mean()
    code8 = codes.dynamic_map()
    q, absmax = reference.quantize_8bit(A, offset, code8, 256)
    x = A - offset
    scaled = x.view(-1)[:768].view(3, 256) * (1.0 / absmax[:3, None])
    dist = (scaled.reshape(-1, 1) - code8[None, :]).abs()
    nearest = dist.argmin(dim=1)
    assert torch.equal(q[:768].long(), nearest)
    assert torch.equal(absmax, torch.stack([x[i * 256 : (i + 1) * 256].abs().max() for i in range(4)]))
