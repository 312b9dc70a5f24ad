"""The training loop: :func:`train` runs one QLoRA finetuning job from a :class:`TrainConfig`.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` sequences. The loss of a
step is the sum of the token losses of all its micro-batches divided by their total number of
target tokens, so accumulation gives the same gradient as one big batch. A checkpoint holds
everything a resumed run needs to retrace the uninterrupted one exactly: the adapter (peft's
format), the optimizer state, the RNG states and the data position (the batch order of an
epoch is a pure function of the seed and the epoch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import peft_format
from . import data as data_mod
from . import model as model_mod
from .config import TrainConfig, preset_for_parameters
from .graphs import GraphCaptureError, GraphedStep
from .loss import lm_loss_sum

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
# options that must not change between a run and its resumption (the data order or the
# meaning of "step" would change)
RESUME_FIXED = ("model", "model_config", "dataset", "seed", "batch_size", "grad_accum", "group_by_length",
                "source_max_len", "target_max_len", "train_on_source", "eval_fraction", "lora_r", "lora_target",
                "lora_dtype")
# what a checkpoint written before an option existed meant by it
RESUME_DEFAULTS = {"lora_dtype": "fp32"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class TrainingError(RuntimeError):
    """A run that had to stop (NaN/Inf loss, out of memory); the message says why and what next."""


@dataclass
class TrainResult:
    output_dir: str
    adapter_dir: str
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)       # (step, train loss)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)
    sample_prompt: str = ""
    sample_answer: str = ""
    metrics_path: str = ""
    plot_path: str | None = None


# --------------------------------------------------------------------------------------------
# pieces
def resolve_device(config: TrainConfig) -> torch.device:
    if config.device:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {config.device!r} asked for, but torch sees no CUDA GPU")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of a ``compute_dtype`` / ``lora_dtype`` option."""
    if name == "auto":
        # bf16 is the paper's compute dtype; CPUs without bf16 units run it slowly and less exactly
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def build_tokenizer(config: TrainConfig):
    if config.model is None:
        return model_mod.ByteTokenizer()
    if not os.path.isdir(config.model):
        raise model_mod.ModelError(f"model: expected a local directory holding a Hugging Face causal LM "
                                   f"(config.json, *.safetensors, tokenizer files), got {config.model!r}: "
                                   "no such directory")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
    except (OSError, ValueError) as err:
        raise model_mod.ModelError(f"model: expected tokenizer files (tokenizer.json or tokenizer.model) "
                                   f"in {config.model!r}: {err}") from err
    return model_mod.HFTokenizer(tok)


def build_model(config: TrainConfig, device, dtype):
    quant = dict(quant_type=config.quant_type, blocksize=config.blocksize, double_quant=config.double_quant)
    if config.model is None:
        model = model_mod.random_model(config.model_config, device, dtype, config.seed,
                                          max_position_embeddings=config.max_position_embeddings, **quant)
    else:
        model = model_mod.pretrained_model(config.model, device, dtype, **quant)
    model.config.use_cache = False
    return model


def token_loss_sum(model, batch, device) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the target tokens of a batch, and their count (the
    logits go through the LM head in chunks: :mod:`qlora_kernels.train.loss`). ``batch`` is
    collate's CPU tensors: the count comes from there, so it costs no wait on the GPU."""
    count = int((batch["labels"][:, 1:] != data_mod.IGNORE_INDEX).sum())
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    loss = lm_loss_sum(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                       ignore_index=data_mod.IGNORE_INDEX)
    return loss, count


GRAPH_LENGTH_MULTIPLE = 64  # --cuda-graphs: sequence lengths round up to this (one graph per length)


