"""End-to-end decode: a LLaMA-shaped 7B (random bf16 weights, built on the GPU), batch 1,
128 new tokens (greedy) after a 128-token prompt; tokens/s for bf16, for our Linear4bit
(NF4 + double quant, every nn.Linear but lm_head swapped) and for bitsandbytes' Linear4bit.

    python benchmarks/bench_decode.py [--layers 32] [--new-tokens 128] [--cuda-graphs] [--compile] [--fuse] [--json out.json]

Eager rows use Hugging Face ``generate``: batch-1 decode launches ~10 kernels per layer per
token, so the CPU's launches, not the weights, bound them. ``--cuda-graphs`` adds rows from our
own greedy loop over a static KV cache (:class:`StaticDecoder`), each new token one replay of
a CUDA graph of the model's forward: the GPU's time per token, which is what 4-bit weights
change. (``torch.compile(mode="reduce-overhead")`` of ``generate`` fails on transformers 5.17:
its CUDA-graph trees reject the static cache's in-place updates.) ``--compile`` adds the same
loop with the step compiled by ``torch.compile`` (default mode) before capture, for every arm:
inductor fuses the norms, rotary and residual chains that the matmuls sit between. ``--fuse``
adds bf16 and ours again with q/k/v and gate/up grouped by ``qlora_kernels.nn.fuse_projections``
(ours: one kernel launch per group; bf16: concatenated weights, one GEMM), each compared with
unfused bf16 and, in the JSON, with fused bf16.
Weights take ~13.5 GB in bf16 and ~3.9 GB per 4-bit copy (both 4-bit sets are held at once).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import common


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    # random init at std 0.02 (the config's initializer_range) keeps activations finite
    return model.eval()


def linear_slots(model):
    """(parent, attribute name) of every nn.Linear except lm_head (no reference to the layer
    itself is kept, so swapping one out frees its weight)."""
    slots = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, nn.Linear) and full != "lm_head":
                slots.append((parent, name))
    return slots


def unfuse_dense(model):
    """Undoes fuse_projections on bf16 layers: each member's place gets an nn.Linear holding its
    slice of the group's weight again (so that the model can be quantized as before)."""
    from qlora_kernels.nn import ProjectionGroup, ProjectionGroupMember

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ProjectionGroupMember):
                group = child.group
                start = sum(group.out_features[:child.index])
                linear = nn.Linear(group.in_features, child.out_features, bias=group.bias is not None,
                                   device="meta")
                linear.weight = nn.Parameter(group.weight[start:start + child.out_features].clone(),
                                             requires_grad=False)
                if group.bias is not None:
                    linear.bias = nn.Parameter(group.bias[start:start + child.out_features].clone(),
                                               requires_grad=False)
                setattr(parent, name, linear)
        for name, child in list(parent.named_children()):
            if isinstance(child, ProjectionGroup):
                delattr(parent, name)


def bnb_linear(linear: nn.Linear):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                              device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to(linear.weight.device)  # Params4bit quantizes when moved


def quantize_model(model, with_bnb: bool):
    """Swaps every Linear (but lm_head) for our Linear4bit, freeing each bf16 weight as it
    goes; also returns bitsandbytes' layers for the same weights when asked."""
    from qlora_kernels.nn import Linear4bit

    ours, theirs = [], []
    for parent, name in linear_slots(model):
        linear = getattr(parent, name)
        layer = Linear4bit.from_linear(linear, quant_type="nf4", blocksize=64, double_quant=True)
        if with_bnb:
            theirs.append((parent, name, bnb_linear(linear)))
        ours.append((parent, name, layer))
        setattr(parent, name, layer)
        del linear
    torch.cuda.empty_cache()
    return ours, theirs


def swap(slots):
    for parent, name, layer in slots:
        setattr(parent, name, layer)


@torch.inference_mode()
def generate(model, prompt, new_tokens):
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, eos_token_id=None)


