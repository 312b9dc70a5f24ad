"""matmul_4bit: the Triton kernel (interpreter on CPU, compiled on GPU), the CUDA op, the public
API and nn.Linear4bit.

Every fused result is compared with ``x.float() @ W.T`` where W is the reference's float32
dequantization of the same 4-bit weight: that isolates the kernel's error (16-bit rounding of
W for the tensor cores, float32 summation order, the one rounding of the output) from the
quantization error. Relative error = ||got - want|| / ||want||.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels import reference as R
from qlora_kernels.matmul import _nested_args, fused_max_m, matmul_4bit_group, uses_fused_kernel
from qlora_kernels.nn import Linear4bit

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
LAYER_KEYS = {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
              "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"}


# ------------------------------------------------------------------------------------------
# helpers
def quantized_weight(N, K, quant_type, blocksize, nested, g, device="cpu"):
    """A fresh random W [N, K] (LLaMA-like scale, a few outliers) quantized on ``device``."""
    W = torch.randn(N, K, generator=g) * 0.02
    W.view(-1)[torch.randint(0, N * K, (max(1, N * K // 500),), generator=g)] *= 8
    return qk.quantize_4bit(W.to(device), quant_type=quant_type, blocksize=blocksize, double_quant=nested)


def reference_weight(packed, state) -> torch.Tensor:
    """W [N, K] in float32, dequantized by the plain-torch reference on the CPU."""
    nested = [t.cpu() if isinstance(t, torch.Tensor) else t for t in _nested_args(state)]
    N, K = state.shape
    return R.dequantize_4bit(packed.cpu(), state.absmax.cpu(), state.blocksize, state.quant_type, N * K,
                             torch.float32, *nested).view(N, K)


def expected(x, packed, state, bias=None) -> torch.Tensor:
    want = x.detach().cpu().float() @ reference_weight(packed, state).T
    if bias is not None:
        want = want + bias.detach().cpu().float()
    return want


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach().float().cpu()
    return float((got.detach().cpu().float() - want).norm() / want.norm())


def random_x(shape, dtype, g, device="cpu"):
    return torch.randn(shape, generator=g).to(dtype).to(device)


def triton_matmul(x, packed, state, bias=None):
    from qlora_kernels.triton import matmul as TM

    return TM.matmul_4bit(x, packed, state.absmax, state.blocksize, state.quant_type, state.shape[0],
                          *_nested_args(state), bias)


# ------------------------------------------------------------------------------------------
# (a) the Triton kernel in the interpreter (CPU)
interpreter_only = pytest.mark.skipif(
    HAS_CUDA or not INTERPRET,
    reason="interpreter run: needs no GPU and TRITON_INTERPRET=1 (tests/conftest.py sets it)")

# (M, K, N, quant_type, blocksize, nested, dtype, bias): the M=1 dot-product form and the
# tl.dot form, with and without split-K (K >= 1024 splits), blocks straddling rows (K=160
# and 4096, K=4160 and 128), more than one token tile (M=65), every dtype and format.
INTERPRETER_CASES = [
    (1, 64, 257, "nf4", 64, True, torch.bfloat16, True),
    (1, 4160, 257, "nf4", 128, True, torch.float16, False),
    (1, 160, 257, "fp4", 4096, False, torch.bfloat16, True),
    (3, 160, 257, "fp4", 4096, True, torch.bfloat16, True),
    (7, 4160, 257, "nf4", 64, False, torch.bfloat16, True),
    (16, 256, 257, "fp4", 32, False, torch.float16, True),
    (33, 160, 257, "nf4", 4096, False, torch.float16, False),
    (2, 1024, 33, "fp4", 256, True, torch.float16, True),
    (65, 96, 40, "nf4", 64, True, torch.bfloat16, True),
]


@interpreter_only
@pytest.mark.parametrize("M,K,N,quant_type,blocksize,nested,dtype,with_bias", INTERPRETER_CASES)
def test_triton_kernel_interpreter(M, K, N, quant_type, blocksize, nested, dtype, with_bias, rng):
    packed, state = quantized_weight(N, K, quant_type, blocksize, nested, rng)
    x = random_x((M, K), dtype, rng)
    bias = random_x((N,), dtype, rng) if with_bias else None
    out = triton_matmul(x, packed, state, bias)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, expected(x, packed, state, bias)) < TOL[dtype]


@interpreter_only
def test_triton_split_k_is_deterministic(rng):
    """Two-pass split-K sums the partials in a fixed order: the same bits every call."""
    from qlora_kernels.triton import matmul as TM

    M, K, N = 1, 2048, 48
    assert TM._config(M, N, K, torch.device("cpu")).split > 1
    packed, state = quantized_weight(N, K, "nf4", 64, True, rng)
    x = random_x((M, K), torch.bfloat16, rng)
    assert torch.equal(triton_matmul(x, packed, state), triton_matmul(x, packed, state))


@pytest.mark.parametrize("N,K", [(4096, 4096), (4096, 11008), (11008, 4096), (28672, 8192), (257, 4160)])
@pytest.mark.parametrize("M", [1, 2, 4, 16, 64])
def test_triton_config_fills_the_gpu(M, N, K):
    """The heuristic gives >= 2 programs per SM on an H100 (132 SMs) for decode shapes, each
    split covers whole 32-column groups, and the splits cover K exactly."""
    from qlora_kernels.triton import matmul as TM

    cfg = TM._config(M, N, K, torch.device("cpu"))
    programs = -(-N // cfg.block_n) * -(-M // cfg.block_m) * cfg.split
    if N >= 4096:
        assert programs >= 2 * 132
    assert cfg.k_per_split % (32 * cfg.groups) == 0
    assert (cfg.split - 1) * cfg.k_per_split < K <= cfg.split * cfg.k_per_split
    assert cfg.use_dot == (M > 1)


def test_triton_kernel_rejects_bad_input(rng):
    packed, state = quantized_weight(8, 96, "nf4", 64, True, rng)
    with pytest.raises(ValueError, match="K"):
        triton_matmul(random_x((2, 48), torch.bfloat16, rng), packed[:48 * 8 // 2], _shaped(state, 8, 48))
    with pytest.raises(ValueError, match="x: expected dtype"):
        triton_matmul(random_x((2, 96), torch.float32, rng), packed, state)
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        triton_matmul(random_x((2, 1, 96), torch.bfloat16, rng), packed, state)
    with pytest.raises(ValueError, match="packed: expected dtype uint8"):
        triton_matmul(random_x((2, 96), torch.bfloat16, rng), packed.view(torch.int8), state)


def offset_copy(packed, offset):
    """packed's bytes in a buffer that starts ``offset`` bytes past an allocation."""
    flat = packed.reshape(-1)
    buf = torch.empty(flat.numel() + offset, dtype=torch.uint8, device=flat.device)
    out = buf[offset:]
    out.copy_(flat)
    return out