def graph_batch(batch, rows: int, pad_id: int, n_target: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, 1 / n_target) of a collated batch for a CUDA graph replay: padded
    to ``rows`` sequences and a length that is a multiple of GRAPH_LENGTH_MULTIPLE, so that few
    shapes (graphs) occur. The padding is on the right and its labels are ignored; with causal
    attention no real token sees it, so no attention mask is passed (building one would read
    it back to the host, which a capture forbids). The normalizer is a tensor, not a Python
    number, which the graph would freeze."""
    ids, labels = batch["input_ids"], batch["labels"]
    width = -(-ids.shape[1] // GRAPH_LENGTH_MULTIPLE) * GRAPH_LENGTH_MULTIPLE
    padded_ids = torch.full((rows, width), pad_id, dtype=ids.dtype)
    padded_labels = torch.full((rows, width), data_mod.IGNORE_INDEX, dtype=labels.dtype)
    padded_ids[:ids.shape[0], :ids.shape[1]] = ids
    padded_labels[:labels.shape[0], :labels.shape[1]] = labels
    return padded_ids, padded_labels, torch.tensor(1.0 / max(n_target, 1), dtype=torch.float32)


def graph_loss(model, input_ids, labels, inv_n_target):
    """What a --cuda-graphs replay differentiates: the batch's summed loss / the step's target count."""
    return lm_loss_sum(model, input_ids, labels, None, ignore_index=data_mod.IGNORE_INDEX) * inv_n_target


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based)."""
    lr = config.learning_rate
    if config.warmup_steps and step <= config.warmup_steps:
        return lr * step / config.warmup_steps
    if config.lr_schedule == "constant":
        return lr
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.lr_schedule == "linear":
        return lr * max(0.0, 1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model, examples, batch_size: int, pad_id: int, device) -> float:
    """Mean target-token loss over ``examples`` (no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for start in range(0, len(order), batch_size):
        batch = data_mod.collate([examples[i] for i in order[start:start + batch_size]], pad_id)
        loss, n = token_loss_sum(model, batch, device)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int, device) -> list[int]:
    """Greedy decoding (no KV cache: a few dozen tokens)."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt_ids], device=device)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        if nxt == eos_id:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    model.train(was_training)
    return out


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints ``(step, path)``, oldest first (a checkpoint is complete once
    renamed from its temporary name, and only then)."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            path = os.path.join(output_dir, name)
            if name.startswith("checkpoint-") and name[11:].isdigit() and os.path.isfile(os.path.join(path, STATE_FILE)):
                found.append((int(name[11:]), path))
    return sorted(found)


def save_checkpoint(model, optimizer, config: TrainConfig, step: int, position: int) -> str:
    """Writes ``checkpoint-<step>`` atomically: everything goes into a temporary directory that
    is renamed at the end, so a run killed mid-write leaves the previous checkpoint intact."""
    final = os.path.join(config.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(config.output_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    peft_format.save_adapter(model, tmp, base_model_name_or_path=config.model or f"qlora_kernels:{config.model_config}")
    torch.save({"step": step, "position": position, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                "config": config.to_dict()}, os.path.join(tmp, STATE_FILE))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in checkpoints(config.output_dir)[:-config.save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _check_resumable(saved: dict, config: TrainConfig, path: str) -> None:
    changed = [k for k in RESUME_FIXED if saved.get(k, RESUME_DEFAULTS.get(k)) != getattr(config, k)]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k, RESUME_DEFAULTS.get(k))!r} -> {getattr(config, k)!r}" for k in changed)
        raise ValueError(f"resume: {path} was written with different options ({detail}); "
                         "resume with the same options or start a new --output-dir")


def _memory_text(device) -> str:
    if device.type != "cuda":
        return "cpu"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}GiB"


def _report_paging(optimizer: PagedAdamW, config: TrainConfig, bar, deferred: bool) -> None:
    """Says, once, how much optimizer state went to host memory (placed at the first step)."""
    placed = optimizer.state_bytes()
    if not placed["host"]:
        return
    why = f"max_memory_gib={config.max_memory_gib:g}" if config.max_memory_gib else "the free GPU memory"
    how = ("its updates run under the next forward (cuda_graphs)" if deferred else
           "each step copies it in and out over PCIe (--cuda-graphs hides that under the forward)")
    bar.write(f"optimizer state: {placed['device'] / 2**30:.2f} GiB on the GPU, {placed['host'] / 2**30:.2f} GiB "
              f"paged to pinned host memory to stay within {why}; {how}")