def timed(run, prompt, new_tokens):
    """(tokens/s, seconds) of one ``run(prompt)`` that appends new_tokens tokens."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = run(prompt)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / seconds, seconds


def time_generate(model, prompt, new_tokens, warmup=1):
    # A warm-up as long as the timed run, so that nothing the first run to reach that cache length
    # pays once is timed. (The bf16 eager row, run first after an 8-token warm-up, took 89 ms a
    # token against ~31 for the 4-bit arms after it; the cause is not yet known.)
    for _ in range(warmup):
        generate(model, prompt, new_tokens)
    return timed(lambda p: generate(model, p, new_tokens), prompt, new_tokens)


class StaticDecoder:
    """Greedy decoding over a static KV cache with fixed-shape steps: prefill the prompt, then
    one forward per new token reading its input token and position from device buffers, so the
    step can be captured once in a CUDA graph and replayed (``graphs=True``). Without graphs it
    runs the same steps eagerly; either way the tokens equal ``generate``'s greedy ones."""

    def __init__(self, model, prompt_len: int, new_tokens: int, graphs: bool, compiled: bool = False):
        from transformers import StaticCache

        self.model, self.prompt_len, self.new_tokens = model, prompt_len, new_tokens
        # compiled: the one-token step goes through torch.compile (inductor fuses the norms,
        # rotary and residual chains around the matmuls; the prefill stays eager)
        self.step_forward = torch.compile(model, dynamic=False) if compiled else model
        device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((1,), dtype=torch.long, device=device)
        self.graphs = graphs
        self.graph = None
        self.next_token = None

    # Positions go in explicitly as position_ids and cache_position: transformers 5.17 writes
    # the static cache at cache_position, later versions at a device-side counter in the cache
    # (reset with it); with both given, neither derives a position from the cache's contents.
    def _step(self) -> torch.Tensor:
        logits = self.step_forward(input_ids=self.token, past_key_values=self.cache, cache_position=self.position,
                                   position_ids=self.position.view(1, 1), use_cache=True).logits
        return logits[:, -1:].argmax(-1)

    def _start(self, prompt: torch.Tensor) -> None:
        """Empty the cache (in place: a captured graph keeps pointing at it), then prefill."""
        self.cache.reset()
        positions = torch.arange(self.prompt_len, device=prompt.device)
        logits = self.model(input_ids=prompt, past_key_values=self.cache, cache_position=positions,
                            position_ids=positions.view(1, -1), use_cache=True).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.fill_(self.prompt_len)

    def _capture(self) -> None:
        # Warm-up steps on a side stream (cuBLAS workspaces, lazy cache allocation) advance the
        # cache, so generate() starts over after the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.next_token = self._step()

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor) -> torch.Tensor:
        """The prompt followed by new_tokens greedy tokens, ``[1, prompt_len + new_tokens]``."""
        if self.graphs and self.graph is None:
            self._start(prompt)
            self._capture()
        self._start(prompt)
        out = [self.token.clone()]
        for _ in range(self.new_tokens - 1):
            if self.graph is not None:
                self.graph.replay()
                nxt = self.next_token
            else:
                nxt = self._step()
            self.token.copy_(nxt)
            self.position.add_(1)
            out.append(nxt.clone())
        return torch.cat([prompt] + out, dim=1)


