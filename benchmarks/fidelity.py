"""Does 4-bit QLoRA match 16-bit LoRA? The QLoRA paper's central claim, on a model of ours.

1. Pretrain a small LLaMA-architecture model (byte-level, random init) on text every Python
   install has offline: the docstrings of the standard library (read with ``ast`` from the
   source files, nothing imported), except those of held-out modules.
2. Finetune it on a held-out task built from the held-out modules - Alpaca records "summarize
   the function ``name(args)``" -> the first line of its docstring - twice, same seed, same
   data order, same LoRA init (r=64, alpha=16, all linear layers, dropout 0.1):
   (a) bf16 LoRA: peft on the bf16 model, torch AdamW;
   (b) QLoRA: the same weights loaded through ``qlora_kernels.train.model.pretrained_model``
       (NF4 + double quant, layer by layer), ``add_lora``, ``PagedAdamW``.
3. Report both held-out losses (target tokens only); the claim holds if (b) is within 1% of (a).

    python benchmarks/fidelity.py                 # GPU, 144 s on an H100
    python benchmarks/fidelity.py --size small    # a smaller model, runs on a CPU (~30 min on 2 cores)
    python benchmarks/fidelity.py --quick         # a smoke test of every stage (CPU: ~1 min)

On a CPU both arms compute in float32 (bf16 matmuls are slow there): arm (a) is then float32
LoRA, and the comparison isolates the 4-bit base weight.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import random
import sys
import sysconfig
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from qlora_kernels.train import data as data_mod  # noqa: E402
from qlora_kernels.train.config import MODEL_SHAPES  # noqa: E402  (--size small is the tiny shape)
from qlora_kernels.train.tokenizer import ByteTokenizer  # noqa: E402

SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, vocab_size=320)
QUICK_SHAPE = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=2, vocab_size=320)


def held_out(module_name: str) -> bool:
    # a fixed, arbitrary cut of the standard library: modules whose name hashes to 0 mod 5
    return sum(module_name.encode()) % 5 == 0


def stdlib_docs(limit_files: int | None = None):
    """``(pretraining texts, task records)`` from the standard library's source files."""
    root = sysconfig.get_paths()["stdlib"]
    texts, records = [], []
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib", "site-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    for path in files[:limit_files]:
        module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        hold = held_out(module.split(".")[0])
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or not doc.isascii():
                continue
            if not hold:
                texts.append(doc)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                summary = doc.strip().splitlines()[0].strip()
                args = ", ".join(a.arg for a in node.args.args)
                if 10 <= len(summary) <= 120:
                    records.append({"instruction": "Summarize what this Python function does.",
                                    "input": f"{module}.{node.name}({args})", "output": summary})
    return texts, records


def pretrain(texts, shape, steps, batch, seq, device, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = ByteTokenizer()
    stream = []
    for t in texts:
        stream += [tok.bos_token_id] + tok.encode(t) + [tok.eos_token_id]
    data = torch.tensor(stream, dtype=torch.long)
    n_chunks = len(data) // seq
    data = data[: n_chunks * seq].view(n_chunks, seq)
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=1024,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=False)
    model = LlamaForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    model.train()
    for step in range(steps):
        lr = 1e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        ids = data[torch.randint(0, n_chunks, (batch,), generator=gen)].to(device)
        with amp:
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  pretrain step {step:5d}: loss {loss.item():.3f}", flush=True)
    return model


