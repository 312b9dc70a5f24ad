"""End-to-end decode: a LLaMA-shaped 7B (random bf16 weights, built on the GPU), batch 1,
128 new tokens (greedy) after a 128-token prompt; tokens/s for bf16, for our Linear4bit
(NF4 + double quant, every nn.Linear but lm_head swapped) and for bitsandbytes' Linear4bit.

    python benchmarks/bench_decode.py [--layers 32] [--new-tokens 128] [--cuda-graphs] [--json out.json]

``--cuda-graphs`` adds runs with a static KV cache and ``torch.compile(mode="reduce-overhead")``
(CUDA graphs): batch-1 decode launches ~10 kernels per layer per token, so launch overhead
is a large part of the time once the weights are 4-bit; the graph rows show how much.
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
def generate(model, prompt, new_tokens, static_cache: bool):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    if static_cache:
        kwargs["cache_implementation"] = "static"
    return model.generate(prompt, **kwargs)


def time_generate(model, prompt, new_tokens, static_cache=False, warmup=1):
    for _ in range(warmup):
        generate(model, prompt, new_tokens if static_cache else 8, static_cache)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, prompt, new_tokens, static_cache)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / seconds, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = 7B; fewer for a quick run)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=128, help="generated tokens (greedy)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also run with a static KV cache + torch.compile(mode='reduce-overhead')")
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

    def record(name, graphs, tps, seconds):
        base = next((r["tokens_per_s"] for r in rows if r["impl"] == "bf16" and r["cuda_graphs"] == graphs), None)
        vs = tps / base if base else 1.0
        mem = torch.cuda.max_memory_allocated() / 2**30
        print(f"{name:<14}{'yes' if graphs else 'no':<8}{tps:>10.1f}{seconds:>10.2f}{vs:>9.2f}x{mem:>10.1f}", flush=True)
        rows.append({"impl": name, "cuda_graphs": graphs, "tokens_per_s": tps, "seconds": seconds,
                     "speedup_vs_bf16": vs, "peak_gib": mem})

    def record_both(name):
        """Eager, then (--cuda-graphs) the same model compiled with CUDA graphs."""
        record(name, False, *time_generate(model, prompt, args.new_tokens))
        if args.cuda_graphs:
            model.forward = torch.compile(model.forward, mode="reduce-overhead")
            record(name, True, *time_generate(model, prompt, args.new_tokens, static_cache=True))
            del model.forward
            torch._dynamo.reset()

    print(f"{'impl':<14}{'graphs':<8}{'tokens/s':>10}{'seconds':>10}{'vs bf16':>10}{'peak GiB':>10}")
    record_both("bf16")

    ours, theirs = quantize_model(model, with_bnb)
    torch.cuda.reset_peak_memory_stats()
    record_both("qlora_kernels")
    if with_bnb:
        swap(theirs)
        del ours
        torch.cuda.empty_cache()
        record("bitsandbytes", False, *time_generate(model, prompt, args.new_tokens))

    path = common.save({"env": env, "layers": args.layers, "prompt": args.prompt, "new_tokens": args.new_tokens,
                        "rows": rows}, "decode", args.json)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
