"""QLoRA training throughput and memory on LLaMA-shaped random models (H100).

Three implementations of the same job - LoRA r=64, alpha=16 on every linear layer (not the LM
head), gradient checkpointing, bf16 compute, micro-batch B x S random tokens, loss on every
token, max grad norm 0.3 - each in a fresh subprocess so that its memory peaks are its own:

* ``ours``: qlora_kernels' NF4 + double-quant model built layer by layer
  (``qlora_kernels.train.model.random_model``), bf16 ``LoRALinear4bit`` adapters, ``PagedAdamW``
  (gradients accumulated in its flat buffer), the trainer's loss (the LM head in chunks,
  ``qlora_kernels.train.loss``); ``--compile`` compiles its decoder layers, ``--cuda-graphs`` replays each step's forward and
  backward as a CUDA graph (``qlora_kernels.train.graphs``), and with it the optimizer's paged
  state is updated under the next step's forward (``step(defer_host_pages=True)``; ``--no-defer``
  turns that off). Between steps only the training stream is synchronized, so a step's time
  includes the previous step's paging wherever the forward has to wait for it;
* ``bnb``: transformers + peft + bitsandbytes (NF4 + double quant ``bnb.nn.Linear4bit``,
  ``prepare_model_for_kbit_training``, ``bnb.optim.PagedAdamW32bit``), when importable;
* ``bf16``: peft LoRA on the bf16 model (``torch.optim.AdamW``), when the model fits.

Per implementation: tokens/s over the timed steps, the allocator's peak
(``torch.cuda.max_memory_allocated``) and the device-level peak (``torch.cuda.mem_get_info``:
total - free, sampled after forward, backward and the optimizer step of every step; it counts
the CUDA context and memory outside the allocator too).

    python benchmarks/bench_train.py --model-config 7b --batch 4 --seq 512
    python benchmarks/bench_train.py --model-config 65b --batch 1 --seq 512 --impl ours,bnb
    python benchmarks/bench_train.py --model-config 65b --batch 1 --seq 512 --impl ours --compile \
        --cuda-graphs --max-memory-gib 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from qlora_kernels.train import model as model_mod  # noqa: E402  (torch and transformers load lazily)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")



def _device_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def _bf16_llama(name: str, seq: int, swap_linears=None):
    """The bf16 LLaMA of shape ``name`` with random weights, materialized on the GPU one layer at
    a time (``qlora_kernels.train.model._random_fill``: matrices N(0, 0.02), vectors 1; layer i
    seeded with i). ``swap_linears(layer, gen)``, if given, first replaces a layer's linears."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(model_mod.llama_config(name, max(seq, 2048))).to(torch.bfloat16)
    gen = torch.Generator("cuda")
    _, layers = model_mod.decoder_layers(model)
    for i, layer in enumerate(layers):
        gen.manual_seed(i)
        if swap_linears is not None:
            swap_linears(layer, gen)
        model_mod._random_fill(layer, "cuda", torch.bfloat16, gen)
    model_mod._random_fill(model, "cuda", torch.bfloat16, gen)
    model_mod._rebuild_rotary(model, "cuda")
    return model


def build_ours(name, seq, dropout, compile_layers=False, max_memory_gib=None):
    from qlora_kernels import add_lora
    from qlora_kernels.optim import PagedAdamW

    model = model_mod.random_model(name, "cuda", torch.bfloat16, seed=0, max_position_embeddings=max(seq, 2048))
    # bf16 adapters, as the paper's code (PagedAdamW still updates them in float32 arithmetic)
    add_lora(model, r=64, alpha=16, dropout=dropout, lora_dtype=torch.bfloat16)
    model_mod.enable_checkpointing(model)
    if compile_layers:
        model_mod.compile_decoder_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    limit = int(max_memory_gib * 2**30) if max_memory_gib else None
    return model, params, PagedAdamW(params, lr=2e-4, betas=(0.9, 0.999), device_limit_bytes=limit)