def time_static(model, prompt, new_tokens, compiled=False):
    """Tokens/s and seconds of StaticDecoder with CUDA graphs (capture and one warm-up run
    untimed), or None and the reason when the step cannot be captured, or when replaying it
    gives other tokens than the same steps run eagerly (a position baked into the graph)."""
    try:  # TypeError too: StaticCache's signature has moved between transformers releases
        decoder = StaticDecoder(model, prompt.shape[1], new_tokens, graphs=True, compiled=compiled)
        graphed = decoder.generate(prompt)
        # against the same steps without the graph (compiled too when the graph is: fused
        # kernels round differently, and greedy tokens over random weights follow any difference)
        eager = StaticDecoder(model, prompt.shape[1], new_tokens, graphs=False, compiled=compiled).generate(prompt)
    except Exception as err:  # noqa: BLE001 - a dynamo/inductor failure too: report the row, go on
        torch.cuda.synchronize()
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    if not torch.equal(graphed, eager):
        return None, "replaying the graph gave other tokens than the eager steps"
    return timed(decoder.generate, prompt, new_tokens), None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = 7B; fewer for a quick run)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=128, help="generated tokens (greedy)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also run our static-KV-cache greedy loop, one CUDA-graph replay per token")
    ap.add_argument("--compile", action="store_true",
                    help="also run the CUDA-graph loop with its step compiled by torch.compile (every arm)")
    ap.add_argument("--fuse", action="store_true",
                    help="also run bf16 and ours with q/k/v and gate/up fused (qlora_kernels.nn.fuse_projections: "
                         "one launch each at decode; bf16 gets concatenated weights, one GEMM)")
    ap.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even when importable")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/<gpu>/decode.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU")

    env = common.environment()
    with_bnb = not args.no_bnb and common.bitsandbytes_functional() is not None
    print(f"{env['gpu']}  torch {env['torch']}  backend {env.get('qlora_kernels_backend')}"
          f"  bitsandbytes {env.get('bitsandbytes', 'absent') if with_bnb else 'skipped'}")
    print(f"LLaMA-7B shape, {args.layers} layers, batch 1, {args.prompt}-token prompt, "
          f"{args.new_tokens} new tokens (greedy)\n")
    model = build_model(args.layers)
    prompt = torch.randint(0, 32000, (1, args.prompt), device="cuda", generator=None)

    rows = []

    def record(name, graphs, tps, seconds, compiled=False):
        # against unfused bf16 in the same decode loop (a fused arm is also compared with fused bf16)
        def base_of(impl):
            return next((r["tokens_per_s"] for r in rows if r["impl"] == impl and r["cuda_graphs"] == graphs
                         and r["compiled"] == compiled), None)

        base = base_of("bf16")
        vs = tps / base if base else 1.0
        fused_base = base_of("bf16 fused") if name.endswith("fused") else None
        mem = torch.cuda.max_memory_allocated() / 2**30
        mode = ("compiled" if compiled else "yes") if graphs else "no"
        print(f"{name:<21}{mode:<10}{tps:>10.1f}{seconds:>10.2f}{vs:>9.2f}x{mem:>10.1f}", flush=True)
        rows.append({"impl": name, "cuda_graphs": graphs, "compiled": compiled, "tokens_per_s": tps,
                     "seconds": seconds, "speedup_vs_bf16": vs, "peak_gib": mem})
        if fused_base:
            rows[-1]["speedup_vs_bf16_fused"] = tps / fused_base

    def record_both(name):
        """Eager generate, then (--cuda-graphs) the CUDA-graph static-cache decoder."""
        record(name, False, *time_generate(model, prompt, args.new_tokens))
        for compiled in (False, True) if args.compile else (False,):
            if not (args.cuda_graphs or compiled):
                continue
            torch._dynamo.reset()  # each arm compiles its own layers
            timed, why = time_static(model, prompt, args.new_tokens, compiled)
            if timed is None:
                print(f"# {name}: the {'compiled ' if compiled else ''}decode step could not be captured "
                      f"in a CUDA graph ({why})", flush=True)
            else:
                record(name, True, *timed, compiled=compiled)

    print(f"{'impl':<21}{'graphs':<10}{'tokens/s':>10}{'seconds':>10}{'vs bf16':>10}{'peak GiB':>10}")
    record_both("bf16")
    if args.fuse:
        from qlora_kernels.nn import fuse_projections

        fuse_projections(model)
        record_both("bf16 fused")
        unfuse_dense(model)

    ours, theirs = quantize_model(model, with_bnb)
    torch.cuda.reset_peak_memory_stats()
    record_both("qlora_kernels")
    if args.fuse:
        fuse_projections(model)
        record_both("qlora_kernels fused")
    if with_bnb:
        swap(theirs)
        del ours
        torch.cuda.empty_cache()
        record_both("bitsandbytes")

    path = common.save({"env": env, "layers": args.layers, "prompt": args.prompt, "new_tokens": args.new_tokens,
                        "rows": rows}, "decode", args.json)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