@pytest.mark.skipif(not HAS_CUDA and not INTERPRET, reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("offset", [1, 3, 4, 8])
def test_triton_kernel_packed_off_its_alignment(offset, rng):
    # packed bytes that start anywhere: the M > 1 kernel's 16-byte word loads copy them to an
    # aligned buffer first (the int32 view needs it too); the M = 1 kernel reads bytes
    device = "cuda" if HAS_CUDA else "cpu"
    packed, state = quantized_weight(33, 160, "nf4", 64, True, rng, device)
    for M in (1, 5):
        x = random_x((M, 160), torch.bfloat16, rng, device)
        out = triton_matmul(x, offset_copy(packed, offset), state)
        assert rel_err(out, expected(x, packed, state)) < TOL[torch.bfloat16], (offset, M)


@pytest.mark.gpu
def test_triton_tables_under_graph_capture_say_what_to_do(rng, monkeypatch):
    # the first call of a (format, dtype, device) copies the code tables to the GPU, which a
    # CUDA-graph capture cannot take: it says so and how to avoid it (one call before capture)
    from qlora_kernels.triton import matmul as TM

    monkeypatch.setattr(TM, "_TABLES", {})
    packed, state = quantized_weight(64, 64, "nf4", 64, True, rng, "cuda")
    x = random_x((4, 64), torch.float16, rng, "cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="call it once before capturing"):
        with torch.cuda.graph(graph):
            triton_matmul(x, packed, state)
    triton_matmul(x, packed, state)  # the warm-up call
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_matmul(x, packed, state)
    graph.replay()
    assert rel_err(out, expected(x, packed, state)) < TOL[torch.float16]


def _shaped(state, N, K):
    """A state claiming shape [N, K] (only the shape matters before the K check raises)."""
    return qk.QuantState(state.absmax, (N, K), state.code, state.blocksize, state.quant_type, state.dtype,
                         offset=state.offset, state2=state.state2)


@interpreter_only
def test_triton_kernel_empty(rng):
    packed, state = quantized_weight(8, 64, "nf4", 64, False, rng)
    out = triton_matmul(random_x((0, 64), torch.float16, rng), packed, state)
    assert out.shape == (0, 8)


# ------------------------------------------------------------------------------------------
# (b) the public API on CPU (the reference op, or the dequantize path)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_public_leading_dims_and_bias(dtype, rng):
    packed, state = quantized_weight(40, 96, "nf4", 64, True, rng)
    x = random_x((2, 3, 96), dtype, rng)
    bias = random_x((40,), dtype, rng)
    out = qk.matmul_4bit(x, packed, state, bias)
    assert out.shape == (2, 3, 40) and out.dtype == dtype
    want = expected(x.reshape(-1, 96), packed, state, bias).view(2, 3, 40)
    assert rel_err(out, want) < TOL[dtype]


def test_public_k_not_multiple_of_32(rng):
    """K = 257 cannot take the fused kernel; the dequantize path serves it."""
    packed, state = quantized_weight(33, 257, "fp4", 128, True, rng)
    x = random_x((5, 257), torch.bfloat16, rng)
    assert not uses_fused_kernel(x, state)
    bias = random_x((33,), torch.bfloat16, rng)
    assert rel_err(qk.matmul_4bit(x, packed, state, bias), expected(x, packed, state, bias)) < 1e-2


def test_uses_fused_kernel(rng):
    _, state = quantized_weight(8, 64, "nf4", 64, True, rng)
    assert uses_fused_kernel(random_x((1, 64), torch.bfloat16, rng), state)
    assert uses_fused_kernel(random_x((fused_max_m(), 64), torch.float16, rng), state)
    assert not uses_fused_kernel(random_x((fused_max_m() + 1, 64), torch.bfloat16, rng), state)
    assert not uses_fused_kernel(random_x((1, 64), torch.float32, rng), state)


def test_fused_path_on_gpus_without_16bit_mma_and_old_triton(monkeypatch, rng):
    # The GPU side of uses_fused_kernel, on a stand-in for a CUDA x: the CUDA kernels and
    # Triton's M > 1 kernel need 16-bit MMAs, Triton's M > 1 kernel also tl.gather; Triton's
    # M = 1 kernel needs neither
    from types import SimpleNamespace

    from qlora_kernels import matmul as MM
    from qlora_kernels import ops

    _, state = quantized_weight(8, 64, "nf4", 64, True, rng)

    def cuda_x(M):
        return SimpleNamespace(numel=lambda: M * 64, is_cuda=True, device=SimpleNamespace(index=0),
                               dtype=torch.bfloat16)

    monkeypatch.delenv("QLORA_KERNELS_FUSED_MAX_M", raising=False)
    for backend, mma, gather, fused in (("cuda", True, True, {1: True, 4: True}),
                                        ("cuda", False, True, {1: False, 4: False}),
                                        ("triton", False, True, {1: True, 4: False}),
                                        ("triton", True, False, {1: True, 4: False}),
                                        ("triton", True, True, {1: True, 4: True}),
                                        ("torch", False, False, {1: True, 4: True})):
        monkeypatch.setattr(ops, "BACKEND", backend)
        monkeypatch.setattr(MM, "_has_16bit_mma", lambda index, mma=mma: mma)
        monkeypatch.setattr(MM, "_triton_dot_kernel", lambda gather=gather: gather)
        for M, want in fused.items():
            assert uses_fused_kernel(cuda_x(M), state) == want, (backend, mma, gather, M)


def test_fused_max_m_per_backend(monkeypatch):
    """64 rows with the CUDA extension and with Triton alone (its tl.dot kernel beats dequantize
    + cuBLAS up to there); the environment variable wins over both."""
    from qlora_kernels import ops

    monkeypatch.delenv("QLORA_KERNELS_FUSED_MAX_M", raising=False)
    for backend in ("cuda", "triton"):
        monkeypatch.setattr(ops, "BACKEND", backend)
        assert fused_max_m() == 64
    monkeypatch.setenv("QLORA_KERNELS_FUSED_MAX_M", "16")
    assert fused_max_m() == 16
    monkeypatch.setenv("QLORA_KERNELS_FUSED_MAX_M", "many")
    with pytest.raises(ValueError, match="QLORA_KERNELS_FUSED_MAX_M: expected an integer"):
        fused_max_m()


def test_public_errors_name_the_argument(rng):
    packed, state = quantized_weight(16, 64, "nf4", 64, True, rng)
    x = random_x((3, 64), torch.bfloat16, rng)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 64\]"):
        qk.matmul_4bit(random_x((3, 32), torch.bfloat16, rng), packed, state)
    with pytest.raises(ValueError, match="x: expected dtype"):
        qk.matmul_4bit(torch.randint(0, 5, (3, 64), generator=rng), packed, state)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        qk.matmul_4bit([[1.0] * 64], packed, state)
    with pytest.raises(ValueError, match="x: expected a tensor on cpu"):
        qk.matmul_4bit(torch.empty(3, 64, dtype=torch.bfloat16, device="meta"), packed, state)
    with pytest.raises(ValueError, match=r"bias: expected shape \[16\]"):
        qk.matmul_4bit(x, packed, state, random_x((15,), torch.bfloat16, rng))
    with pytest.raises(ValueError, match="bias: expected dtype"):
        qk.matmul_4bit(x, packed, state, torch.ones(16, dtype=torch.int32))
    with pytest.raises(ValueError, match="packed"):
        qk.matmul_4bit(x, packed[:-1], state)


def test_public_empty_x(rng):
    packed, state = quantized_weight(16, 64, "nf4", 64, True, rng)
    bias = random_x((16,), torch.bfloat16, rng)
    assert qk.matmul_4bit(torch.empty(0, 64, dtype=torch.bfloat16), packed, state, bias).shape == (0, 16)
    assert qk.matmul_4bit(torch.empty(2, 0, 64, dtype=torch.float16), packed, state).shape == (2, 0, 16)


# ------------------------------------------------------------------------------------------
# (c) nn.Linear4bit
def test_linear4bit_from_linear_matches_reference(rng):
    linear = nn.Linear(96, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 96, generator=rng) * 0.05)
        linear.bias.copy_(torch.randn(48, generator=rng))
    layer = Linear4bit.from_linear(linear, quant_type="nf4", blocksize=64, double_quant=True)
    x = random_x((4, 7, 96), torch.bfloat16, rng)
    with torch.no_grad():
        out = layer(x)
    want = x.float() @ reference_weight(layer.weight, layer.quant_state).T + linear.bias.float()
    assert out.shape == (4, 7, 48) and out.dtype == torch.bfloat16
    assert rel_err(out, want) < 1e-2
    # and the 4-bit weight is close to the original (a quantization sanity check, loose)
    assert rel_err(layer.dequantize(torch.float32), linear.weight.float()) < 0.15


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_linear4bit_state_dict_keys_and_roundtrip(quant_type, double_quant, rng):
    linear = nn.Linear(64, 40).to(torch.float16)
    layer = Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=32, double_quant=double_quant)
    sd = layer.state_dict()
    keys = {k.replace("__nf4", f"__{quant_type}") for k in LAYER_KEYS}
    if not double_quant:
        keys -= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(sd) == keys
    # bias is a parameter: load_state_dict copies into its dtype, so build the layer in fp16
    fresh = Linear4bit(64, 40, bias=True, double_quant=double_quant, weight_dtype=torch.float16)
    fresh.load_state_dict(sd)
    assert fresh.quant_type == quant_type and fresh.blocksize == 32 and fresh.weight_dtype == torch.float16
    assert torch.equal(fresh.dequantize(), layer.dequantize())
    x = random_x((3, 64), torch.float16, rng)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


