"""``TrainConfig``: every option of the trainer, with the QLoRA paper's recipe as defaults.

The presets are the paper's Table 8 (Dettmers et al. 2023, appendix B.2): LoRA r=64,
alpha=16 on every linear layer, dropout 0.1 up to 13B and 0.05 from 33B up, AdamW with
beta2=0.999, max grad norm 0.3, a constant learning rate of 2e-4 (1e-4 from 33B up),
gradient checkpointing, bf16 compute and group-by-length batching. Table 8's batch size is
16 sequences per optimizer step for most datasets, for 1875 steps; we reach it with gradient
accumulation over micro-batches that fit the card.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

#: LLaMA shapes for ``--model-config``: hidden, intermediate, layers, heads, vocab.
MODEL_SHAPES: dict[str, dict] = {
    # the built-in default: small enough to learn the built-in data on 2 CPU cores in minutes
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 vocab_size=320),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                vocab_size=32000),
    "33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                vocab_size=32000),
    "65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                vocab_size=32000),
}

#: Table 8 of the QLoRA paper, by model size: what changes from one size to the next.
PRESETS: dict[str, dict] = {
    # not in Table 8: the built-in demo, a random-weight model that must show learning in
    # ~150 CPU steps, so a larger learning rate
    "tiny": dict(lora_dropout=0.1, learning_rate=2e-3, batch_size=8, grad_accum=1, max_steps=150),
    "7b": dict(lora_dropout=0.1, learning_rate=2e-4, batch_size=4, grad_accum=4, max_steps=1875),
    "13b": dict(lora_dropout=0.1, learning_rate=2e-4, batch_size=4, grad_accum=4, max_steps=1875),
    "33b": dict(lora_dropout=0.05, learning_rate=1e-4, batch_size=1, grad_accum=16, max_steps=1875),
    "65b": dict(lora_dropout=0.05, learning_rate=1e-4, batch_size=1, grad_accum=16, max_steps=1875),
}

COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
TEMPLATES = ("auto", "alpaca", "alpaca-short", "none")
LR_SCHEDULES = ("constant", "linear", "cosine")


def preset_for_parameters(n_params: float) -> str:
    """The Table 8 row for a model of ``n_params`` parameters (the nearest size at or below)."""
    for name, limit in (("65b", 50e9), ("33b", 25e9), ("13b", 10e9), ("7b", 3e9)):
        if n_params >= limit:
            return name
    return "tiny"


@dataclass
class TrainConfig:
    """Options of :func:`qlora_kernels.train.train` (the CLI flags are these names with dashes).

    ``None`` in a recipe field (``lora_dropout``, ``learning_rate``, ``batch_size``,
    ``grad_accum``, ``max_steps``) means: take it from the Table 8 preset of the model's size.
    """

    # model
    model: str | None = None            # local HF directory; None: use model_config
    model_config: str = "tiny"          # tiny|7b|13b|33b|65b random-weight LLaMA shapes
    max_position_embeddings: int = 2048
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "auto"         # auto: bf16 on a GPU, fp32 on the CPU
    device: str | None = None           # None: cuda when available, else cpu
    gradient_checkpointing: bool = True
    compile: bool = False               # torch.compile each decoder layer (CUDA)
    cuda_graphs: bool = False           # forward + backward as CUDA graph replays (CUDA)
    max_memory_gib: float | None = None  # keep the card under this: the optimizer state pages the rest
    # LoRA
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float | None = None
    lora_target: str = "all-linear"     # or comma-separated module-name suffixes
    lora_dtype: str = "auto"            # auto: the compute dtype (bf16 on a GPU, as the paper's code)
    # data
    dataset: str | None = None          # JSONL / text file; None: the built-in instruction data
    template: str = "auto"              # auto: alpaca for files, alpaca-short for the built-in data
    source_max_len: int = 384
    target_max_len: int = 128
    train_on_source: bool = False
    eval_fraction: float = 0.05
    max_eval_examples: int = 256
    group_by_length: bool = True
    # optimization
    learning_rate: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    batch_size: int | None = None       # sequences per micro-batch
    grad_accum: int | None = None       # micro-batches per optimizer step
    max_steps: int | None = None        # optimizer steps; 0: run num_epochs; None: preset
    num_epochs: float = 1.0
    seed: int = 0
    # bookkeeping
    output_dir: str = "qlora-output"
    save_steps: int = 100
    save_total_limit: int = 2
    eval_steps: int = 50
    log_steps: int = 1
    resume: bool = False
    progress: bool = True
    sample_prompt: str | None = None    # None: the first held-out example
    sample_max_new_tokens: int = 48
    plot: bool = True

    def resolved(self, preset: str) -> "TrainConfig":
        """A copy with every ``None`` recipe field filled from ``PRESETS[preset]``."""
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
        values = {k: v for k, v in PRESETS[preset].items() if getattr(self, k) is None}
        return dataclasses.replace(self, **values)

    def validate(self) -> None:
        """Raises ValueError naming the first bad option."""
        def check(cond, name, expected):
            if not cond:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        if self.model is None:
            check(self.model_config in MODEL_SHAPES, "model_config", f"one of {sorted(MODEL_SHAPES)}")
        check(self.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"one of {COMPUTE_DTYPES}")
        check(self.lora_dtype in COMPUTE_DTYPES, "lora_dtype", f"one of {COMPUTE_DTYPES}")
        check(self.max_memory_gib is None or 0 < self.max_memory_gib < math.inf, "max_memory_gib",
              "a positive, finite number of GiB")
        check(self.template in TEMPLATES, "template", f"one of {TEMPLATES}")
        check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {LR_SCHEDULES}")
        check(self.lora_r > 0, "lora_r", "a positive integer")
        check(self.lora_dropout is None or 0.0 <= self.lora_dropout < 1.0, "lora_dropout", "a value in [0, 1)")
        check(self.learning_rate is None or self.learning_rate > 0, "learning_rate", "a positive number")
        check(self.batch_size is None or self.batch_size > 0, "batch_size", "a positive integer")
        check(self.grad_accum is None or self.grad_accum > 0, "grad_accum", "a positive integer")
        check(self.source_max_len > 0, "source_max_len", "a positive integer")
        check(self.target_max_len > 0, "target_max_len", "a positive integer")
        check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "a value in [0, 1)")
        check(self.max_steps is None or self.max_steps >= 0, "max_steps", "0 (run num_epochs) or a positive integer")
        check(self.max_steps != 0 or self.num_epochs > 0, "num_epochs", "a positive number when max_steps is 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", "0 (no clipping) or a positive number")
        check(self.save_steps >= 0, "save_steps", "0 (only at the end) or a positive integer")
        check(self.eval_steps >= 0, "eval_steps", "0 (only at the end) or a positive integer")
        check(self.log_steps > 0, "log_steps", "a positive integer")
        check(self.save_total_limit >= 1, "save_total_limit", "at least 1")
        check(self.warmup_steps >= 0, "warmup_steps", "0 or a positive integer")
        check(self.source_max_len + self.target_max_len <= self.max_position_embeddings or self.model is not None,
              "max_position_embeddings", "at least source_max_len + target_max_len")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