def _oom_error(config: TrainConfig, device, where: str) -> TrainingError:
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else float("nan")
    return TrainingError(
        f"out of GPU memory {where}: the allocator's peak reached {peak:.2f} GiB of the card's {total:.2f} GiB. "
        f"Lower --batch-size (now {config.batch_size}; raise --grad-accum, now {config.grad_accum}, to keep the "
        f"effective batch), --source-max-len / --target-max-len (now {config.source_max_len} / "
        f"{config.target_max_len}), or --lora-r (now {config.lora_r}); keep gradient checkpointing on"
        f"{'' if config.gradient_checkpointing else ' (it is off: drop --no-gradient-checkpointing)'}.")


def plot_losses(metrics_path: str, out_path: str) -> str | None:
    """A PNG of the train and eval loss curves from the metrics log; None (with a warning) where
    matplotlib is not installed: the adapter is saved by then, and the run's sample still comes."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn("qlora_kernels: matplotlib is not installed, so no loss.png (the metrics are in "
                      f"{metrics_path}); pip install matplotlib, or pass --no-plot")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], []
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                train.append((rec["step"], rec["loss"]))
            if "eval_loss" in rec:
                evals.append((rec["step"], rec["eval_loss"]))
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (target tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


# --------------------------------------------------------------------------------------------
def train(config: TrainConfig, *, on_step=None) -> TrainResult:
    """Runs a QLoRA finetuning job; returns where things went and the loss history.

    ``on_step(step, loss)``, if given, is called after every optimizer step (and after that
    step's checkpoint, if any); it may read the params, so each step then waits for the
    optimizer's deferred host-page updates instead of hiding them under the next forward. Raises :class:`TrainingError` on a NaN/Inf loss (the last good
    checkpoint is kept) or out of GPU memory, ``ValueError`` (``DataError``, ``ModelError``)
    on bad options, data or model directory - all before training starts.
    """
    from .. import add_lora
    from ..optim import PagedAdamW

    config.validate()
    device = resolve_device(config)
    dtype = resolve_dtype(config.compute_dtype, device)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    # data first: a bad line must stop the run before minutes go into loading a model
    tokenizer = build_tokenizer(config)
    template = config.template if config.template != "auto" else ("alpaca" if config.dataset else "alpaca-short")
    examples = data_mod.load_dataset(config.dataset, tokenizer, template=template,
                                     source_max_len=config.source_max_len, target_max_len=config.target_max_len,
                                     train_on_source=config.train_on_source)
    train_set, eval_set = data_mod.split(examples, config.eval_fraction, config.max_eval_examples, config.seed)

    try:
        model = build_model(config, device, dtype)
    except torch.OutOfMemoryError:
        raise _oom_error(config, device, "while loading the model") from None
    n_params = model_mod.count_parameters(model)
    preset = config.model_config if config.model is None else preset_for_parameters(n_params)
    config = config.resolved(preset)
    if max(max(e.input_ids) for e in examples) >= model.get_input_embeddings().num_embeddings:
        raise ValueError("dataset: token ids exceed the model's vocabulary; the tokenizer does not match the model")

    target = config.lora_target if config.lora_target == "all-linear" else [
        s.strip() for s in config.lora_target.split(",") if s.strip()]
    if config.lora_dtype == "auto":
        # the concrete dtype goes into the checkpoints' config, so a resume compares dtypes
        config = dataclasses.replace(config, lora_dtype=DTYPE_NAMES[dtype])
    lora_dtype = resolve_dtype(config.lora_dtype, device)
    add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, target=target,
             lora_dtype=lora_dtype)
    if config.gradient_checkpointing:
        model_mod.enable_checkpointing(model)
    if config.compile and device.type == "cuda":
        model_mod.compile_decoder_layers(model)
    elif config.compile:
        print("compile: ignored on the CPU (it pays off on a GPU, whose step is bound by kernel launches)")
    if config.max_memory_gib and device.type != "cuda":
        print("max_memory_gib: ignored on the CPU (it caps a GPU's memory)")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"lora_target: {config.lora_target!r} matched no linear layer of the model")
    limit = int(config.max_memory_gib * 2**30) if config.max_memory_gib and device.type == "cuda" else None
    optimizer = PagedAdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                           eps=config.adam_eps, weight_decay=config.weight_decay, device_limit_bytes=limit)
    graphed = None
    if config.cuda_graphs and device.type == "cuda":
        # created before the first step: from then on every LoRA dropout seed comes from its
        # table, eager (first optimizer step of this process) or replayed, so the masks do not
        # depend on when a shape is captured, and a resumed run draws what the full run drew.
        # Given the optimizer, its graphs wait for the host pages' updates layer by layer, so
        # the optimizer steps with those deferred (hidden under the next forward)
        graphed = GraphedStep(model, params, graph_loss, max_graphs=64, optimizer=optimizer)
    elif config.cuda_graphs:
        print("cuda_graphs: ignored on the CPU")

    batches_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * batches_per_epoch / config.grad_accum))
    os.makedirs(config.output_dir, exist_ok=True)
    metrics_path = os.path.join(config.output_dir, METRICS_FILE)
    step, position = 0, 0
    if config.resume:
        found = checkpoints(config.output_dir)
        if not found:
            raise ValueError(f"resume: no checkpoint-<step> directory with {STATE_FILE} in {config.output_dir!r}")
        step, path = found[-1]
        # to the CPU: the optimizer places its state itself at the first step (see PagedAdamW.load_state_dict)
        state = torch.load(os.path.join(path, STATE_FILE), weights_only=False, map_location="cpu")
        _check_resumable(state["config"], config, path)
        peft_format.load_adapter(model, path)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        position = state["position"]
        print(f"resuming from {path} (step {step})")
        # drop what the killed run logged after its last checkpoint: those steps run again
        if os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= step]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    elif os.path.isfile(metrics_path):
        os.remove(metrics_path)

    n_lora = sum(p.numel() for p in params)
    print(f"model: {config.model or 'random LLaMA ' + config.model_config}, {n_params / 1e6:.1f}M parameters "
          f"(linear layers in {config.quant_type}{' + double quant' if config.double_quant else ''}), "
          f"LoRA r={config.lora_r} alpha={config.lora_alpha:g}: {n_lora / 1e6:.2f}M trainable; "
          f"{dtype} compute on {device}")
    print(f"data: {config.dataset or data_mod.BUILTIN_DATA}: {len(train_set)} train / {len(eval_set)} held-out "
          f"examples; {config.batch_size} x {config.grad_accum} sequences per step, {total_steps} steps, "
          f"lr {config.learning_rate:g} ({config.lr_schedule})")

    from tqdm.auto import tqdm

    result = TrainResult(output_dir=config.output_dir, adapter_dir=os.path.join(config.output_dir, "adapter"),
                         steps=total_steps, metrics_path=metrics_path)
    cached_epoch, epoch_order = -1, []
    stepped_here = False  # whether the optimizer has stepped in this process (see graphed)
    graphs_failed = False  # a capture failed: graphed.eager from then on
    bar = tqdm(total=total_steps, initial=step, disable=not config.progress, desc="qlora", dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open(metrics_path, "a") as log:
            if eval_set and step == 0:  # the starting point of the eval curve
                rec = {"step": 0, "eval_loss": evaluate(model, eval_set, config.batch_size, tokenizer.pad_token_id,
                                                        device)}
                result.eval_losses.append((0, rec["eval_loss"]))
                log.write(json.dumps(rec) + "\n")
            while step < total_steps:
                t0 = time.perf_counter()
                step += 1
                lr = learning_rate(config, step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro = []
                for _ in range(config.grad_accum):
                    epoch, index = divmod(position, batches_per_epoch)
                    if epoch != cached_epoch:
                        lengths = [len(e) for e in train_set]
                        epoch_order = data_mod.epoch_batches(lengths, config.batch_size, config.seed, epoch,
                                                             config.group_by_length)
                        cached_epoch = epoch
                    micro.append(data_mod.collate([train_set[i] for i in epoch_order[index]], tokenizer.pad_token_id))
                    position += 1
                # counted on the CPU batches: no wait on the GPU per micro-batch
                n_target = sum(int((b["labels"][:, 1:] != data_mod.IGNORE_INDEX).sum()) for b in micro)
                tokens = sum(int(b["attention_mask"].sum()) for b in micro)
                loss_sum = torch.zeros((), device=device)
                try:
                    for batch in micro:
                        if graphed is not None:
                            inputs = graph_batch(batch, config.batch_size, tokenizer.pad_token_id, n_target)
                            # the first optimizer step of this process runs eagerly: PagedAdamW
                            # then moves the gradients into its flat buffer, where they stay
                            run = graphed if stepped_here and not graphs_failed else graphed.eager
                            try:
                                loss_sum += run(*inputs) * n_target
                            except GraphCaptureError as err:
                                # nothing ran: this micro-batch and the rest go eagerly, with the
                                # same seed table (the run goes on, just without graphs)
                                print(f"cuda_graphs: {err}\ncuda_graphs: continuing without CUDA graphs")
                                graphs_failed = True
                                loss_sum += graphed.eager(*inputs) * n_target
                            continue
                        loss, _ = token_loss_sum(model, batch, device)
                        (loss / n_target).backward()
                        loss_sum += loss.detach()
                    loss_value = float(loss_sum) / n_target
                    if not math.isfinite(loss_value):
                        last = checkpoints(config.output_dir)
                        where = f"the last good checkpoint is {last[-1][1]} (continue with --resume, " \
                                "perhaps with a lower --learning-rate)" if last else "no checkpoint was written yet"
                        raise TrainingError(f"loss is {loss_value} at step {step}: stopping; {where}")
                    if config.max_grad_norm > 0:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
                    else:
                        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
                    optimizer.step(defer_host_pages=graphed is not None)
                    # zeroed in place, not freed: the grads are views of PagedAdamW's flat
                    # gradient buffer, into which the next backward accumulates (no copy, no
                    # second set of gradients in memory)
                    optimizer.zero_grad(set_to_none=False)
                    if not stepped_here and device.type == "cuda":
                        _report_paging(optimizer, config, bar, deferred=graphed is not None)
                    stepped_here = True
                except torch.OutOfMemoryError:
                    raise _oom_error(config, device, f"at step {step}") from None
                dt = time.perf_counter() - t0
                rec = {"step": step, "epoch": round(position / batches_per_epoch, 4), "loss": loss_value,
                       "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / dt}
                if device.type == "cuda":
                    rec["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                result.losses.append((step, loss_value))
                evaluating = eval_set and ((config.eval_steps and step % config.eval_steps == 0) or step == total_steps)
                saving = (config.save_steps and step % config.save_steps == 0) or step == total_steps
                if evaluating or saving or on_step is not None:
                    optimizer.wait_host_pages()  # what reads the params runs after the deferred updates
                if evaluating:
                    rec["eval_loss"] = evaluate(model, eval_set, config.batch_size, tokenizer.pad_token_id, device)
                    result.eval_losses.append((step, rec["eval_loss"]))
                if step % config.log_steps == 0 or "eval_loss" in rec or step == total_steps:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2g}", tok_s=f"{tokens / dt:.0f}",
                                mem=_memory_text(device), refresh=False)
                if saving:
                    save_checkpoint(model, optimizer, config, step, position)
                if on_step is not None:
                    on_step(step, loss_value)
    finally:
        bar.close()
        try:
            optimizer.wait_host_pages()
        except RuntimeError:
            pass  # a CUDA error already on its way out says more than this one

    peft_format.save_adapter(model, result.adapter_dir,
                             base_model_name_or_path=config.model or f"qlora_kernels:{config.model_config}")
    if config.plot:
        result.plot_path = plot_losses(metrics_path, os.path.join(config.output_dir, "loss.png"))
    if config.sample_prompt is not None:
        prompt_ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + \
            tokenizer.encode(data_mod.format_prompt(config.sample_prompt, "", template))
    else:
        ex = (eval_set or train_set)[0]
        prompt_ids = ex.input_ids[: ex.n_source]
    if config.sample_max_new_tokens > 0:
        answer = generate(model, prompt_ids, config.sample_max_new_tokens, tokenizer.eos_token_id, device)
        result.sample_prompt = tokenizer.decode(prompt_ids)
        result.sample_answer = tokenizer.decode(answer)
    return result
