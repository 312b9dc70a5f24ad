"""The public quantize / dequantize API: shapes, dtypes, QuantState, bad input, opcheck,
torch.compile. Runs on CPU (the reference) and, marked gpu, on CUDA (the active backend)."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import codes, ops, reference
from qlora_kernels._schemas import SCHEMAS

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randn(shape, dtype, device, rng, scale=1.0):
    return (torch.randn(shape, generator=rng) * scale).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_roundtrip_shapes_and_error(device, dtype, double_quant, rng):
    W = randn((257, 130), dtype, device, rng, scale=0.02)
    packed, state = qk.quantize_4bit(W, double_quant=double_quant)
    assert packed.shape == ((W.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
    assert state.shape == W.shape and state.dtype == dtype and state.blocksize == 64
    assert state.nested == double_quant
    assert state.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    out = qk.dequantize_4bit(packed, state)
    assert out.shape == W.shape and out.dtype == dtype and out.device == W.device
    # NF4 error: at most half the widest gap between codes (0.304 / 2) times the block's true
    # absmax, plus what double quant moved the absmax by, plus the output's rounding.
    blocks = torch.nn.functional.pad(W.float().reshape(-1), (0, (-W.numel()) % 64)).view(-1, 64)
    true_absmax = blocks.abs().amax(1)
    used_absmax = qk.dequantize_absmax(state)
    per_element = lambda t: t.repeat_interleave(64)[: W.numel()].view(W.shape)  # noqa: E731
    bound = per_element(0.1521 * true_absmax + (true_absmax - used_absmax).abs())
    bound = bound + out.float().abs() * 2.0**-8 + 1e-7
    err = (out.float() - W.float()).abs()
    assert (err <= bound).all()
    rel = err.pow(2).mean().sqrt() / W.float().pow(2).mean().sqrt()
    assert 0.02 < rel < 0.15  # a real quantization error, neither zero nor garbage
    assert qk.dequantize_4bit(packed, state, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_bits_per_weight(device, rng):
    W = randn((4096, 512), torch.bfloat16, device, rng)
    _, state = qk.quantize_4bit(W)
    assert qk.bits_per_weight(state) == pytest.approx(4.127, abs=1e-3)
    _, state = qk.quantize_4bit(W, double_quant=False)
    assert qk.bits_per_weight(state) == pytest.approx(4.5)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip(device, rng):
    W = randn((96, 80), torch.bfloat16, device, rng)
    packed, state = qk.quantize_4bit(W, "fp4", 128)
    d = state.as_dict(packed=True)
    assert set(d) == {"absmax", "quant_map", "nested_absmax", "nested_quant_map",
                      "quant_state.bitsandbytes__fp4"}
    blob = bytes(d["quant_state.bitsandbytes__fp4"].tolist()).decode()
    assert blob == ('{"quant_type": "fp4", "blocksize": 128, "dtype": "bfloat16", "shape": [96, 80], '
                    f'"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": {state.offset.item()}}}')
    prefixed = {f"layer.weight.{k}": v for k, v in d.items()}
    state2 = qk.QuantState.from_dict(prefixed, device=device)
    assert torch.equal(qk.dequantize_4bit(packed, state2), qk.dequantize_4bit(packed, state))
    assert state2.offset.item() == state.offset.item()
    unpacked = qk.QuantState.from_dict(state.as_dict(packed=False), device=device)
    assert torch.equal(qk.dequantize_4bit(packed, unpacked), qk.dequantize_4bit(packed, state))


def test_from_dict_errors():
    with pytest.raises(ValueError, match="neither|expected a packed"):
        qk.QuantState.from_dict({"absmax": torch.zeros(1)})
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        qk.QuantState.from_dict({"absmax": torch.zeros(1),
                                 "quant_state.bitsandbytes__nf4": torch.tensor([255, 0], dtype=torch.uint8)})


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    for dq in (True, False):
        packed, state = qk.quantize_4bit(torch.empty(0, 64, device=device), double_quant=dq)
        assert packed.shape == (0, 1)
        out = qk.dequantize_4bit(packed, state)
        assert out.shape == (0, 64) and out.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input_is_read_right(device, rng):
    W = randn((130, 96), torch.bfloat16, device, rng)
    p1, s1 = qk.quantize_4bit(W.t())
    p2, s2 = qk.quantize_4bit(W.t().contiguous())
    assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax)
    p3, s3 = qk.quantize_4bit(W[:, ::2])
    p4, s4 = qk.quantize_4bit(W[:, ::2].contiguous())
    assert torch.equal(p3, p4) and torch.equal(s3.absmax, s4.absmax)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_names_the_argument(device):
    W = torch.randn(64, 64, device=device)
    with pytest.raises(ValueError, match=r"W: expected dtype float32 or float16 or bfloat16, got int8"):
        qk.quantize_4bit(W.to(torch.int8))
    with pytest.raises(TypeError, match="W: expected a torch.Tensor"):
        qk.quantize_4bit([1.0, 2.0])
    with pytest.raises(ValueError, match=r"blocksize: expected one of .*got 48"):
        qk.quantize_4bit(W, blocksize=48)
    with pytest.raises(ValueError, match=r"quant_type: expected one of .*got 'int4'"):
        qk.quantize_4bit(W, quant_type="int4")
    packed, state = qk.quantize_4bit(W)
    with pytest.raises(ValueError, match=r"packed: expected dtype uint8, got float16"):
        qk.dequantize_4bit(packed.to(torch.float16), state)
    with pytest.raises(ValueError, match=r"packed: has 2047 bytes, but state.shape \(64, 64\)"):
        qk.dequantize_4bit(packed[:-1], state)
    with pytest.raises(ValueError, match=r"state.absmax: has 63 entries"):
        bad = qk.QuantState.from_dict(state.as_dict(packed=True), device=device)
        bad.absmax = bad.absmax[:-1]
        qk.dequantize_4bit(packed, bad)
    with pytest.raises(TypeError, match="state: expected a qlora_kernels.QuantState"):
        qk.dequantize_4bit(packed, {"absmax": state.absmax})
    with pytest.raises(ValueError, match="dtype: expected float32, float16 or bfloat16"):
        qk.dequantize_4bit(packed, state, dtype=torch.int32)


@pytest.mark.gpu
def test_mixed_devices_are_rejected():
    W = torch.randn(64, 64, device="cuda")
    packed, state = qk.quantize_4bit(W, double_quant=False)
    with pytest.raises(ValueError, match="one device"):
        qk.dequantize_4bit(packed.cpu(), state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_rejected_with_its_position(device, bad):
    W = torch.randn(40, 50, device=device).to(torch.bfloat16)
    W[17, 33] = bad
    with pytest.raises(ValueError, match=re.escape(f"W: contains {bad} at index (17, 33)")):
        qk.quantize_4bit(W)
    packed, state = qk.quantize_4bit(W, check_finite=False)  # skipping the check: no crash
    assert packed.shape == (1000, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_weights_double_quantize_exactly(device):
    # every absmax equal: absmax - offset is all zero, the nested block is all zero
    W = torch.full((64, 64), 0.5, device=device)
    packed, state = qk.quantize_4bit(W)
    assert torch.equal(qk.dequantize_absmax(state), torch.full((64,), 0.5, device=device))
    assert torch.equal(qk.dequantize_4bit(packed, state), W)


def test_schemas_match_the_extension_source():
    src = open(os.path.join(ROOT, "csrc", "ops.cpp")).read()
    defs = re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", src)
    cpp = {}
    for d in defs:
        text = "".join(re.findall(r"\"([^\"]*)\"", d))
        cpp[text.split("(")[0]] = text
    assert cpp == SCHEMAS
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.qlora_kernels, name).default._schema) == "qlora_kernels::" + schema


def _opcheck_samples(device):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(1000, generator=g).to(device)
    code8 = codes.dynamic_map(str(device))
    packed, absmax = ops.quantize_4bit(A, 64, "nf4")
    offset = absmax.mean()
    q, nabs = ops.quantize_8bit(absmax, offset, code8, 256)
    return [
        (ops.quantize_4bit, (A.to(torch.bfloat16), 64, "nf4")),
        (ops.quantize_4bit, (A, 32, "fp4")),
        (ops.dequantize_4bit, (packed, absmax, 64, "nf4", 1000, torch.bfloat16)),
        (ops.dequantize_4bit, (packed, q, 64, "nf4", 1000, torch.float16, nabs, code8, offset, 256)),
        (ops.quantize_8bit, (absmax, offset, code8, 256)),
        (ops.dequantize_8bit, (q, nabs, code8, offset, 256)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device, rng):
    def roundtrip(W):
        packed, state = qk.quantize_4bit(W)
        return qk.dequantize_4bit(packed, state)

    W = randn((130, 64), torch.bfloat16, device, rng)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    assert torch.equal(compiled(W), roundtrip(W))


def _run(code, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=ROOT)


def test_backend_switch():
    r = _run("import qlora_kernels as q; print(q.backend())", QLORA_KERNELS_BACKEND="torch")
    assert r.returncode == 0 and r.stdout.strip() == "torch", r.stderr
    r = _run("import qlora_kernels", QLORA_KERNELS_BACKEND="bogus")
    assert r.returncode != 0 and "QLORA_KERNELS_BACKEND: expected one of" in r.stderr
    r = _run("import qlora_kernels as q; print(q.backend())", QLORA_KERNELS_BACKEND="triton")
    assert r.returncode == 0 and r.stdout.strip() == "triton", r.stderr
    has_ext = _run("import qlora_kernels._C").returncode == 0
    r = _run("import qlora_kernels as q; print(q.backend())", QLORA_KERNELS_BACKEND="cuda")
    if has_ext:
        assert r.returncode == 0 and r.stdout.strip() == "cuda", r.stderr
    else:
        assert r.returncode != 0 and "QLORA_KERNELS_BACKEND=cuda, but that backend cannot load" in r.stderr