def _bnb_dequantize(packed, bstate):
    """bitsandbytes' dequantization through its portable path (its AVX-512 CPU kernel in
    0.50.2 is wrong for 2-D tensors of even width; see test_bnb_compat.py)."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = bstate.absmax
    if bstate.nested:
        absmax = F.dequantize_blockwise(bstate.absmax, bstate.state2) + bstate.offset
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, bstate.code, bstate.blocksize,
                                    tuple(bstate.shape), bstate.dtype)


def test_linear4bit_loads_bitsandbytes_and_back(rng):
    bnb = pytest.importorskip("bitsandbytes")
    W = (torch.randn(40, 96, generator=rng) * 0.05).to(torch.bfloat16)
    blayer = bnb.nn.Linear4bit(96, 40, bias=True, compute_dtype=torch.bfloat16, compress_statistics=True,
                               quant_type="nf4")
    blayer.weight = bnb.nn.Params4bit(W, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                      blocksize=64)
    blayer = blayer.to("cpu")  # quantizes
    with torch.no_grad():
        blayer.bias.copy_(torch.randn(40, generator=rng))
    bsd = blayer.state_dict()
    ours = Linear4bit(96, 40, bias=True)
    ours.load_state_dict(bsd)
    bnb_W = _bnb_dequantize(blayer.weight.data, blayer.weight.quant_state)
    assert torch.equal(ours.dequantize(), bnb_W)
    assert torch.equal(ours.bias, bsd["bias"].to(ours.bias.dtype))

    # ours -> bitsandbytes, the way bitsandbytes (and transformers) load a 4-bit checkpoint
    mine = Linear4bit.from_linear(nn.Linear(96, 40).to(torch.bfloat16), blocksize=128)
    sd = mine.state_dict()
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats, requires_grad=False,
                                                device="cpu")
    assert torch.equal(_bnb_dequantize(param.data, param.quant_state), mine.dequantize())


def test_linear4bit_to_moves_every_buffer():
    layer = Linear4bit.from_linear(nn.Linear(64, 32).to(torch.bfloat16))
    moved = layer.to("meta")
    tensors = dict(moved.named_buffers()) | dict(moved.named_parameters())
    assert {"weight", "absmax", "nested_absmax", "nested_quant_map", "nested_offset", "quant_map", "bias"} <= set(tensors)
    assert all(t.device.type == "meta" for t in tensors.values())
    assert moved.quant_state.device.type == "meta" and moved.quant_state.state2.absmax.device.type == "meta"


# ------------------------------------------------------------------------------------------
# (d) opcheck and torch.compile
def _op_args(device, rng, nested=True, with_bias=True):
    packed, state = quantized_weight(48, 64, "nf4", 64, nested, rng, device=device)
    x = random_x((3, 64), torch.bfloat16, rng, device)
    bias = random_x((48,), torch.bfloat16, rng, device) if with_bias else None
    return (x, packed, state.absmax, state.blocksize, state.quant_type, 48, *_nested_args(state), bias)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("nested", [True, False])
def test_opcheck(device, nested, rng):
    args = _op_args(device, rng, nested=nested, with_bias=nested)
    torch.library.opcheck(torch.ops.qlora_kernels.matmul_4bit.default, args)


def _small_model(device, g):
    layers = []
    for k, n in ((64, 96), (96, 160), (160, 32)):
        linear = nn.Linear(k, n, bias=n != 160).to(torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        layers += [Linear4bit.from_linear(linear.to(device)), nn.SiLU()]
    return nn.Sequential(*layers[:-1]).eval()


def test_compile_fullgraph_cpu(rng):
    """Traces Linear4bit models whole (fake kernel, no graph breaks); aot_eager keeps it fast."""
    torch._dynamo.reset()
    model = _small_model("cpu", rng)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = random_x((2, 3, 64), torch.bfloat16, rng)
    x_view = random_x((6, 65), torch.bfloat16, rng)[:, 1:]   # misaligned, non-contiguous rows
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
        assert torch.equal(compiled(x_view), model(x_view))


@pytest.mark.gpu
def test_compile_fullgraph_inductor_gpu(rng):
    torch._dynamo.reset()
    model = _small_model("cuda", rng)
    compiled = torch.compile(model, fullgraph=True)
    x = random_x((1, 64), torch.bfloat16, rng, "cuda")
    with torch.no_grad():
        assert rel_err(compiled(x), model(x).float()) < 1e-2


# ------------------------------------------------------------------------------------------
# (e) GPU: the CUDA op and the compiled Triton kernel
IMPLS = ["cuda", "triton"]
GPU_M = [1, 2, 3, 7, 16, 33, 64, 65, 300]
FORMATS = [("nf4", 64, True, True), ("fp4", 128, False, False), ("nf4", 32, True, False),
           ("fp4", 4096, True, True), ("nf4", 4096, False, True)]


def _impl(name):
    if name == "cuda" and qk.backend() != "cuda":
        pytest.skip("the CUDA extension is not loaded")
    if name == "cuda":
        def cuda_matmul(x, packed, state, bias=None):
            return torch.ops.qlora_kernels.matmul_4bit(x, packed, state.absmax, state.blocksize,
                                                       state.quant_type, state.shape[0],
                                                       *_nested_args(state), bias)
        return cuda_matmul
    pytest.importorskip("triton")
    return triton_matmul


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,N", [(4160, 257), (4096, 4096)])
@pytest.mark.parametrize("M", GPU_M)
def test_gpu_matmul(impl, M, K, N, dtype, rng):
    fn = _impl(impl)
    quant_type, blocksize, nested, with_bias = FORMATS[(M + K) % len(FORMATS)]
    packed, state = quantized_weight(N, K, quant_type, blocksize, nested, rng, "cuda")
    x = random_x((M, K), dtype, rng, "cuda")
    bias = random_x((N,), dtype, rng, "cuda") if with_bias else None
    out = fn(x, packed, state, bias)
    assert out.shape == (M, N) and out.dtype == dtype and out.is_cuda
    assert rel_err(out, expected(x, packed, state, bias)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("M", [1, 7, 33])
def test_gpu_formats(impl, M, quant_type, nested, blocksize, rng):
    fn = _impl(impl)
    K, N = 4160, 257
    packed, state = quantized_weight(N, K, quant_type, blocksize, nested, rng, "cuda")
    x = random_x((M, K), torch.bfloat16, rng, "cuda")
    bias = random_x((N,), torch.bfloat16, rng, "cuda")
    assert rel_err(fn(x, packed, state, bias), expected(x, packed, state, bias)) < 1e-2


# (R, D, W) compiled per n-tiles of 8 tokens (csrc/matmul_4bit.cu's kCompiled)
_COMPILED = {1: {(1, 2, 1), (1, 4, 1)},
             2: {(2, 2, 1), (2, 4, 1), (4, 2, 1), (1, 2, 8), (2, 2, 4)},
             4: {(2, 2, 1), (1, 2, 8), (2, 2, 4)},
             8: {(1, 2, 1), (1, 4, 1), (2, 2, 1), (1, 2, 8), (2, 2, 4), (1, 2, 4)}}


@pytest.mark.gpu
@pytest.mark.parametrize("tile", ["1,2", "1,4", "2,2", "2,4", "4,2", "9,9", "1,2,8", "2,2,4", "1,2,4", "1,2,8,3",
                                  "1,2,8,1000", "1,2,8,1", "2,2,1,0", "1,2,1,3"])
@pytest.mark.parametrize("M", [1, 9, 16, 17, 33, 64])
def test_gpu_every_compiled_tile(tile, M, monkeypatch, rng):
    """The CUDA kernel's tile shapes (QLORA_KERNELS_MM_TILE="R,D[,W,S]": row tiles per warp,
    loads in flight, row groups per CTA, K splits over the grid (0: enough to fill the GPU;
    1000: capped at 64, then at the 33 steps K has)): the default picks some only on large
    layers, so each is forced here on an awkward one (N = 257: a partial row tile and row group;
    K = 4160: a partial last step, in the last K split). A key compiled for this many tokens
    must launch that kernel (its template arguments in the profiler's kernel name); one not
    compiled ("9,9" always) falls back to the measured choice and must still be right."""
    _impl("cuda")
    monkeypatch.setenv("QLORA_KERNELS_MM_TILE", tile)
    K, N = 4160, 257
    packed, state = quantized_weight(N, K, "nf4", 64, True, rng, "cuda")
    x = random_x((M, K), torch.bfloat16, rng, "cuda")
    bias = random_x((N,), torch.bfloat16, rng, "cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = qk.matmul_4bit(x, packed, state, bias)
        torch.cuda.synchronize()
    assert rel_err(out, expected(x, packed, state, bias)) < 1e-2
    assert torch.equal(out, qk.matmul_4bit(x, packed, state, bias))  # deterministic split-K sums
    names = [e.name for e in prof.events()]
    fields = [int(v) for v in tile.split(",")]
    rows, depth, row_warps = (fields + [1])[:3]
    n_tiles = 1 if M <= 8 else 2 if M <= 16 else 4 if M <= 32 else 8
    if (rows, depth, row_warps) in _COMPILED[n_tiles]:
        pattern = rf"matmul_4bit_kernel<[^,]+, {n_tiles}, {rows}, {depth}, (false|0), {row_warps}>"
        assert any(re.search(pattern, n) for n in names), (pattern, names)
        splits = fields[3] if len(fields) > 3 else (1 if len(fields) == 2 else 0)
        if splits > 1:
            assert any("sum_k_splits_kernel" in n for n in names), names
        assert any("permute_x_kernel" in n for n in names) == (n_tiles == 8), names


def _kernel_names(fn) -> tuple[torch.Tensor, list[str]]:
    """fn()'s result, and the names of the CUDA kernels it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, [e.name for e in prof.events()]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,N", [(4160, 257), (11008, 96), (1056, 8200), (1056, "dense")])
@pytest.mark.parametrize("M", [1, 3, 8, 9])
def test_gpu_bulk_copy_kernel_equals_register_kernel(M, K, N, dtype, monkeypatch, rng):
    """sm_90 and up, 1-8 tokens: the weights stream into shared memory by bulk copies
    (matmul_4bit_bulk_kernel). Its warps take the same K steps in the same order as the
    register kernel's run without K splits ("1,2"), so the two agree to the bit: on a partial
    row tile (N = 257), a partial last stage (K = 4160, 11008: 64 and 768 of 1024 elements, and
    K = 1056: 32), and more row tiles (N = 8200: 513) than its persistent grid has CTAs (on an
    H100 at 8 tokens; at 1-4 they fit the 4-CTA build's grid of 528). "dense": 5 row tiles more
    than 3 CTAs per SM hold, which takes the 4-CTA build at 1-4 tokens (on an H100): the same
    bits. QLORA_KERNELS_MM_BULK=0 turns it off; 9 tokens never take it."""
    _impl("cuda")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the bulk-copy kernel needs compute capability 9.0")
    if N == "dense":
        N = 16 * (3 * torch.cuda.get_device_properties(0).multi_processor_count + 5)
    packed, state = quantized_weight(N, K, "nf4", 64, True, rng, "cuda")
    x = random_x((M, K), dtype, rng, "cuda")
    bias = random_x((N,), dtype, rng, "cuda")
    want = expected(x, packed, state, bias)
    run = lambda: qk.matmul_4bit(x, packed, state, bias)  # noqa: E731
    monkeypatch.delenv("QLORA_KERNELS_MM_TILE", raising=False)
    monkeypatch.delenv("QLORA_KERNELS_MM_BULK", raising=False)
    out, names = _kernel_names(run)
    assert any("matmul_4bit_bulk_kernel" in n for n in names) == (M <= 8), names
    assert rel_err(out, want) < TOL[dtype]
    monkeypatch.setenv("QLORA_KERNELS_MM_BULK", "0")
    off, names = _kernel_names(run)
    assert not any("bulk" in n for n in names), names
    assert rel_err(off, want) < TOL[dtype]
    if M <= 8:
        monkeypatch.delenv("QLORA_KERNELS_MM_BULK")
        monkeypatch.setenv("QLORA_KERNELS_MM_TILE", "1,2")
        assert torch.equal(out, run())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,N", [(4160, 257), (1056, 8200), (96, 300)])
@pytest.mark.parametrize("rows", ["", "1,2", "1,4", "2,2", "2,4", "1,4,3", "2,2,1000"])
@pytest.mark.parametrize("M", [1, 5, 9, 16, 17, 33, 64])
def test_gpu_rows_kernel(M, rows, K, N, dtype, monkeypatch, rng):
    """sm_90 and up, 9-64 tokens (1-8 on the largest layers): x and the weights staged in
    shared memory, row warps (matmul_4bit_rows_kernel). Each configuration
    (QLORA_KERNELS_MM_ROWS="R,S[,splits]": row tiles per warp, stages, K splits over the grid;
    "" the measured default, which leaves layers this small to the bulk kernel up to 8 tokens
    and the register kernel up to 32; 1000 splits are capped at one per step) must launch
    that kernel with those template arguments and be right on a partial row tile (N = 257), a
    partial last step (K = 4160), many row tiles (N = 8200), rows shorter than one step (K = 96:
    too short to split) and a token count that leaves part of its token tile empty. Split sums
    are deterministic. QLORA_KERNELS_MM_ROWS=0 turns it off; layers this small never take it by
    default at 8 tokens, and no layer does at 65."""
    _impl("cuda")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the rows kernel needs compute capability 9.0")
    monkeypatch.delenv("QLORA_KERNELS_MM_TILE", raising=False)
    monkeypatch.setenv("QLORA_KERNELS_MM_ROWS", rows)
    packed, state = quantized_weight(N, K, "nf4", 64, True, rng, "cuda")
    x = random_x((M, K), dtype, rng, "cuda")
    bias = random_x((N,), dtype, rng, "cuda")
    want = expected(x, packed, state, bias)
    run = lambda: qk.matmul_4bit(x, packed, state, bias)  # noqa: E731
    out, names = _kernel_names(run)
    assert rel_err(out, want) < TOL[dtype]
    assert torch.equal(out, run())
    n_tiles = 1 if M <= 8 else 2 if M <= 16 else 4 if M <= 32 else 8
    template = rf"matmul_4bit_rows_kernel<[^,]+, {n_tiles}, " + (", ".join(rows.split(",")[:2]) if rows else r"1, 2>")
    # by default layers this small take the bulk kernel up to 8 tokens, the register kernel up to 32
    assert any(re.search(template, n) for n in names) == (bool(rows) or M > 32), (template, names)
    if len(rows.split(",")) == 3 and K > 128:  # more than one step to split
        assert any("sum_k_splits_kernel" in n for n in names), names
        # the sum kernel overlaps the rows kernel's tail (PDL) unless told not to: the same bits
        monkeypatch.setenv("QLORA_KERNELS_MM_SUM_PDL", "0")
        assert torch.equal(run(), out)
        monkeypatch.delenv("QLORA_KERNELS_MM_SUM_PDL")
    monkeypatch.setenv("QLORA_KERNELS_MM_ROWS", "0")
    off, names = _kernel_names(run)
    assert not any("rows_kernel" in n for n in names), names
    assert rel_err(off, want) < TOL[dtype]
    monkeypatch.delenv("QLORA_KERNELS_MM_ROWS")
    for m in (8, 65):  # small layers at 8 tokens, any layer at 65
        _, names = _kernel_names(lambda: qk.matmul_4bit(x[:1].expand(m, K).contiguous(), packed, state))
        assert not any("rows_kernel" in n for n in names), (m, names)


# (weights' N x K, M, the kernels the default runs on sm_90): at 1-8 tokens the rows kernel takes a
# weight of 150 M weights or more (at 5-8 tokens from 8192 x 8192) and the long rows of a down
# projection (K >= 2 N, N > 4096), the bulk kernel the rest, grouped or alone (measured on an
# H100: see rows_config in csrc/matmul_4bit.cu). A group runs each weight in the kernel it takes
# alone: a grouped-query attention's q (8192 x 8192) in the rows kernel at 8 tokens, its k and v in
# one bulk launch.
ROWS_2 = r"rows_kernel<[^,]+, 1, 2, 2>"
KERNEL_CHOICE_CASES = [
    ([(4096, 4096)], 1, {r"bulk_kernel<[^>]+, false, false>"}),
    ([(6656, 6656)] * 3, 1, {r"bulk_kernel<[^>]+, true, false>"}),
    ([(6656, 17920)], 1, {ROWS_2}),
    ([(5120, 13824)], 4, {ROWS_2}),
    ([(4096, 11008)], 8, {"bulk_kernel"}),
    ([(13824, 5120)], 4, {"bulk_kernel"}),
    ([(13824, 5120)], 8, {ROWS_2}),
    ([(8192, 8192), (1024, 8192), (1024, 8192)], 8, {ROWS_2, r"bulk_kernel<[^>]+, true, false>"}),
    # a few more row tiles than 3 CTAs per SM take (512 > 396 on 132 SMs): the 4-CTA build
    ([(8192, 8192)], 1, {r"bulk_kernel<[^>]+, false, true>"}),
    ([(6656, 6656)], 4, {r"bulk_kernel<[^>]+, false, true>"}),
    ([(8192, 8192)], 5, {ROWS_2}),
    # 9-32 tokens: layers of 4096 rows from 4096 x 4096 take the rows kernel with 8 K splits, smaller
    # ones the register kernel
    ([(4096, 4096)], 16, {r"rows_kernel<[^,]+, 2, 1, 2>"}),
    ([(4096, 11008)], 12, {r"rows_kernel<[^,]+, 2, 1, 2>"}),
    ([(4096, 4096)], 32, {r"rows_kernel<[^,]+, 4, 1, 2>"}),
    ([(2048, 4096)], 16, {r"matmul_4bit_kernel<"}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shapes,M,kernels", KERNEL_CHOICE_CASES)
def test_gpu_default_kernel_choice(shapes, M, kernels, monkeypatch, rng):
    """Which sm_90 kernels the default runs at 1-32 tokens, by layer size, row length and group (a
    tuning rule, pinned here so that a change to it is deliberate); a group gives each weight's
    output bit for bit as its own call, and right."""
    _impl("cuda")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the bulk and rows kernels need compute capability 9.0")
    for var in ("QLORA_KERNELS_MM_TILE", "QLORA_KERNELS_MM_ROWS", "QLORA_KERNELS_MM_BULK"):
        monkeypatch.delenv(var, raising=False)
    g = torch.Generator("cuda").manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    weights = [qk.quantize_4bit(torch.randn(N, K, device="cuda", generator=g) * 0.02, "nf4", 64, double_quant=True)
               for N, K in shapes]
    x = random_x((M, shapes[0][1]), torch.bfloat16, rng, "cuda")
    outs, names = _kernel_names(lambda: matmul_4bit_group(x, weights))
    ran = {k for k in ("matmul_4bit_bulk_kernel<", "matmul_4bit_rows_kernel<", "matmul_4bit_kernel<")
           if any(k in n for n in names)}
    for kernel in kernels:
        assert any(re.search(kernel, n) for n in names), (kernel, names)
    assert len(ran) == len(kernels), names
    if M > 8 and "rows_kernel" in next(iter(kernels)):  # with its K splits summed after it
        assert any("sum_k_splits_kernel" in n for n in names), names
    for out, (packed, state) in zip(outs, weights):
        assert torch.equal(out, qk.matmul_4bit(x, packed, state))
        assert rel_err(out, x.float() @ qk.dequantize_4bit(packed, state, dtype=torch.float32).T) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", ["3,2", "1,3", "x", "1"])
def test_gpu_rows_kernel_override_names_the_variable(rows, monkeypatch, rng):
    """A QLORA_KERNELS_MM_ROWS that names no compiled shape is an error that names the variable,
    not a silent fallback to another shape."""
    _impl("cuda")
    monkeypatch.setenv("QLORA_KERNELS_MM_ROWS", rows)
    packed, state = quantized_weight(257, 4160, "nf4", 64, True, rng, "cuda")
    with pytest.raises(RuntimeError, match="QLORA_KERNELS_MM_ROWS"):
        qk.matmul_4bit(random_x((16, 4160), torch.bfloat16, rng, "cuda"), packed, state)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", ["1,4,7", "1,2,7"])
def test_gpu_rows_kernel_repeats_to_the_bit_under_many_short_ctas(rows, monkeypatch, rng):
    """A 70B layer at 32 tokens with K split 7 ways: 1568 short CTAs, 2-3 per SM in turn, each
    refilling its stages quickly. Without the proxy fence between the consumers' reads and the
    next bulk copy into a slot, most calls here had 1-6 outputs off by up to 0.6 (stale pieces of
    x or weights). Every call must give the same bits, and the right values."""
    _impl("cuda")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the rows kernel needs compute capability 9.0")
    monkeypatch.delenv("QLORA_KERNELS_MM_TILE", raising=False)
    monkeypatch.setenv("QLORA_KERNELS_MM_ROWS", rows)
    N, K, M = 28672, 8192, 32
    g = torch.Generator("cuda").manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    packed, state = qk.quantize_4bit(torch.randn(N, K, device="cuda", generator=g) * 0.02, "nf4", 64,
                                     double_quant=True)  # on the GPU: 235M weights
    x = random_x((M, K), torch.bfloat16, rng, "cuda")
    first = qk.matmul_4bit(x, packed, state)
    assert rel_err(first, x.float() @ qk.dequantize_4bit(packed, state, dtype=torch.float32).T) < 1e-2
    for _ in range(8):
        assert torch.equal(qk.matmul_4bit(x, packed, state), first)


# (N, K, M, QLORA_KERNELS_MM_ROWS): each kernel on an H100, by default unless rows says: the
# bulk kernel (4096 x 4096 at 1 and 8 tokens), the rows kernel with K split and the split sum
# after it (at 16 and 64), the register kernel (at 16 with the rows kernel off), the rows kernel
# at one token on a large layer and at 40 tokens with its split sum, and the register kernel at
# 40 tokens with x permuted first.
PDL_CHAIN_CASES = [(4096, 4096, 1, ""), (4096, 4096, 8, ""), (4096, 4096, 16, ""), (4096, 4096, 16, "0"),
                   (4096, 4096, 64, ""), (28672, 8192, 1, ""), (28672, 8192, 40, ""), (4096, 4096, 40, "0")]


@pytest.mark.gpu
@pytest.mark.parametrize("N,K,M,rows", PDL_CHAIN_CASES)
def test_gpu_pdl_calls_read_what_the_call_before_wrote(N, K, M, rows, monkeypatch, rng):
    """With QLORA_KERNELS_PDL=1 (sm_90) a kernel starts while the one before it is finishing
    (programmatic dependent launch), and must not read its x or write its output before
    griddepcontrol.wait. A chain of four distinct 4-bit layers, each call's x the output of the
    call just before, must give the bits of the same chain run with PDL off and the host waiting
    after every call: eagerly, with the allocator's free blocks filled with NaN first (so an
    early read of x or of the K splits' partial tiles finds NaN, not an earlier run's equal
    values), and replayed from a CUDA graph with every intermediate output set to NaN before
    each replay."""
    _impl("cuda")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    monkeypatch.delenv("QLORA_KERNELS_MM_TILE", raising=False)
    monkeypatch.setenv("QLORA_KERNELS_MM_ROWS", rows)
    g = torch.Generator("cuda").manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    # [N, K], [K, N], [N, K], [K, N], scaled to keep the values near 1
    weights = [qk.quantize_4bit(torch.randn(n, k, device="cuda", generator=g) * k ** -0.5, "nf4", 64,
                                double_quant=True) for n, k in ((N, K), (K, N)) * 2]
    x = random_x((M, K), torch.bfloat16, rng, "cuda")

    def chain():
        ys = [x]
        for packed, state in weights:
            ys.append(qk.matmul_4bit(ys[-1], packed, state))
        return ys[1:]

    def poison_free_blocks():
        junk = [torch.full((M, n), float("nan"), device="cuda", dtype=torch.bfloat16) for n in (N, K) * 4]
        junk += [torch.full((s, M, max(N, K)), float("nan"), device="cuda") for s in range(2, 9)]
        del junk

    monkeypatch.setenv("QLORA_KERNELS_PDL", "0")
    want, y = [], x
    for packed, state in weights:
        y = qk.matmul_4bit(y, packed, state)
        torch.cuda.synchronize()
        want.append(y)
    assert torch.isfinite(want[-1]).all() and want[-1].abs().max() > 0.1
    monkeypatch.setenv("QLORA_KERNELS_PDL", "1")
    for _ in range(3):
        poison_free_blocks()
        for got, ref in zip(chain(), want):
            assert torch.equal(got, ref)
    chain()  # warm-up before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = chain()
    for _ in range(3):
        for y in ys:
            y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for got, ref in zip(ys, want):
            assert torch.equal(got, ref)


@pytest.mark.gpu
def test_gpu_cuda_op_host_checks_raise_instead_of_crashing(rng):
    """The C++ host checks of the CUDA op, reached only by direct op calls (the Python API
    checks first): each raises a RuntimeError naming the argument, and the process lives on."""
    _impl("cuda")
    op = torch.ops.qlora_kernels.matmul_4bit
    packed, state = quantized_weight(64, 128, "nf4", 64, False, rng, "cuda")
    x = random_x((3, 128), torch.bfloat16, rng, "cuda")
    cases = [
        (lambda: op(x[:, :96].contiguous(), packed, state.absmax, 64, "nf4", 64, None, None, None, 256, None),
         "packed: expected"),
        (lambda: op(random_x((3, 48), torch.bfloat16, rng, "cuda"), packed, state.absmax, 64, "nf4", 64, None,
                    None, None, 256, None), "x: the fused 4-bit matmul needs K"),
        (lambda: op(x.float(), packed, state.absmax, 64, "nf4", 64, None, None, None, 256, None),
         "x: expected dtype bfloat16 or float16"),
        (lambda: op(x, packed, state.absmax[:-1], 64, "nf4", 64, None, None, None, 256, None),
         "absmax: expected"),
        (lambda: op(x, packed, state.absmax, 64, "int4", 64, None, None, None, 256, None), "quant_type"),
        (lambda: op(x, packed, state.absmax, 64, "nf4", 64, None, None, None, 256, x[0, :64].contiguous().float()),
         "bias: expected dtype"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call()
    assert rel_err(op(x, packed, state.absmax, 64, "nf4", 64, None, None, None, 256, None),
                   expected(x, packed, state)) < 1e-2


@pytest.mark.gpu
def test_gpu_tile_override_rejects_garbage(monkeypatch, rng):
    _impl("cuda")
    monkeypatch.setenv("QLORA_KERNELS_MM_TILE", "wide")
    packed, state = quantized_weight(64, 128, "nf4", 64, True, rng, "cuda")
    with pytest.raises(RuntimeError, match='QLORA_KERNELS_MM_TILE: expected "R,D"'):
        qk.matmul_4bit(random_x((1, 128), torch.bfloat16, rng, "cuda"), packed, state)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_gpu_unaligned_x(impl, rng):
    """x starting 2 bytes past a 16-byte boundary, and with a row stride wider than K."""
    fn = _impl(impl)
    K, N, M = 4096, 257, 5
    packed, state = quantized_weight(N, K, "nf4", 64, True, rng, "cuda")
    buf = random_x((M * K + 1,), torch.bfloat16, rng, "cuda")
    x = buf[1:].view(M, K)
    assert x.data_ptr() % 16 != 0
    if impl == "triton":
        assert rel_err(fn(x, packed, state), expected(x, packed, state)) < 1e-2
    assert rel_err(qk.matmul_4bit(x, packed, state), expected(x, packed, state)) < 1e-2
    wide = random_x((M, K + 8), torch.bfloat16, rng, "cuda")[:, 8:]
    assert rel_err(qk.matmul_4bit(wide, packed, state), expected(wide, packed, state)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 300])
def test_gpu_public_k_257_dequantize_path(M, rng):
    K, N = 257, 4160
    packed, state = quantized_weight(N, K, "nf4", 64, True, rng, "cuda")
    x = random_x((M, K), torch.bfloat16, rng, "cuda")
    bias = random_x((N,), torch.bfloat16, rng, "cuda")
    assert not uses_fused_kernel(x, state)
    assert rel_err(qk.matmul_4bit(x, packed, state, bias), expected(x, packed, state, bias)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead", [(2, 3), (1, 1, 4), (40, 5)])
def test_gpu_public_leading_dims(lead, dtype, rng):
    K, N = 4160, 257
    packed, state = quantized_weight(N, K, "nf4", 64, True, rng, "cuda")
    x = random_x((*lead, K), dtype, rng, "cuda")
    bias = random_x((N,), dtype, rng, "cuda")
    out = qk.matmul_4bit(x, packed, state, bias)
    assert out.shape == (*lead, N) and out.dtype == dtype
    want = expected(x.reshape(-1, K), packed, state, bias).view(*lead, N)
    assert rel_err(out, want) < max(TOL[dtype], 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4])
def test_gpu_cuda_graph_replay_equals_eager(M, rng):
    """Decode is launch-bound, so Linear4bit models must capture into a CUDA graph (no host
    syncs, no allocations outside the graph pool) and replay bit for bit."""
    model = _small_model("cuda", rng)
    static_x = random_x((M, 64), torch.bfloat16, rng, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = model(static_x)
    for _ in range(2):
        new_x = random_x((M, 64), torch.bfloat16, rng, "cuda")
        static_x.copy_(new_x)
        graph.replay()
        with torch.no_grad():
            eager = model(new_x)
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)


@pytest.mark.parametrize("M", [1, 7, 70])
def test_gradients_flow_through_frozen_4bit_layer(M, rng):
    # dX = dY @ W and the bias gradient, on both the fused (M <= 64) and the dequantize path
    lin = torch.nn.Linear(96, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=rng) * 0.05)
        lin.bias.copy_(torch.randn(40, generator=rng))
    layer = Linear4bit.from_linear(lin.to(torch.bfloat16))
    x = torch.randn(M, 96, generator=rng).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(M, 40, generator=rng)
    (layer(x).float() * dy).sum().backward()
    W = layer.dequantize(torch.float32)
    assert rel_err(x.grad, dy @ W) < 1e-2
    assert rel_err(layer.bias.grad, dy.sum(0)) < 1e-2


# ------------------------------------------------------------------------------------------
# (g) gemm_4bit: many rows (prefill, training), the wgmma kernel on an H100
def gemm(x, packed, state, bias=None, accumulate=None):
    return torch.ops.qlora_kernels.gemm_4bit(x, packed, state.absmax, state.blocksize, state.quant_type,
                                             state.shape[0], *_nested_args(state), bias, accumulate)


def is_h100_class() -> bool:
    return HAS_CUDA and qk.backend() == "cuda" and torch.cuda.get_device_capability() == (9, 0)


def gemm_kernel_runs(fn) -> set[tuple[bool, int, bool]]:
    """(transposed, token tile, LoRA steps) of each wgmma GEMM kernel fn launched, read from the
    profiler's kernel names: gemm_4bit_kernel<T, transposed, tokens, lora> (bools as true/false
    or 1/0), or the mangled name."""
    _, names = _kernel_names(fn)
    flag = {"true": True, "1": True, "false": False, "0": False}
    runs = set()
    for name in names:
        if "gemm_4bit_kernel" not in name:
            continue
        demangled = re.search(r"gemm_4bit_kernel<[^,]+,\s*(?:\(bool\))?(true|false|1|0),\s*(\d+),"
                              r"\s*(?:\(bool\))?(true|false|1|0)\s*>", name)
        mangled = re.search(r"gemm_4bit_kernel\w*?Lb([01])ELi(\d+)ELb([01])E", name)
        found = demangled or mangled
        assert found, f"no template arguments in the kernel name {name!r}"
        runs.add((flag[found.group(1)], int(found.group(2)), flag[found.group(3)]))
    return runs


@pytest.fixture
def gemm_always(monkeypatch):
    """The wgmma kernel on these small problems too (by default it takes problems of one tile
    per SM and more)."""
    monkeypatch.setenv("QLORA_KERNELS_GEMM", "always")


@pytest.fixture(params=[256, 128], ids=["tile256", "tile128"])
def gemm_tile(request, monkeypatch):
    """The kernel's token tile: 256, or 128 (which it takes where 256-token tiles would leave SMs
    idle), forced wherever the kernel runs."""
    monkeypatch.setenv("QLORA_KERNELS_GEMM_TILE", str(request.param))
    return request.param


# (M, K, N, quant_type, blocksize, nested, dtype, bias, accumulate): partial token tiles (65,
# 300, 1000), N not a multiple of the 128-row tile (257, 1000, 136; 257 % 8 != 0 takes the
# element-wise epilogue), absmax blocks straddling rows (blocksize 4096 > K), one K step (64), a
# partial last group of token tiles (1300: 6 tiles, groups of 4), both formats and dtypes; the
# last two take the dequantize path (K % 64 != 0, blocksize 32).
GEMM_CASES = [
    (1300, 64, 520, "nf4", 64, True, torch.float16, True, True),
    (65, 4160, 257, "nf4", 64, True, torch.bfloat16, True, True),
    (300, 256, 1000, "fp4", 128, False, torch.float16, False, True),
    (512, 1024, 384, "nf4", 4096, True, torch.bfloat16, True, False),
    (257, 128, 136, "nf4", 256, False, torch.bfloat16, False, False),
    (1000, 2048, 512, "fp4", 64, True, torch.float16, True, True),
    (2048, 4096, 1024, "nf4", 64, True, torch.bfloat16, False, True),
    (70, 4128, 256, "nf4", 64, True, torch.bfloat16, True, True),
    (80, 256, 264, "nf4", 32, True, torch.float16, False, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,quant_type,blocksize,nested,dtype,with_bias,with_acc", GEMM_CASES)
def test_gpu_gemm_4bit(M, K, N, quant_type, blocksize, nested, dtype, with_bias, with_acc, gemm_always, gemm_tile,
                       rng):
    _impl("cuda")
    packed, state = quantized_weight(N, K, quant_type, blocksize, nested, rng, "cuda")
    x = random_x((M, K), dtype, rng, "cuda")
    bias = random_x((N,), dtype, rng, "cuda") if with_bias else None
    acc = random_x((M, N), dtype, rng, "cuda") if with_acc else None
    out = gemm(x, packed, state, bias, acc)
    want = expected(x, packed, state, bias)
    if acc is not None:
        want = want + acc.cpu().float()
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, want) < TOL[dtype]
    # and no single output off (one wrong element of 65 x 257 would hide in the norm above)
    scale = want.abs().max()
    assert float((out.cpu().float() - want).abs().max() / scale) < 8 * TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not is_h100_class(), reason="the wgmma kernel runs on compute capability 9.0")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gemm_4bit_kernel_runs_and_matches_the_dequantize_path(dtype, gemm_always, gemm_tile, monkeypatch, rng):
    """The kernel's result is not the dequantize path's to the bit (it rounds code and absmax to
    x's type first), so a difference shows that it ran; both are within the error bound."""
    packed, state = quantized_weight(1000, 1024, "nf4", 64, True, rng, "cuda")
    x = random_x((600, 1024), dtype, rng, "cuda")
    acc = random_x((600, 1000), dtype, rng, "cuda")
    fused = gemm(x, packed, state, None, acc)
    assert gemm_kernel_runs(lambda: gemm(x, packed, state, None, acc)) == {(False, gemm_tile, False)}
    monkeypatch.setenv("QLORA_KERNELS_GEMM", "0")
    plain = gemm(x, packed, state, None, acc)
    want = expected(x, packed, state) + acc.cpu().float()
    assert not torch.equal(fused, plain)
    assert rel_err(fused, want) < TOL[dtype] and rel_err(plain, want) < TOL[dtype]
    # and repeats to the bit (no split over K, one order of sums)
    monkeypatch.setenv("QLORA_KERNELS_GEMM", "always")
    assert torch.equal(gemm(x, packed, state, None, acc), fused)


@pytest.mark.gpu
def test_gpu_gemm_4bit_unaligned_and_strided_operands(gemm_always, rng):
    """accumulate and bias starting off 16 bytes take the element-wise epilogue, a strided x the
    dequantize path: the same result either way."""
    _impl("cuda")
    M, K, N = 300, 512, 264
    packed, state = quantized_weight(N, K, "nf4", 64, True, rng, "cuda")
    x = random_x((M, K), torch.bfloat16, rng, "cuda")
    acc = random_x((M * N + 1,), torch.bfloat16, rng, "cuda")[1:].view(M, N)
    bias = random_x((N + 1,), torch.bfloat16, rng, "cuda")[1:]
    want = expected(x, packed, state, bias) + acc.cpu().float()
    assert rel_err(gemm(x, packed, state, bias, acc), want) < 1e-2
    x_wide = random_x((M, 2 * K), torch.bfloat16, rng, "cuda")
    x_strided = x_wide[:, ::2]
    assert rel_err(gemm(x_strided, packed, state), expected(x_strided, packed, state)) < 1e-2


@pytest.mark.gpu
def test_gpu_gemm_4bit_errors_name_the_argument(gemm_always, rng):
    _impl("cuda")
    packed, state = quantized_weight(64, 128, "nf4", 64, True, rng, "cuda")
    x = random_x((300, 128), torch.bfloat16, rng, "cuda")
    cases = [
        (lambda: gemm(x, packed, state, None, random_x((300, 63), torch.bfloat16, rng, "cuda")),
         "accumulate: expected sizes [300, 64]"),
        (lambda: gemm(x, packed, state, None, random_x((300, 64), torch.float16, rng, "cuda")),
         "accumulate: expected dtype"),
        (lambda: gemm(x, packed, state, random_x((64,), torch.float32, rng, "cuda")), "bias: expected dtype"),
        (lambda: gemm(x[:, :96].contiguous(), packed, state), "packed: expected"),
        (lambda: gemm(x.int(), packed, state), "x: expected dtype"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call()
    # an empty K, and a strided bias (as F.linear takes one): a result, not an error
    nested_absmax, code, offset, nested_blocksize = _nested_args(state)
    empty = torch.ops.qlora_kernels.gemm_4bit(random_x((300, 0), torch.bfloat16, rng, "cuda"), packed[:0],
                                              state.absmax[:0], 64, "nf4", 64, nested_absmax[:0], code, offset,
                                              nested_blocksize, None, None)
    assert empty.shape == (300, 64) and not empty.any()
    bias = random_x((64, 2), torch.bfloat16, rng, "cuda")[:, 0]
    assert rel_err(gemm(x, packed, state, bias), expected(x, packed, state, bias)) < 1e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gemm_4bit_opcheck(device, gemm_always, rng):
    packed, state = quantized_weight(136, 128, "nf4", 64, True, rng, device=device)
    x = random_x((70, 128), torch.bfloat16, rng, device)
    acc = random_x((70, 136), torch.bfloat16, rng, device)
    bias = random_x((136,), torch.bfloat16, rng, device)
    torch.library.opcheck(torch.ops.qlora_kernels.gemm_4bit.default,
                          (x, packed, state.absmax, 64, "nf4", 136, *_nested_args(state), bias, acc))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gemm_4bit_gradients(device, gemm_always, rng):
    """Through the public matmul_4bit at many rows (gemm_4bit on the CUDA backend): dX = dY @ W,
    the bias gradient, and accumulate's (dY itself)."""
    lin = torch.nn.Linear(128, 72)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(72, 128, generator=rng) * 0.05)
        lin.bias.copy_(torch.randn(72, generator=rng))
    layer = Linear4bit.from_linear(lin.to(torch.bfloat16).to(device))
    x = torch.randn(300, 128, generator=rng).to(torch.bfloat16).to(device).requires_grad_()
    dy = torch.randn(300, 72, generator=rng).to(device)
    (layer(x).float() * dy).sum().backward()
    W = layer.dequantize(torch.float32)
    assert rel_err(x.grad, dy @ W) < 1e-2
    assert rel_err(layer.bias.grad, dy.sum(0)) < 1e-2
    packed, state = layer.weight, layer.quant_state
    acc = torch.randn(300, 72, generator=rng).to(torch.bfloat16).to(device).requires_grad_()
    (torch.ops.qlora_kernels.gemm_4bit(x.detach(), packed, state.absmax, state.blocksize, state.quant_type, 72,
                                       *_nested_args(state), None, acc).float() * dy).sum().backward()
    assert rel_err(acc.grad, dy) < 1e-2


# gemm_4bit_dx: x @ W (the backward's dX = dY @ W), W the reduction side; gemm_4bit_add_: the
# LoRA layer's in-place out += x @ W.T / x @ W
def gemm_dx(x, packed, state):
    N, K = state.shape
    return torch.ops.qlora_kernels.gemm_4bit_dx(x, packed, state.absmax, state.blocksize, state.quant_type, N, K,
                                                *_nested_args(state))


def gemm_add_(out, x, packed, state, transposed):
    N, K = state.shape
    torch.ops.qlora_kernels.gemm_4bit_add_(out, x, packed, state.absmax, state.blocksize, state.quant_type, N, K,
                                           *_nested_args(state), transposed)


# (M, N, K, quant_type, blocksize, nested, dtype, accumulate): N (the reduction) not a multiple of
# 64 (1000, 136, 264: the last step's rows past N read as zeros, their scales as 0), K not a
# multiple of the 128-column tile (4160, 320, 4288), partial token tiles, both formats and dtypes,
# a 4096 blocksize (one scale for many steps); the last two take the dequantize path (K % 64 != 0,
# then N % 8 != 0); with accumulate: through gemm_4bit_add_ (transposed).
GEMM_DX_CASES = [
    (300, 1000, 4160, "nf4", 64, True, torch.bfloat16, True),
    (1300, 136, 320, "fp4", 128, False, torch.float16, True),
    (65, 4096, 1024, "nf4", 4096, True, torch.bfloat16, False),
    (70, 264, 4288, "nf4", 64, True, torch.bfloat16, True),
    (33, 72, 4100, "nf4", 64, True, torch.bfloat16, False),
    (40, 257, 128, "nf4", 64, True, torch.bfloat16, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,quant_type,blocksize,nested,dtype,with_acc", GEMM_DX_CASES)
def test_gpu_gemm_4bit_dx(M, N, K, quant_type, blocksize, nested, dtype, with_acc, gemm_always, gemm_tile, rng):
    _impl("cuda")
    packed, state = quantized_weight(N, K, quant_type, blocksize, nested, rng, "cuda")
    x = random_x((M, N), dtype, rng, "cuda")
    want = x.cpu().float() @ reference_weight(packed, state)
    if with_acc:
        out = random_x((M, K), dtype, rng, "cuda")
        want = want + out.cpu().float()
        gemm_add_(out, x, packed, state, True)
    else:
        out = gemm_dx(x, packed, state)
    assert out.shape == (M, K) and out.dtype == dtype
    assert rel_err(out, want) < TOL[dtype]
    assert float((out.cpu().float() - want).abs().max() / want.abs().max()) < 8 * TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gemm_4bit_dx_and_add_kernels_run(dtype, gemm_always, gemm_tile, monkeypatch, rng):
    """As for gemm_4bit: the transposed kernel's result is not the dequantize path's to the bit,
    so a difference shows that it ran (gemm_4bit_dx, and gemm_4bit_add_ both ways); both are
    within the bound, and the kernel repeats to the bit."""
    _impl("cuda")
    packed, state = quantized_weight(1000, 1024, "nf4", 64, True, rng, "cuda")
    W = reference_weight(packed, state)
    dy = random_x((600, 1000), dtype, rng, "cuda")
    x = random_x((600, 1024), dtype, rng, "cuda")
    acc_dx, acc = random_x((600, 1024), dtype, rng, "cuda"), random_x((600, 1000), dtype, rng, "cuda")

    def run():
        out_dx, out = acc_dx.clone(), acc.clone()
        gemm_add_(out_dx, dy, packed, state, True)
        gemm_add_(out, x, packed, state, False)
        return gemm_dx(dy, packed, state), out_dx, out

    fused = run()
    assert gemm_kernel_runs(run) == {(True, gemm_tile, False), (False, gemm_tile, False)}
    monkeypatch.setenv("QLORA_KERNELS_GEMM", "0")
    plain = run()
    wants = (dy.cpu().float() @ W, dy.cpu().float() @ W + acc_dx.cpu().float(), x.cpu().float() @ W.T + acc.cpu().float())
    for f, p, want in zip(fused, plain, wants):
        assert not torch.equal(f, p)
        assert rel_err(f, want) < TOL[dtype] and rel_err(p, want) < TOL[dtype]
    monkeypatch.setenv("QLORA_KERNELS_GEMM", "always")
    assert all(torch.equal(a, b) for a, b in zip(run(), fused))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_matmul_4bit_second_derivative(device, gemm_always, rng):
    """dX = dY @ W (gemm_4bit_dx on the CUDA backend) is itself differentiable: with
    create_graph=True, d(sum(dX * v)) / d(dY) = v @ W.T."""
    lin = torch.nn.Linear(128, 72, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(72, 128, generator=rng) * 0.05)
    layer = Linear4bit.from_linear(lin.to(torch.bfloat16).to(device))
    x = torch.randn(300, 128, generator=rng).to(torch.bfloat16).to(device).requires_grad_()
    dy = torch.randn(300, 72, generator=rng).to(torch.bfloat16).to(device).requires_grad_()
    v = torch.randn(300, 128, generator=rng).to(device)
    (dx,) = torch.autograd.grad(layer(x), x, dy, create_graph=True)
    (dx.float() * v).sum().backward()
    W = layer.dequantize(torch.float32)
    assert rel_err(dx, dy.float() @ W) < 1e-2
    assert rel_err(dy.grad, v @ W.T) < 1e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gemm_4bit_dx_matches_the_reference(device, gemm_always, rng):
    packed, state = quantized_weight(136, 320, "nf4", 64, True, rng, device=device)
    x = random_x((300, 136), torch.bfloat16, rng, device)
    assert rel_err(gemm_dx(x, packed, state), x.cpu().float() @ reference_weight(packed, state)) < 1e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["always", "0"])
def test_gemm_4bit_add_in_place(device, mode, monkeypatch, rng):
    """out += x @ W.T and out += x @ W into the caller's tensor (the kernel with "always", the
    dequantize path with "0"), also into a strided view, which keeps its strides."""
    monkeypatch.setenv("QLORA_KERNELS_GEMM", mode)
    packed, state = quantized_weight(136, 320, "nf4", 64, True, rng, device=device)
    W = reference_weight(packed, state)
    for transposed, (width, out_width) in ((False, (320, 136)), (True, (136, 320))):
        x = random_x((300, width), torch.bfloat16, rng, device)
        product = x.cpu().float() @ (W if transposed else W.T)
        out = random_x((300, out_width), torch.bfloat16, rng, device)
        before, pointer = out.cpu().float(), out.data_ptr()
        gemm_add_(out, x, packed, state, transposed)
        assert out.data_ptr() == pointer
        assert rel_err(out, before + product) < 1e-2
        wide = random_x((300, out_width + 8), torch.bfloat16, rng, device)
        view = wide[:, 4:4 + out_width]
        left, right, before = wide[:, :4].clone(), wide[:, 4 + out_width:].clone(), view.cpu().float()
        gemm_add_(view, x, packed, state, transposed)
        assert rel_err(view, before + product) < 1e-2
        assert torch.equal(wide[:, :4], left) and torch.equal(wide[:, 4 + out_width:], right)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gemm_4bit_add_errors_name_the_argument(device, rng):
    packed, state = quantized_weight(136, 320, "nf4", 64, True, rng, device=device)
    x = random_x((30, 320), torch.bfloat16, rng, device)
    error = (RuntimeError, ValueError)
    with pytest.raises(error, match="out: expected"):
        gemm_add_(random_x((30, 135), torch.bfloat16, rng, device), x, packed, state, False)
    with pytest.raises(error, match="out: expected"):
        gemm_add_(random_x((30, 136), torch.float16, rng, device), x, packed, state, False)
    with pytest.raises(error, match="x: expected"):
        gemm_add_(random_x((30, 136), torch.bfloat16, rng, device), x[:, :300], packed, state, False)
    # out written while x is read: refused (here out's rows are x's first 136 columns)
    wide = random_x((30, 320), torch.bfloat16, rng, device)
    with pytest.raises(error, match="out: must not overlap x"):
        gemm_add_(wide[:, :136], wide, packed, state, False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gemm_4bit_add_opcheck(device, gemm_always, rng):
    packed, state = quantized_weight(136, 128, "nf4", 64, True, rng, device=device)
    for transposed, width, out_width in ((False, 128, 136), (True, 136, 128)):
        x = random_x((70, width), torch.bfloat16, rng, device)
        out = random_x((70, out_width), torch.bfloat16, rng, device)
        torch.library.opcheck(torch.ops.qlora_kernels.gemm_4bit_add_.default,
                              (out, x, packed, state.absmax, 64, "nf4", 136, 128, *_nested_args(state), transposed))


# gemm_4bit_lora: x @ W.T + scale * xa @ B.T (+ bias), the LoRA layer's forward after xa = x @ A.T;
# on an H100 the LoRA term runs as r / 64 extra steps of the kernel's main loop
def gemm_lora(x, packed, state, xa, B, scale, bias=None):
    N, _ = state.shape
    return torch.ops.qlora_kernels.gemm_4bit_lora(x, packed, state.absmax, state.blocksize, state.quant_type, N,
                                                  *_nested_args(state), xa, B, scale, bias)


def lora_operands(M, K, N, r, dtype, g, device, packed, state):
    """x, xa, B with the LoRA term about as large as the base product, so that an error in
    either shows in the relative error."""
    x = random_x((M, K), dtype, g, device)
    xa = random_x((M, r), dtype, g, device)
    B = torch.randn(N, r, generator=g)
    base = (x.cpu().float() @ reference_weight(packed, state).T).norm()
    B = (B * base / (xa.cpu().float() @ B.T).norm()).to(dtype).to(device)
    return x, xa, B


def expected_lora(x, packed, state, xa, B, scale, bias=None):
    return expected(x, packed, state, bias) + scale * (xa.cpu().float() @ B.cpu().float().T)


# (M, K, N, r, dtype, bias, scale, quant_type, blocksize, nested): one LoRA step (r 64), columns
# past r read as zeros (16, 8), two steps, the second 8 wide (72), two full ones (128), four (256:
# the producer waits for a slot during the LoRA steps); N not a multiple of the 128-row tile (1000,
# 136, 264, 200, 257: the element-wise epilogue), partial token tiles, K of one step (64) and of 65
# (4160); bf16 scales that are not powers of two (s * B is then rounded to bf16 once); both
# formats, plain absmax, blocksizes above 64. Two-pass (the LoRA term first, then the base GEMM in
# place): r = 12 (r % 8 != 0), fp16 with scale 0.3 (not an exact power of two in [1, 256]), float32.
GEMM_LORA_CASES = [
    (300, 1024, 1000, 64, torch.bfloat16, True, 0.25, "nf4", 64, True),
    (1300, 320, 136, 16, torch.float16, False, 2.0, "nf4", 64, True),
    (70, 4160, 264, 72, torch.bfloat16, True, 1 / 3, "nf4", 64, True),
    (257, 64, 4288, 8, torch.bfloat16, False, 0.5, "fp4", 64, False),
    (40, 128, 72, 128, torch.float16, True, 1.0, "nf4", 256, True),
    (300, 512, 257, 256, torch.bfloat16, True, -0.5, "fp4", 128, False),
    (33, 256, 200, 12, torch.bfloat16, True, 0.75, "nf4", 64, True),
    (40, 128, 72, 16, torch.float16, True, 0.3, "nf4", 64, True),
    (65, 192, 136, 16, torch.float32, True, 0.5, "nf4", 64, True),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("M,K,N,r,dtype,with_bias,scale,quant_type,blocksize,nested", GEMM_LORA_CASES)
def test_gemm_4bit_lora(device, M, K, N, r, dtype, with_bias, scale, quant_type, blocksize, nested, gemm_always,
                        rng):
    packed, state = quantized_weight(N, K, quant_type, blocksize, nested, rng, device)
    x, xa, B = lora_operands(M, K, N, r, dtype, rng, device, packed, state)
    bias = random_x((N,), dtype, rng, device) if with_bias else None
    out = gemm_lora(x, packed, state, xa, B, scale, bias)
    want = expected_lora(x, packed, state, xa, B, scale, bias)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, want) < TOL[dtype]
    assert float((out.cpu().float() - want).abs().max() / want.abs().max()) < 8 * TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,r,dtype,with_bias,scale,quant_type,blocksize,nested", GEMM_LORA_CASES)
def test_gpu_gemm_4bit_lora_small_tile(M, K, N, r, dtype, with_bias, scale, quant_type, blocksize, nested,
                                       gemm_always, monkeypatch, rng):
    """test_gemm_4bit_lora's cases with the kernel's 128-token tile."""
    monkeypatch.setenv("QLORA_KERNELS_GEMM_TILE", "128")
    test_gemm_4bit_lora("cuda", M, K, N, r, dtype, with_bias, scale, quant_type, blocksize, nested, None, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [64, 24])
def test_gpu_gemm_4bit_lora_triton(r, rng):
    """The Triton backend's version (LoRA term first, then dequantize + cuBLAS onto it)."""
    from qlora_kernels.triton import matmul as TM

    packed, state = quantized_weight(264, 320, "fp4", 128, False, rng, "cuda")
    x, xa, B = lora_operands(130, 320, 264, r, torch.bfloat16, rng, "cuda", packed, state)
    bias = random_x((264,), torch.bfloat16, rng, "cuda")
    out = TM.gemm_4bit_lora(x, packed, state.absmax, state.blocksize, state.quant_type, 264, *_nested_args(state),
                            xa, B, 0.5, bias)
    assert rel_err(out, expected_lora(x, packed, state, xa, B, 0.5, bias)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not is_h100_class(), reason="the wgmma kernel runs on compute capability 9.0")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gemm_4bit_lora_kernel_runs(dtype, gemm_always, gemm_tile, monkeypatch, rng):
    """The LoRA steps in the kernel (the profiler names the kernel that ran): not the dequantize
    path's bits (that one rounds the LoRA term to x's type before the sum, and cuBLAS runs the base
    product), both within the bound; the kernel repeats to the bit. A strided xa, and in fp16 a
    scale below 1, take the two-pass way (the LoRA term first, then the kernel without LoRA steps
    in place): within the bound, not the same bits."""
    _impl("cuda")
    packed, state = quantized_weight(1000, 1024, "nf4", 64, True, rng, "cuda")
    x, xa, B = lora_operands(600, 1024, 1000, 64, dtype, rng, "cuda", packed, state)
    want = expected_lora(x, packed, state, xa, B, 2.0)
    fused = gemm_lora(x, packed, state, xa, B, 2.0)
    assert gemm_kernel_runs(lambda: gemm_lora(x, packed, state, xa, B, 2.0)) == {(False, gemm_tile, True)}
    monkeypatch.setenv("QLORA_KERNELS_GEMM", "0")
    plain = gemm_lora(x, packed, state, xa, B, 2.0)
    assert gemm_kernel_runs(lambda: gemm_lora(x, packed, state, xa, B, 2.0)) == set()
    assert not torch.equal(fused, plain)
    assert rel_err(fused, want) < TOL[dtype] and rel_err(plain, want) < TOL[dtype]
    monkeypatch.setenv("QLORA_KERNELS_GEMM", "always")
    assert torch.equal(gemm_lora(x, packed, state, xa, B, 2.0), fused)
    xa_strided = torch.empty(600, 128, dtype=dtype, device="cuda")[:, ::2].copy_(xa)
    two_pass = gemm_lora(x, packed, state, xa_strided, B, 2.0)
    assert gemm_kernel_runs(lambda: gemm_lora(x, packed, state, xa_strided, B, 2.0)) == {(False, gemm_tile, False)}
    assert not torch.equal(two_pass, fused) and rel_err(two_pass, want) < TOL[dtype]
    fused_small_scale = {(False, gemm_tile, dtype == torch.bfloat16)}
    assert gemm_kernel_runs(lambda: gemm_lora(x, packed, state, xa, B, 0.25)) == fused_small_scale
    assert rel_err(gemm_lora(x, packed, state, xa, B, 0.25), expected_lora(x, packed, state, xa, B, 0.25)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not is_h100_class(), reason="the wgmma kernel runs on compute capability 9.0")
def test_gpu_gemm_4bit_default_tile(monkeypatch, rng):
    """The default rule (nothing forced): 8192 weight rows at 128 tokens take 128-token tiles (64
    tiles; a 256-token one would be half empty), at 512 tokens 256-token tiles (128 tiles); 1024
    rows at 128 tokens have too few tiles and dequantize (no kernel)."""
    _impl("cuda")
    for var in ("QLORA_KERNELS_GEMM", "QLORA_KERNELS_GEMM_TILE"):
        monkeypatch.delenv(var, raising=False)
    packed, state = quantized_weight(8192, 256, "nf4", 64, True, rng, "cuda")
    for M, tile in ((128, 128), (512, 256)):
        x = random_x((M, 256), torch.bfloat16, rng, "cuda")
        assert gemm_kernel_runs(lambda: gemm(x, packed, state)) == {(False, tile, False)}
        assert rel_err(gemm(x, packed, state), expected(x, packed, state)) < 1e-2
    packed, state = quantized_weight(1024, 256, "nf4", 64, True, rng, "cuda")
    x = random_x((128, 256), torch.bfloat16, rng, "cuda")
    assert gemm_kernel_runs(lambda: gemm(x, packed, state)) == set()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gemm_4bit_lora_errors_name_the_argument(device, rng):
    packed, state = quantized_weight(136, 320, "nf4", 64, True, rng, device=device)
    x = random_x((30, 320), torch.bfloat16, rng, device)
    xa, B = random_x((30, 16), torch.bfloat16, rng, device), random_x((136, 16), torch.bfloat16, rng, device)
    error = (RuntimeError, ValueError)
    cases = [
        ((x, packed, state, xa[:29], B, 0.5), "xa: expected sizes [30, r]"),
        ((x, packed, state, xa.half(), B, 0.5), "xa: expected dtype"),
        ((x, packed, state, xa, B[:, :8], 0.5), "B: expected sizes [136, 16]"),
        ((x, packed, state, xa, B.float(), 0.5), "B: expected dtype"),
        ((x, packed, state, xa, B, float("nan")), "scale: expected a finite number"),
        ((x, packed, state, xa, B, 0.5, random_x((135,), torch.bfloat16, rng, device)), "bias: expected sizes [136]"),
        ((x, packed, state, xa, B, 0.5, random_x((136, 1), torch.bfloat16, rng, device)), "bias: expected sizes [136]"),
    ]
    for args, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            gemm_lora(*args)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gemm_4bit_lora_opcheck(device, gemm_always, rng):
    packed, state = quantized_weight(136, 128, "nf4", 64, True, rng, device=device)
    x = random_x((70, 128), torch.bfloat16, rng, device)
    xa, B = random_x((70, 16), torch.bfloat16, rng, device), random_x((136, 16), torch.bfloat16, rng, device)
    bias = random_x((136,), torch.bfloat16, rng, device)
    torch.library.opcheck(torch.ops.qlora_kernels.gemm_4bit_lora.default,
                          (x, packed, state.absmax, 64, "nf4", 136, *_nested_args(state), xa, B, 0.5, bias))