def build_bnb(name, seq, dropout):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from torch import nn

    def to_bnb_4bit(layer, gen):
        for lname, lin in list(layer.named_modules()):
            if not isinstance(lin, nn.Linear):
                continue
            W = torch.empty(lin.weight.shape, dtype=torch.bfloat16, device="cuda").normal_(0.0, 0.02, generator=gen)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(W, requires_grad=False, compress_statistics=True, quant_type="nf4")
            q.weight = q.weight.to("cuda")  # quantizes here; the bf16 W is dropped
            del W
            parent, _, leaf = lname.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, leaf, q)

    model = _bf16_llama(name, seq, to_bnb_4bit)
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=dropout, target_modules=list(TARGETS),
                                             bias="none", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, bnb.optim.PagedAdamW32bit(params, lr=2e-4, betas=(0.9, 0.999))


def build_bf16(name, seq, dropout):
    from peft import LoraConfig, get_peft_model

    model = _bf16_llama(name, seq)
    model.requires_grad_(False)
    model_mod.enable_checkpointing(model)
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=dropout, target_modules=list(TARGETS),
                                             bias="none", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999))


BUILDERS = {"ours": build_ours, "bnb": build_bnb, "bf16": build_bf16}


def _chunked_loss(args) -> bool:
    """--loss auto: each stack's default, the chunked LM-head loss for ours (as qlora-train) and
    the full logits for bnb and bf16 (as transformers computes them); chunked/full: every arm the
    same, to compare the layers and optimizers alone."""
    return args.loss == "chunked" or (args.loss == "auto" and args.impl == "ours")


