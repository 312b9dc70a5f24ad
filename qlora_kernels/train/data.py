"""Training data: JSONL records to token ids and labels, the held-out split, and
group-by-length batching.

Three record kinds, one per JSONL line (a file may mix them):

* Alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``. The source is the
  prompt template filled with instruction and input, the target is the output + EOS.
* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``. The
  targets are the assistant turns, the source everything else.
* plain text: ``{"text": ...}``, or a ``.txt`` file whose paragraphs (separated by blank
  lines) are documents. Every token is a target.

Labels are ``-100`` (ignored by the loss) on source tokens unless ``train_on_source``. As in
the paper's code, sources are cut to ``source_max_len`` tokens and targets to
``target_max_len``. Every line is parsed and checked before training starts, so a bad line
stops the run with its file and line number before a single step runs on garbage.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100

TEMPLATES = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    # the same markers without the preamble: a third of the tokens for byte-level tokenizers
    "alpaca-short": (
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "none": ("{instruction}\n{input}\n", "{instruction}\n"),
}

BUILTIN_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "instructions.jsonl")


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    n_source: int = 0  # prompt tokens before the first target token (for sample generation)

    def __len__(self) -> int:
        return len(self.input_ids)


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    with_input, without_input = TEMPLATES[template]
    if input:
        return with_input.format(instruction=instruction, input=input)
    return without_input.format(instruction=instruction)


def read_records(path: str) -> list[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line of a JSONL file (or every paragraph
    of a ``.txt`` file, as ``{"text": ...}``)."""
    if not os.path.isfile(path):
        raise DataError(f"dataset: expected a JSONL or .txt file, got {path!r} (no such file)")
    records = []
    with open(path, encoding="utf-8") as f:
        if path.endswith(".txt"):
            paragraph, start = [], 1
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    if not paragraph:
                        start = lineno
                    paragraph.append(line)
                elif paragraph:
                    records.append((start, {"text": "".join(paragraph).strip()}))
                    paragraph = []
            if paragraph:
                records.append((start, {"text": "".join(paragraph).strip()}))
            return records
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
            records.append((lineno, record))
    if not records:
        raise DataError(f"dataset: {path} holds no records")
    return records


def _check_str(path, lineno, record, key, required=True) -> str:
    if key not in record:
        if required:
            raise DataError(f"{path}, line {lineno}: missing field {key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{path}, line {lineno}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def encode_record(record, tokenizer, *, template: str, source_max_len: int, target_max_len: int,
                  train_on_source: bool, path: str = "<data>", lineno: int = 0) -> Example:
    """One record to token ids and labels (see the module doc)."""
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    if "messages" in record:
        return _encode_chat(record["messages"], tokenizer, bos, eos, source_max_len + target_max_len,
                            train_on_source, path, lineno)
    if "instruction" in record or "output" in record:
        instruction = _check_str(path, lineno, record, "instruction")
        inp = _check_str(path, lineno, record, "input", required=False)
        output = _check_str(path, lineno, record, "output")
        source = (bos + tokenizer.encode(format_prompt(instruction, inp, template)))[:source_max_len]
        target = (tokenizer.encode(output) + eos)[:target_max_len]
        labels = (source if train_on_source else [IGNORE_INDEX] * len(source)) + target
        return Example(source + target, labels, len(source))
    if "text" in record:
        text = _check_str(path, lineno, record, "text")
        ids = (bos + tokenizer.encode(text) + eos)[: source_max_len + target_max_len]
        return Example(ids, list(ids), min(16, len(ids) // 2))
    raise DataError(f"{path}, line {lineno}: expected an Alpaca record (instruction, input, output), "
                    f"a chat record (messages) or a text record (text); got keys {sorted(record)}")


def _encode_chat(messages, tokenizer, bos, eos, max_len, train_on_source, path, lineno) -> Example:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path}, line {lineno}: 'messages' must be a non-empty list of {{role, content}}")
    ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    n_targets = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{path}, line {lineno}: messages[{i}] must be an object with string 'role' and 'content'")
        header = tokenizer.encode(f"### {m['role'].capitalize()}:\n")
        ids += header
        labels += header if train_on_source else [IGNORE_INDEX] * len(header)
        body = tokenizer.encode(m["content"]) + (eos if m["role"] == "assistant" else tokenizer.encode("\n\n"))
        ids += body
        if m["role"] == "assistant":
            labels += body
            n_targets += 1
        else:
            labels += body if train_on_source else [IGNORE_INDEX] * len(body)
    if n_targets == 0 and not train_on_source:
        raise DataError(f"{path}, line {lineno}: a chat record needs at least one 'assistant' message to learn from")
    last_header = len(ids) - len(body)  # the prompt of the sample is everything before the last answer
    return Example(ids[:max_len], labels[:max_len], min(last_header, max_len))


def load_dataset(path: str | None, tokenizer, *, template: str, source_max_len: int, target_max_len: int,
                 train_on_source: bool) -> list[Example]:
    """Every record of ``path`` (None: the built-in instruction data) encoded; raises
    :class:`DataError` naming the file and line of the first bad record."""
    path = path or BUILTIN_DATA
    examples = []
    for lineno, record in read_records(path):
        ex = encode_record(record, tokenizer, template=template, source_max_len=source_max_len,
                           target_max_len=target_max_len, train_on_source=train_on_source,
                           path=path, lineno=lineno)
        if all(label == IGNORE_INDEX for label in ex.labels[1:]):
            raise DataError(f"{path}, line {lineno}: no target tokens left after truncation to "
                            f"source_max_len={source_max_len}; raise --source-max-len")
        examples.append(ex)
    return examples


def split(examples: list, eval_fraction: float, max_eval: int, seed: int) -> tuple[list, list]:
    """A fixed random held-out split: ``(train, eval)``."""
    n_eval = min(max_eval, int(round(eval_fraction * len(examples))))
    if eval_fraction > 0 and len(examples) >= 2:
        n_eval = max(n_eval, 1)
    order = np.random.default_rng(seed).permutation(len(examples))
    held = set(order[:n_eval].tolist())
    return ([e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)])


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True, megabatch_mult: int = 16) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch; every index appears exactly once.

    A pure function of ``(seed, epoch)``, so a resumed run recomputes the same order. With
    ``group_by_length`` (as in the paper's code, after transformers' LengthGroupedSampler):
    shuffle, cut into megabatches of ``megabatch_mult * batch_size``, sort each by length, so
    a batch pads little yet the order stays random; the longest batch goes first, so a run
    that would run out of memory does so at once.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths)).tolist()
    if not group_by_length:
        return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    mega = megabatch_mult * batch_size
    batches = []
    for start in range(0, len(perm), mega):
        group = sorted(perm[start:start + mega], key=lambda i: -lengths[i])
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        labels[row, : len(e)] = torch.tensor(e.labels)
        mask[row, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
