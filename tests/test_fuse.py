"""Projections of one input in one launch: the grouped 4-bit matmul op, ProjectionGroup and
fuse_projections (decode-time fusion of q/k/v and gate/up).

CPU tests run the reference (one matmul per weight); the GPU tests run the CUDA kernel's
one-launch path against the per-weight kernel, bit for bit.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels import ops
from qlora_kernels.matmul import _nested_args, matmul_4bit_group
from qlora_kernels.nn import Linear4bit, ProjectionGroup, ProjectionGroupMember, fuse_projections

HAS_CUDA = torch.cuda.is_available()


def quantized(N, K, g, device="cpu", nested=True, quant_type="nf4", blocksize=64):
    W = torch.randn(N, K, generator=g) * 0.02
    return qk.quantize_4bit(W.to(device), quant_type=quant_type, blocksize=blocksize, double_quant=nested)


def grouped_op(x, weights, biases):
    states = [s for _, s in weights]
    nested = [_nested_args(s) for s in states]
    first = states[0]
    return ops.matmul_4bit_grouped(
        x, [p for p, _ in weights], [s.absmax for s in states], first.blocksize, first.quant_type,
        [s.shape[0] for s in states], [n[0] for n in nested] if first.nested else None,
        nested[0][1] if first.nested else None, [n[2] for n in nested] if first.nested else None,
        nested[0][3], biases)


class Block(nn.Module):
    """q/k/v and gate/up called as LLaMA calls them: the very same input tensor each time."""

    def __init__(self, make, K=64, bias=False):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = make(K, 96, bias), make(K, 32, bias), make(K, 32, bias)
        self.gate_proj, self.up_proj = make(K, 160, bias), make(K, 160, bias)

    def forward(self, x):
        h = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)
        return h, self.gate_proj(x) * self.up_proj(x)


def linear4bit(K, N, bias, nested=True):
    return Linear4bit.from_linear(nn.Linear(K, N, bias=bias), double_quant=nested)


def test_grouped_op_reference_is_one_matmul_per_weight(rng):
    weights = [quantized(N, 128, rng) for N in (64, 96, 33 * 2)]
    biases = [torch.randn(64, generator=rng), None, torch.randn(66, generator=rng)]
    x = torch.randn(3, 128, generator=rng)
    outs = grouped_op(x, weights, biases)
    for out, (p, s), b in zip(outs, weights, biases):
        assert torch.equal(out, qk.matmul_4bit(x, p, s, b))


@pytest.mark.parametrize("make", ["4bit", "dense"])
def test_fuse_projections_same_outputs(make, rng):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    maker = linear4bit if make == "4bit" else (lambda K, N, bias: nn.Linear(K, N, bias=bias))
    block = Block(maker, bias=True)
    x = torch.randn(2, 5, 64, generator=rng)
    want = block(x)
    assert fuse_projections(block) == 2
    assert isinstance(block.q_proj, ProjectionGroupMember) and isinstance(block.fused_q_k_v, ProjectionGroup)
    assert isinstance(block.fused_gate_up, ProjectionGroup)
    got = block(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if make == "dense" else 0)
    assert block.fused_q_k_v._outputs is None  # nothing kept alive once every member has its output


def test_member_recomputes_for_another_or_modified_input(rng):
    block = Block(linear4bit)
    fuse_projections(block)
    x = torch.randn(3, 64, generator=rng)
    y = torch.randn(3, 64, generator=rng)
    q = block.q_proj(x)
    assert torch.equal(block.k_proj(y), qk.matmul_4bit(y, block.fused_q_k_v.layers[1].weight,
                                                       block.fused_q_k_v.layers[1].quant_state))
    x2 = x.clone()
    assert torch.equal(block.q_proj(x2), q)
    x2.mul_(2)  # same tensor, new values: the kept outputs are stale
    k2 = block.k_proj(x2)
    layer = block.fused_q_k_v.layers[1]
    assert torch.equal(k2, qk.matmul_4bit(x2, layer.weight, layer.quant_state))


def test_member_asking_twice_gets_a_fresh_output(rng):
    block = Block(linear4bit)
    fuse_projections(block)
    x = torch.randn(3, 64, generator=rng)
    q1 = block.q_proj(x)
    want = q1.clone()
    q1.mul_(0)  # the caller owns what it got
    q2 = block.q_proj(x)
    assert q2 is not q1 and torch.equal(q2, want)


def test_lora_added_after_fusing_is_applied(rng):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    block = Block(linear4bit)
    fuse_projections(block)
    qk.add_lora(block, r=4, alpha=8, dropout=0.0)
    group = block.fused_q_k_v
    for layer in group.layers:
        torch.nn.init.normal_(layer.lora_B.weight)  # B starts at zero: make the LoRA term count
    x = torch.randn(2, 64, generator=rng, requires_grad=True)
    outs = [block.q_proj(x), block.k_proj(x), block.v_proj(x)]
    for out, layer in zip(outs, group.layers):
        assert torch.equal(out, layer(x))
    sum(o.sum() for o in outs).backward()
    assert all(layer.lora_B.weight.grad is not None for layer in group.layers)


def test_grouped_reference_rejects_bad_lists(rng):
    p, s = quantized(64, 128, rng)
    x = torch.randn(2, 128, generator=rng)
    nested = _nested_args(s)
    with pytest.raises(ValueError, match="packed: expected 1 to 4 weights"):
        ops.matmul_4bit_grouped(x, [], [], 64, "nf4", [], None, None, None, 256, [])
    with pytest.raises(ValueError, match="packed, absmax, N, bias: expected one per weight"):
        ops.matmul_4bit_grouped(x, [p, p], [s.absmax], 64, "nf4", [64, 64], None, None, None, 256, [])
    with pytest.raises(ValueError, match="nested_absmax, nested_code, offset: expected all three"):
        ops.matmul_4bit_grouped(x, [p], [s.absmax], 64, "nf4", [64], [nested[0]], nested[1], None, 256, [])


def test_fuse_projections_leaves_mixed_groups_alone(rng):
    block = Block(linear4bit)
    block.k_proj = nn.Linear(64, 32, bias=False)  # a plain layer among 4-bit ones
    block.gate_proj = linear4bit(64, 160, False, nested=False)  # another format than up_proj
    assert fuse_projections(block) == 0
    with pytest.raises(TypeError, match="layers: expected all Linear4bit or all nn.Linear"):
        ProjectionGroup([block.q_proj, block.k_proj])
    with pytest.raises(ValueError, match="layers: expected 4-bit layers of one format"):
        ProjectionGroup([block.gate_proj, block.up_proj])
    with pytest.raises(ValueError, match="layers: expected 2 to 4 layers"):
        ProjectionGroup([block.q_proj])
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fuse_projections("model")


def test_matmul_4bit_group_checks_biases(rng):
    weights = [quantized(64, 128, rng), quantized(32, 128, rng)]
    with pytest.raises(ValueError, match=r"biases: expected one \(or None\) per weight"):
        matmul_4bit_group(torch.randn(2, 128, generator=rng), weights, [None])


def test_fuse_projections_in_inference_mode(rng):
    block = Block(linear4bit)
    x = torch.randn(2, 64, generator=rng)
    want = block(x)
    fuse_projections(block)
    with torch.inference_mode():
        for a, b in zip(block(x), want):
            assert torch.equal(a, b)


def test_fuse_projections_compiles_fullgraph_cpu(rng):
    torch._dynamo.reset()
    block = Block(linear4bit)
    x = torch.randn(2, 64, generator=rng)
    want = block(x)
    fuse_projections(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for a, b in zip(compiled(x), want):
            assert torch.equal(a, b)
    assert block.fused_q_k_v._outputs is None


def test_fuse_projections_on_a_tiny_llama(rng):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                      max_position_embeddings=64)
    model = qk.quantize_model(transformers.LlamaForCausalLM(config).eval())
    ids = torch.randint(0, 96, (2, 9), generator=rng)
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_projections(model) == 4  # q/k/v and gate/up of each of the 2 layers
        assert torch.equal(model(ids).logits, want)


# ------------------------------------------------------------------------------------------
# GPU: the one-launch CUDA path


def _cuda():
    if not HAS_CUDA or qk.backend() != "cuda":
        pytest.skip("needs the CUDA extension on a GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 16, 33, 64])
@pytest.mark.parametrize("nested,dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_gpu_grouped_launch_equals_one_launch_per_weight(M, nested, dtype, rng):
    """One launch for several weights gives each weight's output bit for bit as its own launch
    (the tile may differ, the order of every sum does not): awkward N (a partial row tile in
    the middle of the set), K = 4160 (a partial last step), a bias on some weights only."""
    _cuda()
    K = 4160
    # 545 row tiles: more than the bulk-copy kernel's persistent grid on an H100 (3 x 132 CTAs,
    # at 1-8 tokens), so some of its CTAs take a tile of the third weight after one of the first
    weights = [quantized(N, K, rng, "cuda", nested) for N in (257, 96, 8320, 24)]
    biases = [torch.randn(257, generator=rng).to("cuda", dtype), None, None,
              torch.randn(24, generator=rng).to("cuda", dtype)]
    x = torch.randn(M, K, generator=rng).to("cuda", dtype)
    outs = matmul_4bit_group(x, weights, biases)
    for out, (p, s), b in zip(outs, weights, biases):
        assert torch.equal(out, qk.matmul_4bit(x, p, s, b))
    assert torch.equal(outs[2], grouped_op(x, weights, biases)[2])  # the op itself, directly


@pytest.mark.gpu
@pytest.mark.parametrize("tile", ["1,2,1,2", "1,2,1", "1,4"])
@pytest.mark.parametrize("M", [1, 7])
def test_gpu_grouped_launch_equals_per_weight_under_a_tile_override(M, tile, monkeypatch, rng):
    """The same bits as one call per weight under a QLORA_KERNELS_MM_TILE tuning override too,
    including one that splits K over the grid ("1,2,1,2"; "1,2,1": splits chosen to fill the
    GPU), which the grouped register kernel does not do: such weights run alone."""
    _cuda()
    monkeypatch.setenv("QLORA_KERNELS_MM_TILE", tile)
    weights = [quantized(N, 4160, rng, "cuda", True) for N in (257, 96, 1040)]
    x = torch.randn(M, 4160, generator=rng).to("cuda", torch.bfloat16)
    outs = matmul_4bit_group(x, weights)
    for out, (p, s) in zip(outs, weights):
        assert torch.equal(out, qk.matmul_4bit(x, p, s))


@pytest.mark.gpu
def test_gpu_grouped_op_checks_name_the_weight(rng):
    """The C++ checks name the weight they found wrong, and lists of different lengths raise
    (they once crashed the process on the H100 machine: the message streamed a size_t)."""
    _cuda()
    weights = [quantized(64, 128, rng, "cuda", False), quantized(32, 128, rng, "cuda", False)]
    x = torch.randn(2, 128, generator=rng).to("cuda", torch.bfloat16)
    op = ops.matmul_4bit_grouped
    p, s = zip(*weights)
    absmax = [st.absmax for st in s]
    cases = [
        (lambda: op(x, list(p), [absmax[0], absmax[1][:-1]], 64, "nf4", [64, 32], None, None, None, 256, [None, None]),
         "absmax[1]: expected"),
        (lambda: op(x, list(p), absmax, 64, "nf4", [64, 32], None, None, None, 256, [None, x[0, :32].float()]),
         "bias[1]: expected dtype"),
        (lambda: op(x, list(p), absmax, 64, "nf4", [64], None, None, None, 256, [None, None]),
         "packed, absmax, N: expected one of each per weight, got 2, 2, 1"),
        (lambda: op(x, list(p), absmax[:1], 64, "nf4", [64, 32], None, None, None, 256, [None, None]),
         "packed, absmax, N: expected one of each per weight, got 2, 1, 2"),
        (lambda: op(x, list(p), absmax, 64, "nf4", [64, 32], None, None, None, 256, [None]),
         "bias: expected none or one (or None) per weight, got 1"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call()


@pytest.mark.gpu
def test_gpu_fused_model_compiles_and_graphs(rng):
    """A fused block under torch.compile (inductor, fullgraph) and replayed from a CUDA graph
    gives what the unfused block gives."""
    _cuda()
    torch._dynamo.reset()
    block = Block(linear4bit).to("cuda")
    x = torch.randn(1, 64, generator=rng).to("cuda", torch.bfloat16)
    with torch.no_grad():
        want = block(x)
        fuse_projections(block)
        compiled = torch.compile(block, fullgraph=True)
        for a, b in zip(compiled(x), want):
            assert torch.equal(a, b)
        static_x = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            block(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = block(static_x)
        x2 = torch.randn(1, 64, generator=rng).to("cuda", torch.bfloat16)
        static_x.copy_(x2)
        graph.replay()
        fresh = block(x2)
        for a, b in zip(static_out, fresh):
            assert torch.equal(a, b)
