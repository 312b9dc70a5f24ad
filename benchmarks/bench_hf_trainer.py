"""transformers.Trainer step time on a 7B-shaped random LLaMA: our 4-bit + LoRA layers against
bitsandbytes + peft (when importable), the same Trainer settings for both.

Model: hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000 (LLaMA-7B's shapes),
random bf16 weights quantized to NF4 + double quant layer by layer on the GPU (never the whole
bf16 model at once); LoRA r=64, alpha=16, dropout 0.1 on every linear but lm_head (QLoRA's
setting). Trainer: micro-batch 4 x 512 tokens, bf16, gradient checkpointing (non-reentrant),
AdamW (torch), constant LR. Each variant runs in its own subprocess (clean CUDA memory and
allocator statistics); the step time is the median over the timed steps after warm-up, with a
CUDA synchronize at each step's start and end.

    python benchmarks/bench_hf_trainer.py                 # both, ~3-4 min on an H100
    python benchmarks/bench_hf_trainer.py --only ours --steps 5 --layers 4   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

RESULT_TAG = "BENCH_HF_TRAINER_RESULT "


def llama_config(layers: int, tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:  # a smoke-test size (CPU works)
        return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=96, max_position_embeddings=128,
                           tie_word_embeddings=False, use_cache=False)
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048,
                       tie_word_embeddings=False, use_cache=False)


class RandomWeights(Mapping):
    """A lazy state dict of random bf16 weights for a meta model, made on the GPU when asked for
    (norm weights 1, everything else N(0, 0.02^2)), so that no full-size float model exists."""

    def __init__(self, model, device):
        import torch

        self.shapes = {k: tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items()}
        self.device = device
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(0)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, key):
        import torch

        shape = self.shapes[key]
        if key.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16, device=self.device)
        t = torch.empty(shape, dtype=torch.bfloat16, device=self.device)
        return t.normal_(0.0, 0.02, generator=self.gen)


def build_ours(config, r, alpha, dropout, device):
    import torch

    import qlora_kernels as qk
    from qlora_kernels import hf

    model = hf.empty_model(config, dtype=torch.bfloat16)
    qk.quantize_model(model, weights=RandomWeights(model, device), device=device)
    qk.add_lora(model, r=r, alpha=alpha, dropout=dropout)
    qk.prepare_model_for_training(model)
    return model


def build_bnb(config, r, alpha, dropout, device):
    import bitsandbytes as bnb
    import peft
    import torch
    from torch import nn

    from qlora_kernels import hf
    from qlora_kernels.nn import set_submodule

    model = hf.empty_model(config, dtype=torch.bfloat16)
    weights = RandomWeights(model, device)
    # the modules transformers' BitsAndBytesConfig(load_in_4bit=True, nf4, double quant) puts in
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            W = weights[f"{name}.weight"]
            # quantized by bitsandbytes when moved to the device
            layer.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64).to(device)
            del W
            set_submodule(model, name, layer)
    hf._materialize_rest(model, weights, torch.device(device))
    model.to(device)
    lora = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                           task_type="CAUSAL_LM", bias="none")
    model = peft.get_peft_model(model, lora)
    model.config.use_cache = False
    return model


def child(args):
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    config = llama_config(args.layers, args.tiny)
    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    build = build_ours if args.child == "ours" else build_bnb
    model = build(config, args.r, args.alpha, args.dropout, args.device)
    sync()
    build_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class Data(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(1)
            self.ids = torch.randint(0, config.vocab_size, (n, args.seq), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    times, losses = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            times.append(time.perf_counter() - self.t)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    steps = args.warmup + args.steps
    targs = TrainingArguments(
        output_dir=os.path.join(args.tmp, args.child), max_steps=steps, per_device_train_batch_size=args.batch,
        learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, bf16=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, optim="adamw_torch", logging_steps=1,
        save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True, use_cpu=not cuda)
    trainer = Trainer(model=model, args=targs, train_dataset=Data(args.batch * steps), callbacks=[Timer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = times[args.warmup:]
    step_s = statistics.median(timed)
    tokens = args.batch * args.seq
    result = {
        "impl": args.child, "layers": args.layers, "micro_batch": args.batch, "seq": args.seq, "r": args.r,
        "trainable_params": trainable, "build_s": round(build_s, 1), "step_ms_median": step_s * 1e3,
        "step_ms_all": [t * 1e3 for t in times], "tokens_per_s": tokens / step_s,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0, "losses": losses,
    }
    if args.child == "ours":
        import qlora_kernels

        result["backend"] = qlora_kernels.backend()
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(impl, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--layers", str(args.layers),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--seq", str(args.seq), "--r", str(args.r), "--tmp", args.tmp, "--device", args.device]
    cmd += ["--tiny"] if args.tiny else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {"impl": impl, "error": f"exit {proc.returncode}", "output_tail": tail}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["ours", "bnb"], help="run one variant")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per variant")
    ap.add_argument("--tmp", default="/tmp/bench_hf_trainer")
    ap.add_argument("--json", default=None, help="where to save (default benchmarks/results/<gpu>/hf_trainer.json)")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (with --tiny: a smoke test)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model instead of the 7B shapes (smoke test)")
    ap.add_argument("--child", choices=["ours", "bnb"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import common
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_hf_trainer: needs a CUDA GPU (or --device cpu --tiny for a smoke test)")
    impls = [args.only] if args.only else ["ours", "bnb"]
    if "bnb" in impls:
        try:
            import bitsandbytes  # noqa: F401
            import peft  # noqa: F401
        except Exception as err:  # noqa: BLE001
            print(f"bitsandbytes + peft not importable ({err}): ours only")
            impls = [i for i in impls if i != "bnb"]
    rows = []
    print(f"{'impl':6} {'layers':>6} {'step ms':>9} {'tokens/s':>9} {'peak alloc GiB':>15} {'build s':>8}  first/last loss")
    for impl in impls:
        row = run_child(impl, args)
        rows.append(row)
        if "error" in row:
            print(f"{impl:6} failed: {row['error']}\n{row['output_tail']}")
            continue
        loss = f"{row['losses'][0]:.3f} / {row['losses'][-1]:.3f}" if row["losses"] else "-"
        print(f"{impl:6} {row['layers']:6d} {row['step_ms_median']:9.1f} {row['tokens_per_s']:9.0f} "
              f"{row['peak_allocated_gib']:15.2f} {row['build_s']:8.1f}  {loss}")
    ok = {r["impl"]: r for r in rows if "error" not in r}
    speedup = None
    if "ours" in ok and "bnb" in ok:
        speedup = ok["bnb"]["step_ms_median"] / ok["ours"]["step_ms_median"]
        print(f"speedup (bitsandbytes+peft step time / ours): {speedup:.2f}x")
    path = common.save({"env": common.environment(), "args": vars(args), "rows": rows, "speedup": speedup},
                       "hf_trainer", args.json)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
