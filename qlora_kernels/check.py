"""``python -m qlora_kernels.check``: a quick self-check of the 4-bit format.

Quantizes the weights of a small built-in LLaMA-shaped model (random weights, 4 layers,
hidden 512) to NF4 with double quantization, on the GPU when there is one and on the CPU
otherwise; dequantizes them, checks them against the plain-torch reference bit for bit, and
prints the format's cost, its error and the kernels' speed. (``python -m qlora_kernels``
runs the default training job instead.)
"""

from __future__ import annotations

import argparse
import time

import torch

import qlora_kernels as qk
from qlora_kernels import reference

TINY_LLAMA = {"hidden": 512, "intermediate": 1376, "layers": 4, "vocab": 4096}


def tiny_llama_weights(cfg: dict, device, generator) -> dict[str, torch.Tensor]:
    h, i = cfg["hidden"], cfg["intermediate"]
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    weights = {}
    for layer in range(cfg["layers"]):
        for name, shape in shapes.items():
            W = torch.randn(shape, generator=generator) * (1.0 / shape[1] ** 0.5)
            weights[f"layers.{layer}.{name}.weight"] = W.to(torch.bfloat16).to(device)
    return weights


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_kernels.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    info = qk.backend_info()
    print(f"qlora_kernels {qk.__version__}: CUDA tensors use the '{info['backend']}' backend; "
          f"this job runs on {args.device}")
    for name, why in info["skipped"].items():
        print(f"  ({name} backend skipped: {why})")
    gen = torch.Generator().manual_seed(args.seed)
    weights = tiny_llama_weights(TINY_LLAMA, args.device, gen)
    n_params = sum(w.numel() for w in weights.values())
    print(f"built-in tiny LLaMA: {len(weights)} linear weights, {n_params / 1e6:.1f}M parameters (bf16)")

    dq = not args.no_double_quant
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    quantized = {k: qk.quantize_4bit(w, args.quant_type, args.blocksize, double_quant=dq) for k, w in weights.items()}
    sync()
    t1 = time.perf_counter()
    restored = {k: qk.dequantize_4bit(p, s) for k, (p, s) in quantized.items()}
    sync()
    t2 = time.perf_counter()

    mismatches = 0
    for k, (p, s) in quantized.items():
        ref_packed, _ = reference.quantize_4bit(weights[k], args.blocksize, args.quant_type)
        mismatches += int(not torch.equal(p, ref_packed))
    bits = sum(qk.bits_per_weight(s) * s.numel for _, s in quantized.values()) / n_params
    err = sum((restored[k].float() - w.float()).pow(2).sum() for k, w in weights.items())
    rel = (err / sum(w.float().pow(2).sum() for w in weights.values())).sqrt().item()
    size_mb = sum(sum(t.numel() * t.element_size() for t in [p, *s.as_dict(packed=True).values()])
                  for p, s in quantized.values()) / 2**20
    print(f"quantized to {args.quant_type}{' + double quant' if dq else ''}, blocksize {args.blocksize}: "
          f"{bits:.3f} bits/weight, {size_mb:.2f} MiB (bf16: {2 * n_params / 2**20:.2f} MiB)")
    print(f"relative RMS error of the dequantized weights: {rel:.4f}")
    print(f"quantize {1e3 * (t1 - t0):.1f} ms, dequantize {1e3 * (t2 - t1):.1f} ms for all {len(weights)} "
          "weights (first call includes warm-up)")
    if mismatches:
        print(f"FAILED: {mismatches} weights differ from the reference quantization")
        return 1
    print("packed bytes equal the reference bit for bit: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
