"""``qlora-train`` / ``python -m qlora_kernels.train``: the command line of the trainer.

Every flag is a :class:`TrainConfig` field (``--batch-size`` is ``batch_size``); a recipe flag
left out takes the QLoRA paper's Table 8 value for the model's size.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .config import COMPUTE_DTYPES, LR_SCHEDULES, MODEL_SHAPES, TEMPLATES, TrainConfig

HELP = {
    "model": "local directory of a Hugging Face causal LM (config.json, *.safetensors, tokenizer); "
             "quantized to 4 bits layer by layer as it loads. Default: a random-weight LLaMA of --model-config",
    "model_config": f"LLaMA shape with random weights when no --model is given: {', '.join(MODEL_SHAPES)}",
    "max_position_embeddings": "context length of a --model-config model",
    "quant_type": "4-bit data type of the frozen weights: nf4 or fp4",
    "blocksize": "weights per absmax block",
    "double_quant": "quantize the absmax values too (8-bit, blocks of 256)",
    "compute_dtype": "dtype of activations, embeddings, norms and LM head; auto: bf16 on a GPU, fp32 on the CPU",
    "device": "cuda, cuda:1, cpu; default: cuda when available",
    "gradient_checkpointing": "recompute activations in the backward pass (saves memory)",
    "compile": "torch.compile each decoder layer: fused elementwise kernels and far less Python per step "
               "(the first steps compile, ~1 min); CUDA only",
    "cuda_graphs": "capture each micro-batch's forward and backward as a CUDA graph (one per padded batch "
                   "shape, lengths rounded up to a multiple of 64) and replay it: the CPU no longer launches "
                   "every kernel, which is what bounds a step on a fast GPU; best with --compile; CUDA only",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha (the update is scaled by alpha / r)",
    "lora_dropout": "dropout on the LoRA input; default: Table 8 (0.1, 0.05 from 33B up)",
    "max_memory_gib": "keep the GPU's use (as nvidia-smi counts it) under this many GiB: the optimizer state "
                      "that does not fit is paged to pinned host memory; default: page only when the card runs short",
    "lora_dtype": "dtype of the LoRA weights and their gradients; auto: the compute dtype (bf16 on a GPU, as the "
                  "paper's code; the optimizer still does its arithmetic in float32), fp32 for float32 adapters",
    "lora_target": "all-linear (every linear layer but the LM head) or comma-separated name suffixes, e.g. q_proj,v_proj",
    "dataset": "JSONL file of Alpaca (instruction, input, output), chat (messages) or text records, or a .txt "
               "file; default: the built-in instruction data",
    "template": "prompt template of Alpaca records; auto: alpaca for a --dataset, alpaca-short for the built-in data",
    "source_max_len": "maximum prompt tokens (longer prompts are cut)",
    "target_max_len": "maximum answer tokens (longer answers are cut)",
    "train_on_source": "also compute the loss on prompt tokens",
    "eval_fraction": "fraction of the examples held out for the evaluation loss",
    "max_eval_examples": "at most this many held-out examples",
    "group_by_length": "batch sequences of similar length together (less padding)",
    "learning_rate": "default: Table 8 (2e-4, 1e-4 from 33B up)",
    "lr_schedule": "learning-rate schedule after warmup",
    "warmup_steps": "linear warmup steps",
    "adam_beta1": "AdamW beta1", "adam_beta2": "AdamW beta2", "adam_eps": "AdamW epsilon",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "batch_size": "sequences per micro-batch; default: Table 8 preset",
    "grad_accum": "micro-batches per optimizer step; default: Table 8 preset",
    "max_steps": "optimizer steps (0: run --num-epochs); default: preset (150 for the built-in demo, 1875 otherwise)",
    "num_epochs": "epochs when --max-steps is 0",
    "seed": "seed of the data split and order, the random weights and dropout",
    "output_dir": "where checkpoints, the adapter, metrics.jsonl and loss.png go",
    "save_steps": "write a checkpoint every N steps (0: only at the end)",
    "save_total_limit": "keep this many most recent checkpoints",
    "eval_steps": "evaluate on the held-out split every N steps (0: only at the end)",
    "log_steps": "write a metrics line every N steps",
    "resume": "continue from the latest checkpoint in --output-dir",
    "progress": "show a progress bar",
    "sample_prompt": "instruction to answer at the end (default: the first held-out example)",
    "sample_max_new_tokens": "tokens of the sample answer (0: no sample)",
    "plot": "write loss.png at the end",
}
CHOICES = {"model_config": list(MODEL_SHAPES), "compute_dtype": list(COMPUTE_DTYPES),
           "lora_dtype": list(COMPUTE_DTYPES), "template": list(TEMPLATES),
           "lr_schedule": list(LR_SCHEDULES), "quant_type": ["nf4", "fp4"]}
TYPES = {"model": str, "dataset": str, "device": str, "sample_prompt": str, "lora_dropout": float, "max_memory_gib": float,
         "learning_rate": float, "batch_size": int, "grad_accum": int, "max_steps": int}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qlora-train",
        description="QLoRA finetuning on qlora_kernels' 4-bit ops. With no arguments: a small random-weight "
                    "LLaMA learns the built-in instruction data (a few minutes on a CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=HELP[f.name])
            continue
        kind = TYPES.get(f.name) or {"int": int, "float": float, "str": str}[f.type]
        ap.add_argument(flag, type=kind, default=f.default, choices=CHOICES.get(f.name), help=HELP[f.name],
                        metavar=None if f.name in CHOICES else f.name.upper())
    return ap


def parse_config(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))


def main(argv=None) -> int:
    config = parse_config(argv)
    # Expandable segments let the caching allocator grow blocks in place instead of keeping
    # differently sized cached blocks side by side: on a 7B step that is ~1.5 GiB less device
    # memory for the same allocator peak. Read at the first CUDA allocation, so set it here;
    # a user's own setting wins.
    if not os.environ.get("PYTORCH_CUDA_ALLOC_CONF") and not os.environ.get("PYTORCH_ALLOC_CONF"):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    from .loop import TrainingError, train

    try:
        result = train(config)
    except (TrainingError, ValueError) as err:
        print(f"qlora-train: error: {err}", file=sys.stderr)
        return 1
    losses = [loss for _, loss in result.losses]
    if losses:
        head = sum(losses[:5]) / len(losses[:5])
        tail = sum(losses[-5:]) / len(losses[-5:])
        print(f"train loss {head:.3f} (first steps) -> {tail:.3f} (last steps)", end="")
        print(f"; held-out loss {result.eval_losses[-1][1]:.3f}" if result.eval_losses else "")
    print(f"adapter (peft format): {result.adapter_dir}")
    print(f"metrics: {result.metrics_path}" + (f"; loss curves: {result.plot_path}" if result.plot_path else ""))
    if result.sample_prompt:
        print(f"sample prompt:\n{result.sample_prompt}")
        print(f"sample answer (greedy): {result.sample_answer}")
    return 0
