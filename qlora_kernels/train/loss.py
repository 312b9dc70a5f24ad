"""The next-token loss of a causal LM without its full logits in memory.

``model(input_ids).logits`` holds ``[tokens, vocab]`` logits, and the loss then makes a float32
copy, its softmax and (in backward) its gradient: for a 7B model at 4 x 512 tokens and a 32000-word
vocabulary, about 1 GiB at the moment of the loss, more than the model's activations with
gradient checkpointing. Here the decoder's hidden states go through the LM head in chunks of
``chunk_tokens`` rows, each chunk's loss under ``torch.utils.checkpoint``: a chunk's logits
exist only while that chunk is computed, in forward and again (recomputed) in backward. The
cost is one more LM-head GEMM per step; the sum is the same up to float32 summation order.

Used for models whose logits are exactly ``lm_head(decoder(...))`` (the LLaMA family);
anything else falls back to the full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

#: Model types whose ``forward`` computes ``logits = lm_head(hidden_states)`` and nothing more
#: (no logit scaling or soft-capping), so the chunked loss is the same loss.
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_CHUNK_TOKENS = 1024


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    ignore_index: int) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def plain_head(model: nn.Module):
    """``(decoder, lm_head)`` when ``model``'s logits are ``lm_head(decoder(...))`` with a plain
    ``nn.Linear`` head (no bias), else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if type(head) is not nn.Linear or head.bias is not None or decoder is None:
        return None
    return decoder, head


def lm_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None, *, ignore_index: int = -100,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Summed next-token cross-entropy of ``model`` on ``input_ids`` (``labels`` aligned with
    the inputs, shifted here; ``ignore_index`` marks tokens without a loss), float32."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected a positive int, got {chunk_tokens!r}")
    targets = labels[:, 1:].reshape(-1)
    parts = plain_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets,
                               ignore_index=ignore_index, reduction="sum")
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    # a sum of nothing (sequences of one token) that still belongs to the graph, as the full
    # logits' loss would: backward() then runs and gives zero gradients
    total = hidden[:0].float().sum()
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if recompute:
            # no RNG in a chunk's loss: no RNG state to save (which a CUDA graph
            # capture, train.graphs, would not allow)
            total = total + checkpoint(_chunk_loss_sum, h, head.weight, y, ignore_index, use_reentrant=False,
                                       preserve_rng_state=False)
        else:
            total = total + _chunk_loss_sum(h, head.weight, y, ignore_index)
    return total