def _mean_loss(model, ids, chunked: bool):
    """Mean next-token loss: the LM head in checkpointed chunks (``qlora_kernels.train.loss``,
    the full logits never sit in memory) or the full logits."""
    import torch.nn.functional as F

    if chunked:
        from qlora_kernels.train.loss import lm_loss_sum

        return lm_loss_sum(model, ids, ids) / ids[:, 1:].numel()
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def worker(args) -> dict:
    """One implementation, in this (fresh) process; returns its measurements."""
    torch.manual_seed(0)
    dropout = 0.05 if args.model_config in ("33b", "65b") else 0.1
    t0 = time.perf_counter()
    extra = {"compile_layers": args.compile, "max_memory_gib": args.max_memory_gib} if args.impl == "ours" else {}
    model, params, opt = BUILDERS[args.impl](args.model_config, args.seq, dropout, **extra)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    model.train()
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator("cuda").manual_seed(1)
    device_peak = _device_used()
    after_build = device_peak
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    graphed = None
    for step in range(args.warmup + args.steps):
        ids = torch.randint(3, vocab, (args.batch, args.seq), device="cuda", generator=gen)
        if args.cuda_graphs and graphed is None and step >= 1:
            # after one eager step (compiles, gives PagedAdamW its flat gradient buffer); the
            # capture happens in this untimed step
            from qlora_kernels.train.graphs import GraphedStep

            chunked = _chunked_loss(args)
            # ours: the graphs wait for PagedAdamW's deferred host pages layer by layer
            graphed = GraphedStep(model, params, lambda m, x: _mean_loss(m, x, chunked),
                                  optimizer=opt if args.impl == "ours" and not args.no_defer else None)
        # the training stream only, not the device: the previous step's deferred host pages
        # (PagedAdamW, --cuda-graphs) must still be running when this step's clock starts
        torch.cuda.current_stream().synchronize()
        t = time.perf_counter()
        if graphed is not None:
            loss = graphed(ids)  # forward and backward in one replay
            device_peak = max(device_peak, _device_used())
        else:
            loss = _mean_loss(model, ids, _chunked_loss(args))
            device_peak = max(device_peak, _device_used())
            loss.backward()
        device_peak = max(device_peak, _device_used())
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        _optimizer_step(opt, graphed)
        opt.zero_grad(set_to_none=args.impl != "ours")
        device_peak = max(device_peak, _device_used())
        losses.append(loss.item())
        del loss  # its autograd graph too (a CUDA graph capture must not find it alive)
        # the training stream only: PagedAdamW's deferred host pages (with --cuda-graphs) run on
        # past this point, under the next step's forward, whose graph waits for them. So a step's
        # time holds the previous step's paging, as in a training run; the last one's is drained
        # after the loop (drain_ms)
        torch.cuda.current_stream().synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    t = time.perf_counter()
    torch.cuda.synchronize()
    drain_ms = 1e3 * (time.perf_counter() - t)
    if args.profile:
        _profile_step(model, opt, params, vocab, args, gen, graphed)
    tokens = args.batch * args.seq
    return {
        "impl": args.impl, "chunked_loss": _chunked_loss(args),
        "compiled": bool(args.compile and args.impl == "ours"),
        "cuda_graphs": bool(graphed is not None),
        "deferred_host_pages": bool(graphed is not None and graphed.optimizer is opt and opt.state_bytes()["host"] > 0),
        "layer_waits": graphed.layer_waits if graphed is not None else None,
        "drain_ms": round(drain_ms, 1),
        "optimizer_state_gib": ({k: round(v / 2**30, 3) for k, v in opt.state_bytes().items()}
                                if hasattr(opt, "state_bytes") else None),
        "max_memory_gib": args.max_memory_gib if args.impl == "ours" else None,
        "model_config": args.model_config, "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "build_s": round(build_s, 2),
        "tokens_per_s": round(tokens * len(times) / sum(times), 1),
        "step_ms_median": round(1e3 * sorted(times)[len(times) // 2], 1),
        "allocator_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "device_peak_gib": round(device_peak / 2**30, 3),
        "device_after_build_gib": round(after_build / 2**30, 3),
        "trainable_params": sum(p.numel() for p in params),
        "losses": [round(x, 4) for x in losses],
    }


def _optimizer_step(opt, graphed) -> None:
    """opt.step(); PagedAdamW's host pages deferred into the next replay when the graphs wait
    for them (GraphedStep made with the optimizer)."""
    if graphed is not None and graphed.optimizer is opt:
        opt.step(defer_host_pages=True)
    else:
        opt.step()


def _one_step(model, opt, params, ids, args, graphed=None) -> None:
    """One training step, synchronized at the end (the timed loop does the same with memory
    samples in between)."""
    if graphed is not None:
        graphed(ids)
    else:
        _mean_loss(model, ids, _chunked_loss(args)).backward()
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    _optimizer_step(opt, graphed)
    opt.zero_grad(set_to_none=args.impl != "ours")
    torch.cuda.synchronize()


def _profile_step(model, opt, params, vocab, args, gen, graphed=None) -> None:
    """One more step under torch.profiler: the GPU kernels by total time, to stderr."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(3, vocab, (args.batch, args.seq), device="cuda", generator=gen)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _one_step(model, opt, params, ids, args, graphed)
    wall = time.perf_counter() - t
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"# profiled step ({args.impl}): wall {wall * 1e3:.1f} ms (profiler on), GPU kernels "
          f"{gpu_us / 1e3:.1f} ms", file=sys.stderr)
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.profile, max_name_column_width=60),
          file=sys.stderr)
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.profile, max_name_column_width=60),
          file=sys.stderr)
    # and the Python side (torch.profiler does not see time spent in Python between ops)
    import cProfile
    import io
    import pstats

    ids = torch.randint(3, vocab, (args.batch, args.seq), device="cuda", generator=gen)
    torch.cuda.synchronize()
    py = cProfile.Profile()
    py.enable()
    _one_step(model, opt, params, ids, args, graphed)
    py.disable()
    text = io.StringIO()
    pstats.Stats(py, stream=text).sort_stats("tottime").print_stats(args.profile)
    print(text.getvalue(), file=sys.stderr)


def fits_bf16(name: str) -> bool:
    from qlora_kernels.train.config import MODEL_SHAPES

    s = MODEL_SHAPES[name]
    n = s["num_hidden_layers"] * (4 * s["hidden_size"] ** 2 + 3 * s["hidden_size"] * s["intermediate_size"])
    n += 2 * s["vocab_size"] * s["hidden_size"]
    return 2 * n < 0.75 * torch.cuda.get_device_properties(0).total_memory


def available(impl: str) -> str | None:
    """Why ``impl`` cannot run here, or None."""
    if impl == "bnb":
        try:
            import bitsandbytes  # noqa: F401
            import peft  # noqa: F401
        except Exception as err:  # noqa: BLE001  (a broken install only skips the baseline)
            return f"bitsandbytes/peft not importable: {err}"
    if impl == "bf16":
        try:
            import peft  # noqa: F401
        except ImportError as err:
            return f"peft not importable: {err}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", default="7b", choices=["tiny", "7b", "13b", "33b", "65b"])
    ap.add_argument("--batch", type=int, default=4, help="micro-batch (sequences)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--impl", default="ours,bnb,bf16", help="comma-separated: ours, bnb, bf16")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per implementation")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<gpu>/train_<cfg>.json)")
    ap.add_argument("--compile", action="store_true",
                    help="ours: torch.compile each decoder layer (qlora_kernels.train.model.compile_decoder_layers)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="ours: forward + backward as one CUDA graph replay per step "
                         "(qlora_kernels.train.graphs.GraphedStep), captured in the second warmup step")
    ap.add_argument("--no-defer", action="store_true",
                    help="ours with --cuda-graphs: step PagedAdamW's host pages before the next replay instead of "
                         "deferring them into it (step(defer_host_pages=True)); for comparison")
    ap.add_argument("--max-memory-gib", type=float, default=None,
                    help="ours: keep the card's use under this; PagedAdamW pages what does not fit "
                         "(PagedAdamW(device_limit_bytes=...))")
    ap.add_argument("--loss", choices=["auto", "chunked", "full"], default="auto",
                    help="auto: each stack's default (ours chunked LM-head loss, bnb/bf16 full logits); "
                         "chunked or full: the same for every arm")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="after the timed steps, profile one step and print its top ROWS GPU kernels")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    import common

    rows, skipped = [], {}
    for impl in [s.strip() for s in args.impl.split(",") if s.strip()]:
        if impl not in BUILDERS:
            raise SystemExit(f"--impl: expected ours, bnb or bf16, got {impl!r}")
        why = available(impl) or (None if impl != "bf16" or fits_bf16(args.model_config)
                                  else "the bf16 model does not fit the card")
        if why:
            skipped[impl] = why
            print(f"{impl:5s} skipped: {why}")
            continue
        # every arm gets the same allocator setting (qlora-train sets it too)
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF",
                                                                      "expandable_segments:True"))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--model-config",
               args.model_config, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--profile", str(args.profile), "--loss", args.loss]
        if args.compile:
            cmd.append("--compile")
        if args.cuda_graphs and impl == "ours":
            cmd.append("--cuda-graphs")
            if args.no_defer:
                cmd.append("--no-defer")
        if args.max_memory_gib:
            cmd += ["--max-memory-gib", str(args.max_memory_gib)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            skipped[impl] = f"timed out after {args.timeout} s"
            print(f"{impl:5s} {skipped[impl]}")
            continue
        if args.profile:
            print(proc.stderr[proc.stderr.find("# profiled step"):] if "# profiled step" in proc.stderr else "", flush=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            skipped[impl] = f"failed (exit {proc.returncode}): {' | '.join(tail)}"
            print(f"{impl:5s} {skipped[impl]}")
            continue
        row = json.loads(lines[-1][len("RESULT "):])
        rows.append(row)
        print(f"{impl:5s} {args.model_config} {args.batch}x{args.seq}: {row['tokens_per_s']:8.1f} tokens/s, "
              f"allocator peak {row['allocator_peak_gib']:6.2f} GiB, device peak {row['device_peak_gib']:6.2f} GiB "
              f"(build {row['build_s']:.0f} s, loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f})", flush=True)
    by = {r["impl"]: r for r in rows}
    if "ours" in by:
        for other in ("bnb", "bf16"):
            if other in by:
                print(f"ours vs {other}: {by['ours']['tokens_per_s'] / by[other]['tokens_per_s']:.2f}x tokens/s, "
                      f"device peak {by['ours']['device_peak_gib']:.2f} vs {by[other]['device_peak_gib']:.2f} GiB")
    name = f"train_{args.model_config}_{args.batch}x{args.seq}"
    path = common.save({"environment": common.environment(), "args": vars(args), "rows": rows, "skipped": skipped},
                       name, args.out)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