def finetune(model, params, opt, train_set, eval_set, steps, batch, device, seed):
    """The same loop for both arms: fixed batch order from ``seed``, returns eval losses."""
    from qlora_kernels.train.loop import evaluate, token_loss_sum

    torch.manual_seed(seed)  # dropout masks
    lengths = [len(e) for e in train_set]
    order = []
    epoch = 0
    while len(order) < steps:
        order += data_mod.epoch_batches(lengths, batch, seed, epoch)
        epoch += 1
    model.train()
    for step in range(steps):
        loss, n = token_loss_sum(model, data_mod.collate([train_set[i] for i in order[step]], 0), device)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return evaluate(model, eval_set, 32, 0, device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check the stages run (CPU is fine)")
    ap.add_argument("--size", choices=["full", "small"], default="full",
                    help="full: 8 layers x 512 (GPU); small: 4 layers x 256, sequences of 128 (runs on a CPU)")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default: 1500 (full), 600 (small)")
    ap.add_argument("--finetune-steps", type=int, default=None, help="default: 300 (full), 200 (small)")
    ap.add_argument("--lr", type=float, default=5e-4, help="finetuning learning rate (both arms)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<gpu>/fidelity.json)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick and args.size == "full":
        print("fidelity.py: the full size needs a CUDA GPU (--size small runs on a CPU, --quick is a smoke test)",
              file=sys.stderr)
        return 2
    if args.quick:
        shape, seq, pre_batch, ft_batch, pre_steps, ft_steps = QUICK_SHAPE, 128, 8, 8, 20, 10
    elif args.size == "small":
        shape, seq, pre_batch, ft_batch, pre_steps, ft_steps = MODEL_SHAPES["tiny"], 128, 16, 16, 600, 200
    else:
        shape, seq, pre_batch, ft_batch, pre_steps, ft_steps = SHAPE, 256, 64, 16, 1500, 300
    pre_steps = args.pretrain_steps or pre_steps
    ft_steps = args.finetune_steps or ft_steps
    t0 = time.perf_counter()
    texts, records = stdlib_docs(limit_files=60 if args.quick else None)
    print(f"corpus: {len(texts)} docstrings ({sum(map(len, texts)) / 1e6:.1f} MB) to pretrain on; "
          f"{len(records)} held-out function summaries for the task")
    tok = ByteTokenizer()
    examples = [data_mod.encode_record(r, tok, template="alpaca-short", source_max_len=384, target_max_len=128,
                                       train_on_source=False) for r in records]
    train_set, eval_set = data_mod.split(examples, 0.2, 512, args.seed)
    base = pretrain(texts, shape, pre_steps, pre_batch, seq, device, args.seed)
    print(f"pretrained in {time.perf_counter() - t0:.0f} s")

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_kernels import add_lora
    from qlora_kernels.optim import PagedAdamW
    from qlora_kernels.train.loop import evaluate
    from qlora_kernels.train.model import pretrained_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {"compute_dtype": str(dtype).removeprefix("torch.")}  # of both arms ("lora_bf16" is arm (a))
    with tempfile.TemporaryDirectory() as tmp:
        base.to(dtype).save_pretrained(tmp)
        del base
        # (a) 16-bit LoRA with peft
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device)
        results["base_eval_loss_bf16"] = evaluate(model, eval_set, 32, 0, device)
        torch.manual_seed(args.seed)  # LoRA init
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear",
                                                 bias="none", task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999))
        results["lora_bf16_eval_loss"] = finetune(model, params, opt, train_set, eval_set, ft_steps, ft_batch,
                                                  device, args.seed)
        arm_a = "bf16 LoRA" if dtype == torch.bfloat16 else "fp32 LoRA"
        print(f"(a) {arm_a}:     held-out loss {results['lora_bf16_eval_loss']:.4f}", flush=True)
        del model, opt, params
        # (b) QLoRA: the same checkpoint through our layer-by-layer NF4 + double-quant loader
        model = pretrained_model(tmp, device, dtype)
        results["base_eval_loss_nf4"] = evaluate(model, eval_set, 32, 0, device)
        torch.manual_seed(args.seed)
        add_lora(model, r=64, alpha=16, dropout=0.1)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = PagedAdamW(params, lr=args.lr, betas=(0.9, 0.999))
        results["qlora_nf4_eval_loss"] = finetune(model, params, opt, train_set, eval_set, ft_steps, ft_batch,
                                                  device, args.seed)
        print(f"(b) NF4+DQ QLoRA:  held-out loss {results['qlora_nf4_eval_loss']:.4f}")
    rel = results["qlora_nf4_eval_loss"] / results["lora_bf16_eval_loss"] - 1
    results["relative_difference"] = rel
    results["within_1_percent"] = abs(rel) <= 0.01
    print(f"before finetuning: 16/32-bit {results['base_eval_loss_bf16']:.4f}, NF4 {results['base_eval_loss_nf4']:.4f}; "
          f"QLoRA vs {'bf16' if dtype == torch.bfloat16 else 'fp32'} LoRA: {100 * rel:+.2f}% ({'within' if abs(rel) <= 0.01 else 'NOT within'} 1%); "
          f"total {time.perf_counter() - t0:.0f} s")
    if not args.quick:
        import common

        name = "fidelity" if args.size == "full" else f"fidelity_{args.size}_{device.type}"
        print("saved", common.save({"environment": common.environment(), "device": str(device), "args": vars(args),
                                    "shape": shape, "results": results}, name, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
